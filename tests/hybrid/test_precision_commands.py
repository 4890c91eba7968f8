"""The precision policy as the commands use it: which precision each loader runs at under auto, what
bf16 does to the models, what is recorded, and an eval that will not mix answers of two precisions."""

import json

import pytest
import torch

from hybrid.eval import EvalConfig, run_eval
from training import precision
from retrieval.embedder import load_embedder
from tests.hybrid.test_cli import assert_clean_error, run
from tests.hybrid.test_eval import fixed_qa, shard_dirs  # noqa: F401  (fixtures reused)
from tests.hybrid.test_pipeline import two_adapters  # noqa: F401  (fixture reused)
from tuning.generation import load_generator


@pytest.fixture
def cpu_with_amx(monkeypatch):
    """This test's CPU reports AMX (the autouse fixture in conftest.py makes every other one AVX2-only)."""
    monkeypatch.setattr(precision, "_this_cpu", lambda: frozenset({"avx2", "amx_bf16", "avx512_bf16"}))
    precision.choose.cache_clear()
    yield
    precision.choose.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_bf16_units_and_bf16_with_them(tiny_llm_dir, tiny_embedder_dir, request):
    model, _, info = load_generator(str(tiny_llm_dir), device="cpu", precision="auto")
    assert info.precision == "fp32" and model.dtype == torch.float32
    assert load_embedder(str(tiny_embedder_dir), device="cpu", precision="auto").precision == "fp32"
    request.getfixturevalue("cpu_with_amx")
    model, _, info = load_generator(str(tiny_llm_dir), device="cpu", precision="auto")
    assert info.precision == "bf16" and model.dtype == torch.bfloat16  # generation: bf16 weights
    assert load_embedder(str(tiny_embedder_dir), device="cpu", precision="auto").precision == "bf16"


def test_bf16_generation_and_encoding_stay_close_to_fp32(tiny_llm_dir, tiny_embedder_dir):
    texts = ["The Kestrel-7 battery lasts 14 months.", "The office opens at 8 am."] * 4
    fp32 = load_embedder(str(tiny_embedder_dir), device="cpu", precision="fp32").encode(texts)
    emb = load_embedder(str(tiny_embedder_dir), device="cpu", precision="bf16")
    seen = []
    linear = next(m for m in emb.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    bf16 = emb.encode(texts)
    assert seen and set(seen) == {torch.bfloat16}  # encoded under autocast
    assert bf16.dtype == fp32.dtype and (bf16 * fp32).sum(1).min() > 0.99
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    m32 = load_generator(str(tiny_llm_dir), device="cpu", precision="fp32")[0]
    m16 = load_generator(str(tiny_llm_dir), device="cpu", precision="bf16")[0]
    with torch.no_grad():
        a, b = m32(input_ids=ids).logits, m16(input_ids=ids).logits.float()
    assert b.dtype == torch.float32 and torch.allclose(a, b, atol=0.15)


def test_bf16_named_on_a_cpu_without_units_runs_and_says_it_is_emulated(tiny_embedder_dir, caplog):
    emb = load_embedder(str(tiny_embedder_dir), device="cpu", precision="bf16")
    assert emb.precision == "bf16"
    assert "bf16 is emulated" in caplog.text and "--precision auto or fp32" in caplog.text


def test_index_records_its_precision_and_refuses_an_unknown_one(tmp_path, tiny_embedder_dir):
    from tests.conftest import make_small_corpus

    corpus = make_small_corpus(tmp_path / "corpus")
    out = tmp_path / "idx"
    res = run("index", corpus, "--out", out, "--embedder", tiny_embedder_dir, "--precision", "bf16",
              "--chunk-tokens", 64, "--overlap", 8, "-q")
    assert res.exit_code == 0, res.output
    assert "(bf16)" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["embedder"]["precision"] == "bf16" == manifest["config"]["precision"]
    assert_clean_error(run("index", corpus, "--out", out, "--precision", "fp16"), "--precision")


def test_eval_reports_its_precision_and_refuses_to_resume_another(tmp_path, fixed_qa, tiny_llm_dir):  # noqa: F811
    out = tmp_path / "rep"
    cfg = EvalConfig(qa=str(fixed_qa), base_model=str(tiny_llm_dir), closed_book=False, max_new_tokens=2,
                     batch_size=3, out=str(out), precision="fp32")
    assert run_eval(cfg, progress=False).precision == "fp32"
    assert json.loads((out / "run.json").read_text())["precision"] == "fp32"
    cfg.precision = "bf16"
    with pytest.raises(Exception, match=r"holds answers made at --precision fp32, and this run computes at bf16 "
                                        r"\(pass --precision fp32 to resume them\)"):
        run_eval(cfg, progress=False)
    cfg.precision = "auto"  # auto is fp32 on this (AVX2-only) CPU: the same answers, resumed
    assert run_eval(cfg, progress=False).precision == "fp32"


def test_merge_refuses_shards_made_at_another_precision(fixed_qa, shard_dirs, tmp_path):  # noqa: F811
    for d in shard_dirs:  # shards written before the policy carry no precision: fp32
        meta = json.loads((d / "run.json").read_text())
        assert "precision" not in meta
    cfg = EvalConfig(qa=str(fixed_qa), closed_book=False, merge=[str(d) for d in shard_dirs])
    assert run_eval(cfg, progress=False).precision == "fp32"
    cfg.precision = "bf16"
    with pytest.raises(Exception, match="holds answers made at --precision fp32"):
        run_eval(cfg, progress=False)


def test_a_bf16_pipeline_serves_adapters_trained_in_fp32(bundled_tiny_index, two_adapters):  # noqa: F811
    from hybrid.pipeline import Pipeline

    pipe = Pipeline.load(bundled_tiny_index, adapters=two_adapters, max_new_tokens=4, precision="bf16")
    assert pipe.precision == "bf16" and pipe.model.get_base_model().dtype == torch.bfloat16
    assert pipe.retriever.embedder.precision == "bf16"
    passages = [{"doc_id": "d", "text": "The Kestrel-7 battery lasts 14 months.", "title": "Spec"}]
    answers = {name: pipe.answer_batch(["How long does the battery last?"], [passages], adapter=name)[0]
               for name in (None, "a", "b")}
    assert all(a.new_tokens > 0 for a in answers.values())
    scores = pipe.abstain_scores(["How long does the battery last?"], [passages], adapter="a")
    assert scores.dtype.kind == "f" and scores[0] < 0  # a mean log-probability, computed from bf16 logits
