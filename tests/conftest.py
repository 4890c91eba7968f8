"""Shared fixtures: a tiny random sentence-transformers embedder and small corpora.

Everything is offline: the tiny embedder is a 1-layer random BERT built in-process
with the packaged MiniLM's tokenizer, so chunking is realistic and encoding is fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "corpora" / "brindle"


@pytest.fixture(autouse=True)
def cpu_without_bf16_units(monkeypatch):
    """Every test runs as on a CPU without bf16 units, so `--precision auto` is fp32 on any machine
    and a test's numbers do not depend on the processor CI draws; tests of the policy pass the flags
    they mean (training/precision.py `resolve(..., flags=...)`) or ask for bf16 by name."""
    from training import precision

    monkeypatch.setattr(precision, "_this_cpu", lambda: frozenset({"avx2"}))
    precision.choose.cache_clear()


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory) -> Path:
    """A random 32-dim sentence-transformers model dir (mean pooling + normalise)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retrieval.embedder import resolve_embedder

    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(resolve_embedder(None)[1]))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    word = models.Transformer(str(base), max_seq_length=256)
    st = SentenceTransformer(modules=[word, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    out = tmp_path_factory.mktemp("tiny_embedder")
    st.save(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tiny_embedder_dir):
    from retrieval.embedder import load_embedder

    return load_embedder(str(tiny_embedder_dir), device="cpu")


def write_doc(root: Path, name: str, title: str, body: str, groups: list[str] | None = None) -> Path:
    front = f"---\ntitle: {title}\n" + (f"groups: [{', '.join(groups)}]\n" if groups else "") + "---\n"
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(front + body, encoding="utf-8")
    return path


@pytest.fixture()
def small_corpus(tmp_path) -> Path:
    """Six documents: four public, one for `hr`, one for `finance` + `security`."""
    return make_small_corpus(tmp_path / "corpus")


def make_small_corpus(root: Path) -> Path:
    """The `small_corpus` documents under root (SECRET-HR / SECRET-FIN mark the restricted text)."""
    filler = " ".join(f"Sentence {i} about routine operations and the weekly schedule." for i in range(40))
    write_doc(root, "buoys/kestrel.md", "Kestrel buoy", "The Kestrel buoy battery lasts 14 months. " + filler)
    write_doc(root, "buoys/osprey.md", "Osprey buoy", "The Osprey buoy battery lasts 9 months. " + filler)
    write_doc(root, "office.md", "Office guide", "The office opens at 8 am and the canteen serves soup.")
    write_doc(root, "support.txt", "Support", "Call support on extension 4411 for buoy faults.")
    write_doc(root, "salaries.md", "Salary bands", "SECRET-HR salary band L3 pays 61000 per year. " + filler, ["hr"])
    write_doc(root, "budget.md", "Budget 2027", "SECRET-FIN the budget for 2027 is 4.2 million.", ["finance", "security"])
    return root


@pytest.fixture()
def small_index(small_corpus, tmp_path, tiny_embedder):
    from retrieval.index import IndexConfig, build_index

    out = tmp_path / "index"
    build_index(small_corpus, out, IndexConfig(chunk_tokens=64, overlap=8), embedder=tiny_embedder)
    return out


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 600-token BPE vocabulary trained in-process, ChatML template."""
    import torch
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tuning.generation import CHATML_TEMPLATE

    texts = [p.read_text(encoding="utf-8") for p in sorted((BUNDLED / "docs").glob("*.md"))]
    texts.append("##Reason: ##begin_quote## ##end_quote## ##Answer: I cannot answer this from the provided documents.")
    tk = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    out = tmp_path_factory.mktemp("tiny_llm")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bundled_tiny_index(tmp_path_factory, tiny_embedder):
    """The bundled corpus indexed with the tiny embedder (fast; retrieval quality is not the point)."""
    from retrieval.index import IndexConfig, build_index

    out = tmp_path_factory.mktemp("bundled") / "index"
    build_index(BUNDLED / "docs", out, IndexConfig(chunk_tokens=96, overlap=0), embedder=tiny_embedder)
    return out


def config(cls, **kwargs):
    """A workflow config from flat keyword arguments: the training settings (learning_rate, max_steps,
    groups, ...) go into its `train`, whose other defaults are the workflow's own."""
    import dataclasses

    from training.train_settings import TrainSettings

    names = {f.name for f in dataclasses.fields(TrainSettings)}
    train = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
    cfg = cls(**kwargs)
    cfg.train = dataclasses.replace(cfg.train, **train)
    return cfg
