"""The cross-encoder reranker: training, re-ordering, access scope, bad input, CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hybrid.cli import app
from core.errors import InputError
from retrieval.index import IndexConfig, build_index
from retrieval.reranker import Reranker
from retrieval.tune_reranker import RerankerTuneConfig, tune_reranker
from retrieval.retriever import Retriever
from tests.conftest import config, write_doc

COLORS = ["red", "blue", "green", "amber", "violet", "teal", "ochre", "cyan", "lime", "rose", "jade", "plum"]
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_embedder, tiny_embedder_dir):
    root = tmp_path_factory.mktemp("rerank")
    corpus, rows = root / "corpus", []
    for i, color in enumerate(COLORS):
        write_doc(corpus, f"part-{i}.md", f"Part {i}",
                  f"Part {i} is painted {color}. It weighs {i + 3} kilograms. Spare units are kept in bay {i + 11}.",
                  ["hr"] if i % 4 == 0 else None)
        rows += [{"id": f"c{i}", "question": f"What colour is part {i}?", "answers": [color], "gold_ids": [f"part-{i}"]},
                 {"id": f"w{i}", "question": f"How heavy is part {i}?", "answers": [f"{i + 3} kilograms"],
                  "gold_ids": [f"part-{i}"]}]
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = root / "index"
    build_index(corpus, index, IndexConfig(chunk_tokens=64, overlap=0), embedder=tiny_embedder)
    public = root / "public"
    res = tune_reranker(config(RerankerTuneConfig, index=str(index), out=str(public), qa=str(qa),
                               base=str(tiny_embedder_dir), candidates=6, num_negatives=2, batch_size=4,
                               max_steps=4, learning_rate=1e-3, test_fraction=0.25), progress=False)
    return {"root": root, "index": index, "qa": qa, "public": public, "res": res, "base": tiny_embedder_dir}


def test_training_changes_weights_saves_a_reranker_and_reports_before_after(setup):
    res, out = setup["res"], setup["public"]
    for side in ("first_stage", "reranked"):
        assert getattr(res, side)["n"] == res.test_queries > 0
        assert {"recall@1", "recall@5", "mrr@10", "ndcg@10"} <= set(getattr(res, side))
    assert res.train_steps == 4 and res.candidates == 6
    assert res.worse_than_first_stage == (res.reranked["mrr@10"] < res.first_stage["mrr@10"])
    saved = json.loads((out / "hybrid_reranker.json").read_text())
    assert saved["reranked"] == res.reranked
    assert json.loads((out / "hybrid_access.json").read_text()) == {"scope": "public"}
    # every training row: one positive per question, negatives outside its gold document, no restricted text
    rows = [json.loads(line) for line in (out / "train_rows.jsonl").read_text().splitlines()]
    assert sum(r["label"] == 1.0 for r in rows) == res.train_queries
    assert res.train_negatives == sum(r["label"] == 0.0 for r in rows) > 0
    assert all(r["groups"] == [] for r in rows)
    for r in rows:
        part = r["query"].rstrip("?").split()[-1]
        assert (f"Part {part} is" in r["passage"]) == (r["label"] == 1.0)
    # the head and the body moved away from the base model
    from sentence_transformers.cross_encoder import CrossEncoder

    from transformers import AutoModel

    tuned = CrossEncoder(str(out), device="cpu", local_files_only=True)
    base = dict(AutoModel.from_pretrained(str(setup["base"])).named_parameters())
    moved = [n for n, p in tuned.model.bert.named_parameters() if n in base and not np.allclose(
        p.detach(), base[n].detach())]
    assert moved, "training changed no weight of the body"


class Scripted:
    """Stands in for the cross-encoder: scores a pair by a fixed preference, records what it saw."""

    def __init__(self, prefer: str):
        self.prefer, self.seen = prefer, []

    def predict(self, pairs, **kwargs):
        self.seen += [p for _, p in pairs]
        return np.array([2.0 if self.prefer in p else -float(len(p)) / 1000 for _, p in pairs])


def test_reranker_reorders_the_first_stage_top_n(setup):
    plain = Retriever.load(setup["index"])
    r = Retriever.load(setup["index"], reranker=setup["public"])
    first = plain.search("How heavy is part 5?", k=6, mode="lexical")
    target = next(h for h in first[1:] if "violet" not in h.text)  # a hit the first stage did not rank first
    r.reranker.model = Scripted(prefer=target.text.split(".")[0])
    hits = r.search("How heavy is part 5?", k=3, mode="lexical")
    assert len(hits) == 3 and hits[0].chunk_id == target.chunk_id != first[0].chunk_id
    assert hits[0].score == 2.0
    assert [h.chunk_id for h in r.search("How heavy is part 5?", k=3, mode="lexical", rerank=False)] == \
        [h.chunk_id for h in first[:3]]
    # it re-scored the reranker's N candidates (6 of the 9 public chunks), not only k
    assert len(r.reranker.model.seen) == 6
    # k above N: the top N reranked, then the first stage's order
    deep = r.search("How heavy is part 5?", k=8, mode="lexical")
    plain8 = plain.search("How heavy is part 5?", k=8, mode="lexical")
    assert deep[0].chunk_id == target.chunk_id and [h.chunk_id for h in deep[6:]] == [h.chunk_id for h in plain8[6:]]
    assert len(r.reranker.model.seen) == 12


@pytest.mark.parametrize("k", [1, 3, 6, 12])
def test_an_outsider_reranker_never_sees_restricted_text(setup, k):
    r = Retriever.load(setup["index"], reranker=setup["public"])
    r.reranker.model = spy = Scripted(prefer="painted")
    for mode in ("dense", "lexical", "hybrid"):
        hits = r.search("Part 0 is painted red", k=k, mode=mode)
        assert all(not h.groups for h in hits)
    assert spy.seen and not any("Part 0 " in p or "Part 4 " in p or "Part 8 " in p for p in spy.seen)


def test_a_reranker_trained_on_a_group_serves_only_its_members(setup):
    hr = setup["root"] / "hr"
    tune_reranker(config(RerankerTuneConfig, index=str(setup["index"]), out=str(hr), qa=str(setup["qa"]),
                         base=str(setup["base"]), candidates=6, num_negatives=2, batch_size=4, max_steps=1,
                         groups=["hr"]), progress=False)
    assert json.loads((hr / "hybrid_access.json").read_text())["scope"] == ["hr"]
    r = Retriever.load(setup["index"], reranker=hr)
    with pytest.raises(InputError, match="lacks hr"):
        r.search("What colour is part 1?", k=2)
    assert r.search("What colour is part 0?", k=2, groups=["hr"])
    # an index without any hr document is another corpus: the reranker is refused there
    other = setup["root"] / "other_corpus"
    write_doc(other, "a.md", "A", "Nothing about parts at all, only a note on the weather today.")
    build_index(other, setup["root"] / "other_index", IndexConfig(embedder=str(setup["base"])))
    with pytest.raises(InputError, match="another corpus"):
        Retriever.load(setup["root"] / "other_index", reranker=hr)


def test_bad_input(setup, tmp_path):
    with pytest.raises(InputError, match="not a reranker"):
        Retriever.load(setup["index"], reranker=setup["root"] / "corpus")
    with pytest.raises(InputError, match="--candidates must be larger"):
        tune_reranker(config(RerankerTuneConfig, index=str(setup["index"]), out=str(tmp_path / "x"), candidates=2,
                             num_negatives=2), progress=False)
    with pytest.raises(InputError, match=r"groups=\['finance'\]: index .* has no documents"):
        tune_reranker(config(RerankerTuneConfig, index=str(setup["index"]), out=str(tmp_path / "x"),
                             base=str(setup["base"]), groups=["finance"]), progress=False)
    with pytest.raises(InputError, match="--base nowhere: not a local"):
        tune_reranker(config(RerankerTuneConfig, index=str(setup["index"]), out=str(tmp_path / "x"), base="nowhere"),
                      progress=False)
    with pytest.raises(InputError, match="mode='fuzzy'"):  # a library call: the Python argument
        tune_reranker(config(RerankerTuneConfig, index=str(setup["index"]), out=str(tmp_path / "x"), mode="fuzzy"),
                      progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a reranker; choose a new directory"):
        tune_reranker(config(RerankerTuneConfig, index=str(setup["index"]), out=str(tmp_path / "busy"),
                             base=str(setup["base"])), progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_cli_tune_reranker_then_search_and_eval_with_it(setup, tmp_path):
    out = tmp_path / "rr"
    res = runner.invoke(app, ["tune", "reranker", "--index", str(setup["index"]), "--out", str(out),
                              "--base", str(setup["base"]), "--candidates", "5", "--num-negatives", "2",
                              "--batch-size", "4", "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    assert "+ reranker (top 5)" in res.output and "inverse_cloze" in res.output
    saved = json.loads((out / "hybrid_reranker.json").read_text())
    assert ("do not use it" in res.output) == saved["worse_than_first_stage"]
    assert ("use it: hybrid search" in res.output) != saved["worse_than_first_stage"]
    assert Reranker.load(out).candidates == 5
    res = runner.invoke(app, ["search", "What colour is part 3?", "--index", str(setup["index"]), "--rerank", str(out),
                              "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["hits"]) == 2
    res = runner.invoke(app, ["eval", str(setup["qa"]), "--index", str(setup["index"]), "--only", "retrieval",
                              "--rerank", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rerank"] == str(out)
    res = runner.invoke(app, ["search", "q", "--index", str(setup["index"]), "--rerank", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("error: --rerank") and "hybrid tune reranker" in res.output


def test_pipeline_passages_come_reranked(setup, tiny_llm_dir):
    from hybrid.pipeline import Pipeline

    pipe = Pipeline.load(setup["index"], base_model=str(tiny_llm_dir), k=2, rerank=setup["public"])
    pipe.retriever.reranker.model = Scripted(prefer="Part 7 is")
    assert pipe.retrieve(["Where are spare units of part 2 kept?"])[0][0]["doc_id"] == "part-7"
    with pytest.raises(InputError, match="rerank= needs index_dir="):
        Pipeline.load(None, base_model=str(tiny_llm_dir), rerank=setup["public"])
