from tests.conftest import config
import json

import numpy as np
import pytest

from retrieval.embedder import load_embedder
from retrieval.tune_embedder import EmbedderTuneConfig, tune_embedder
from core.errors import InputError
from retrieval.index import IndexConfig, build_index
from retrieval.retriever import Retriever
from tests.conftest import write_doc

COLORS = ["red", "blue", "green", "amber", "violet", "teal", "ochre", "cyan", "lime", "rose", "jade", "plum"]


@pytest.fixture()
def tune_setup(tmp_path, tiny_embedder):
    corpus = tmp_path / "corpus"
    rows = []
    for i, color in enumerate(COLORS):
        write_doc(corpus, f"part-{i}.md", f"Part {i}",
                  f"Part {i} is painted {color}. It weighs {i + 3} kilograms. Its supplier is firm number {i * 7}. "
                  f"Spare units are kept in bay {i + 11}.", ["hr"] if i % 4 == 0 else None)
        rows += [{"id": f"c{i}", "question": f"What colour is part {i}?", "answers": [color], "gold_ids": [f"part-{i}"]},
                 {"id": f"w{i}", "question": f"How heavy is part {i}?", "answers": [f"{i + 3} kilograms"],
                  "gold_ids": [f"part-{i}"]}]
    rows.append({"id": "u1", "question": "Who founded the company?", "answers": [], "gold_ids": []})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = tmp_path / "index"
    build_index(corpus, index, IndexConfig(chunk_tokens=64, overlap=0), embedder=tiny_embedder)
    return corpus, qa, index


@pytest.mark.parametrize("use_qa", [True, False])
def test_tuning_changes_weights_saves_model_and_reports_before_after(tune_setup, tmp_path, tiny_embedder, use_qa):
    corpus, qa, index = tune_setup
    out = tmp_path / "tuned"
    cfg = config(EmbedderTuneConfig, index=str(index), out=str(out), qa=str(qa) if use_qa else None, batch_size=4,
                             max_steps=3, learning_rate=1e-3, test_fraction=0.25, mine_range=5)
    res = tune_embedder(cfg, progress=False)
    for side in ("base", "tuned"):
        assert {"recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"} <= set(getattr(res, side))
        assert getattr(res, side)["n"] == res.test_queries > 0
    assert res.pairs_source == ("qa" if use_qa else "inverse_cloze")
    assert json.loads((out / "hybrid_tuning.json").read_text())["tuned"] == res.tuned
    tuned = load_embedder(str(out))
    assert tuned.fingerprint != tiny_embedder.fingerprint
    base_w = dict(tiny_embedder.model.named_parameters())
    changed = [n for n, p in tuned.model.named_parameters() if not np.allclose(p.detach(), base_w[n].detach())]
    assert changed, "training did not change any weight"
    # The old index refuses the tuned embedder; a rebuilt one accepts it.
    with pytest.raises(InputError, match="fingerprint"):
        Retriever.load(index, embedder=tuned)
    build_index(corpus, tmp_path / "index2", IndexConfig(embedder=str(out), chunk_tokens=64, overlap=0))
    assert Retriever.load(tmp_path / "index2").search("colour of part 3", k=2)


def test_hard_negatives_are_mined_from_the_index_and_reach_the_loss(tune_setup, tmp_path, monkeypatch):
    import sentence_transformers
    from sentence_transformers import losses

    from retrieval.chunking import embed_text

    _, qa, index = tune_setup
    seen = {"datasets": [], "loss_inputs": []}

    class Capturing(sentence_transformers.SentenceTransformerTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["datasets"].append(self.train_dataset)

    real_forward = losses.MultipleNegativesRankingLoss.forward

    def forward(self, sentence_features, labels):
        seen["loss_inputs"].append([len(f["input_ids"]) for f in sentence_features])
        return real_forward(self, sentence_features, labels)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformerTrainer", Capturing)
    monkeypatch.setattr(losses.MultipleNegativesRankingLoss, "forward", forward)
    out = tmp_path / "tuned"
    # margin 0: the random tiny embedder scores every chunk alike, so the default 5 % margin drops all
    # negatives; batch 2: the no-duplicates sampler must find batches among few rows
    cfg = config(EmbedderTuneConfig, index=str(index), out=str(out), qa=str(qa), batch_size=2, max_steps=2,
                 learning_rate=1e-3, test_fraction=0.25, mine_range=5, relative_margin=0.0)
    res = tune_embedder(cfg, progress=False)
    (ds,) = seen["datasets"]
    assert ds.column_names == ["anchor", "positive", "negative_1"] and res.hard_negative_columns == ["negative_1"]
    assert len(ds) == res.train_rows_with_hard_negatives >= cfg.train.batch_size
    # the negatives are the index's own chunks (public ones: the trainer named no group), never the positive
    retriever = Retriever.load(index)
    public = {embed_text(c.title, c.text) for c in retriever.chunks()}
    pairs = {json.loads(l)["query"]: json.loads(l)["positive"] for l in (out / "train_pairs.jsonl").read_text().splitlines()}
    for row in ds:
        assert row["negative_1"] in public and row["negative_1"] != row["positive"]
        assert pairs[row["anchor"]] == row["positive"]  # a training pair, with its own positive
    # both steps' losses got anchors, positives and one hard negative per anchor
    assert seen["loss_inputs"] == [[2, 2, 2]] * 2


def test_gold_ids_missing_from_index_are_named(tune_setup, tmp_path):
    _, qa, index = tune_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(qa.read_text() + json.dumps({"id": "z", "question": "q?", "answers": ["a"], "gold_ids": ["ghost"]}) + "\n")
    with pytest.raises(InputError, match="gold_ids not in index.*ghost"):
        tune_embedder(config(EmbedderTuneConfig, index=str(index), out=str(tmp_path / "o"), qa=str(bad), batch_size=4))


def test_config_problems_name_flags():
    problems = config(EmbedderTuneConfig, index="i", out="o", batch_size=1, test_fraction=1.5).problems()
    assert any("--batch-size" in p for p in problems) and any("--test-fraction" in p for p in problems)


def test_a_run_that_forms_no_batch_is_refused_not_saved_as_tuned(tune_setup, tmp_path):
    """The no-duplicates sampler can form no full batch of a few mined rows: that run trained nothing."""
    corpus, qa, index = tune_setup
    cfg = config(EmbedderTuneConfig, index=str(index), out=str(tmp_path / "none"), qa=str(qa), batch_size=4,
                 max_steps=2, test_fraction=0.25, mine_range=5, relative_margin=0.0)
    with pytest.raises(InputError, match="no training step ran"):
        tune_embedder(cfg, progress=False)
    assert not (tmp_path / "none").exists()


def test_the_fallback_to_in_batch_negatives_reports_no_hard_negative_rows(tune_setup, tmp_path):
    corpus, qa, index = tune_setup  # the random tiny embedder's margin drops every mined negative
    res = tune_embedder(config(EmbedderTuneConfig, index=str(index), out=str(tmp_path / "t"), qa=str(qa), batch_size=4,
                               max_steps=2, test_fraction=0.25, mine_range=5), progress=False)
    assert res.hard_negative_columns == [] and res.train_rows_with_hard_negatives == 0
    assert res.train_steps == 2
