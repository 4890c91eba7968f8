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
    root = tmp_path / "corpus"
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
