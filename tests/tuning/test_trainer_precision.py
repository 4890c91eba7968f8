"""Every trainer trains at the precision asked for: bf16 matmuls (autocast) with fp32 trainable weights,
and its record says so. The tiny models make bf16 cheap even where it is emulated."""

import json

import pytest
import torch

from tests.conftest import config
from tests.retrieval.test_tune_embedder import tune_setup  # noqa: F401  (fixture reused)


@pytest.fixture
def first_step(monkeypatch):
    """What the first optimizer step of the next training run computes in: the output dtype of its model's
    first linear layer, and the dtypes of the trainable weights."""
    import transformers

    real, seen = transformers.Trainer.training_step, []

    def training_step(self, model, *a, **k):
        if not seen:
            dtypes = []
            linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
            handle = linear.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
            try:
                return real(self, model, *a, **k)
            finally:
                handle.remove()
                seen.append((dtypes[0], {p.dtype for p in model.parameters() if p.requires_grad}))
        return real(self, model, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    return seen


def test_embedder_tuning_at_bf16(first_step, tune_setup, tmp_path):  # noqa: F811
    from retrieval.tune_embedder import EmbedderTuneConfig, tune_embedder

    corpus, qa, index = tune_setup
    res = tune_embedder(config(EmbedderTuneConfig, index=str(index), out=str(tmp_path / "tuned"), qa=str(qa),
                               batch_size=4, max_steps=1, test_fraction=0.25, mine_range=5, precision="bf16"),
                        progress=False)
    assert res.precision == "bf16"
    assert first_step == [(torch.bfloat16, {torch.float32})]


def test_judge_tuning_at_bf16(first_step, tmp_path):
    from tests.tuning.test_judge import born_pairs, write_pairs
    from tuning.tune_judge import JudgeTuneConfig, tune_judge

    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, born_pairs(0, 12))
    rep = tune_judge(config(JudgeTuneConfig, out=str(tmp_path / "judge"), pairs=str(pairs), batch_size=8,
                            max_steps=1, max_length=64, precision="bf16"), progress=False)
    assert rep.precision == "bf16"
    assert first_step == [(torch.bfloat16, {torch.float32})]
    assert json.loads((tmp_path / "judge" / "hybrid_judge.json").read_text())["precision"] == "bf16"
