"""Access control survives fine-tuning: a canary planted in an `hr` document (tests/conftest.py)
never reaches training files or artifacts unless the trainer names `hr`, and hr-tagged
artifacts are refused to callers without `hr` everywhere they can be loaded."""

from tests.conftest import config
import json

import pytest

from core.errors import InputError
from tests.conftest import make_small_corpus
from tests.hybrid.test_cli import assert_clean_error, run
from tuning.tune_generator import GeneratorTuneConfig, tune_generator

CANARY = "SECRET-HR"  # only in the hr-only document (so is the answer 61000)
ROWS = [
    {"id": "k", "question": "How long does the Kestrel buoy battery last?", "answers": ["14 months"], "gold_ids": ["buoys/kestrel"]},
    {"id": "o", "question": "How long does the Osprey buoy battery last?", "answers": ["9 months"], "gold_ids": ["buoys/osprey"]},
    {"id": "of", "question": "When does the office open?", "answers": ["8 am"], "gold_ids": ["office"]},
    {"id": "s", "question": "Which extension reaches support?", "answers": ["4411"], "gold_ids": ["support"]},
    {"id": "hr1", "question": "What does salary band L3 pay?", "answers": ["61000"], "gold_ids": ["salaries"]},
    {"id": "u", "question": "Who chairs the board?", "answers": [], "gold_ids": []},
]


def artifact_text(d):
    """Every text file an artifact dir holds (training files, run record, tokenizer...)."""
    return "".join(p.read_text(errors="ignore") for p in sorted(d.rglob("*")) if p.suffix in (".json", ".jsonl", ".txt"))


@pytest.fixture(scope="module")
def acl(tmp_path_factory, tiny_embedder, tiny_llm_dir):
    from retrieval.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("acl")
    build_index(make_small_corpus(root / "corpus"), root / "index", IndexConfig(chunk_tokens=64, overlap=8),
                embedder=tiny_embedder)
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def tune(out, **kw):
        cfg = config(GeneratorTuneConfig, index=str(root / "index"), qa=str(qa), out=str(root / out), base_model=str(tiny_llm_dir),
                                  max_steps=1, num_distractors=3, p_oracle=1.0, test_fraction=0.0, val_fraction=0.0,
                                  grad_accum=1, **kw)
        return tune_generator(cfg, progress=False, log=lambda *_: None)

    rec_public = tune("public")
    rec_hr = tune("hr", groups=["hr"], merge=True)
    return {"root": root, "index": root / "index", "qa": qa, "public": root / "public", "hr": root / "hr",
            "rec_public": rec_public, "rec_hr": rec_hr}


def test_default_training_never_sees_restricted_text(acl):
    assert CANARY not in artifact_text(acl["public"]) and "61000" not in artifact_text(acl["public"])
    assert acl["rec_public"].record["access"] == {"scope": "public"} and acl["rec_public"].record["data"]["skipped_restricted"] == 1
    assert json.loads((acl["public"] / "hybrid_access.json").read_text()) == {"scope": "public"}
    examples = [json.loads(l) for l in (acl["public"] / "raft_train.jsonl").read_text().splitlines()]
    assert {e["id"] for e in examples} == {"k", "o", "of", "s", "u"}
    assert all(e["groups"] == [] for e in examples)
    assert not any(c.startswith(("salaries#", "budget#")) for e in examples for c in e["chunk_ids"])


def test_named_group_enters_training_and_tags_adapter_and_merged_model(acl):
    text = (acl["hr"] / "raft_train.jsonl").read_text()
    assert CANARY in text
    assert acl["rec_hr"].record["access"] == {"scope": ["hr"], "groups_seen": ["hr"]}
    for d in (acl["hr"], acl["hr"] / "merged"):
        assert json.loads((d / "hybrid_access.json").read_text())["scope"] == ["hr"]
    examples = {e["id"]: e for e in map(json.loads, (acl["hr"] / "raft_train.jsonl").read_text().splitlines())}
    assert "hr" in examples["hr1"]["groups"]
    # Distractors mined for public examples never come from restricted chunks, even with --group hr.
    for qid in ("k", "o", "of", "s", "u"):
        assert examples[qid]["groups"] == []
        assert not any(c.startswith(("salaries#", "budget#")) for c in examples[qid]["chunk_ids"])
    # finance/security chunks stay out: hr does not open them.
    assert "SECRET-FIN" not in text


def test_refusals_in_library_api_multi_adapter_and_merge(acl):
    from hybrid.pipeline import Pipeline

    with pytest.raises(InputError, match=r"adapters=\{'hr': .*access group\(s\) hr; the caller lacks hr \(pass groups=\['hr'\]"):
        Pipeline.load(acl["index"], adapters={"hr": str(acl["hr"])}, max_new_tokens=4)
    with pytest.raises(InputError, match="base_model='.*merged.*lacks hr"):
        Pipeline.load(acl["index"], base_model=str(acl["hr"] / "merged"), max_new_tokens=4)
    pipe = Pipeline.load(acl["index"], adapters={"pub": str(acl["public"]), "hr": str(acl["hr"])}, groups=["hr"],
                         max_new_tokens=4)
    # Allowed calls go through retrieval and generation (the hr caller also sees the hr chunk).
    hits = pipe.ask("What does salary band L3 pay?", groups=["hr"], adapter="hr", k=50).passages  # all it may see
    assert "salaries" in {p["doc_id"] for p in hits} and "budget" not in {p["doc_id"] for p in hits}
    assert pipe.ask("When does the office open?", adapter="pub").raw  # public adapter, public caller
    with pytest.raises(InputError, match="adapter='hr': .*lacks hr"):
        pipe.ask("When does the office open?", adapter="hr")  # a public call through the switch
    with pytest.raises(InputError, match="lacks hr"):
        pipe.answer("q", [{"text": "t"}], adapter="hr", groups=[])
    merged = Pipeline.load(acl["index"], base_model=str(acl["hr"] / "merged"), groups=["hr"], max_new_tokens=4)
    with pytest.raises(InputError, match="base_model=: .*lacks hr"):
        merged.ask("When does the office open?")


def test_refusals_in_cli_ask_eval_and_dpo(acl, tmp_path):
    hr = acl["hr"]
    assert_clean_error(run("ask", "When does the office open?", "--index", acl["index"], "--adapter", f"hr={hr}"),
                       "--adapter hr=", "lacks hr")
    assert_clean_error(run("eval", acl["qa"], "--index", acl["index"], "--adapter", f"hr={hr}", "--no-closed-book"),
                       "--adapter hr=", "lacks hr")
    assert_clean_error(run("tune", "dpo", "--index", acl["index"], "--qa", acl["qa"], "--adapter", hr,
                           "--out", tmp_path / "dpo"), "lacks hr")
    res = run("ask", "When does the office open?", "--index", acl["index"], "--adapter", f"hr={hr}", "--group", "hr",
              "--max-new-tokens", 4, "--json")
    assert res.exit_code == 0, res.output


def test_dpo_default_is_public_and_named_groups_tag_it(acl, tmp_path):
    from tuning.tune_dpo import DPOTuneConfig, tune_dpo

    def dpo(adapter, out, **kw):
        cfg = config(DPOTuneConfig, index=str(acl["index"]), qa=str(acl["qa"]), adapter=str(adapter), out=str(tmp_path / out),
                            n_samples=2, max_new_tokens=6, num_distractors=2, max_steps=1, grad_accum=1,
                            test_fraction=0.0, p_oracle=1.0, **kw)
        return tune_dpo(cfg, progress=False, log=lambda *_: None)

    # The wrong-answer source guarantees pairs whatever the random model samples.
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"id": r["id"], "wrong_answer": "forty goats"}) + "\n" for r in ROWS))
    rec = dpo(acl["public"], "dpo_public", wrong_answers=str(wrong))
    assert rec.record["access"] == {"scope": "public"} and CANARY not in artifact_text(tmp_path / "dpo_public")
    rec = dpo(acl["hr"], "dpo_hr", wrong_answers=str(wrong), groups=["hr"])
    assert rec.record["access"]["scope"] == ["hr"] and CANARY in (tmp_path / "dpo_hr" / "dpo_pairs.jsonl").read_text()
    pairs = [json.loads(l) for l in (tmp_path / "dpo_hr" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert {p["id"]: p["groups"] for p in pairs}["hr1"] == ["hr"]  # each pair records its chunks' groups
    assert all(p["groups"] == [] for p in pairs if p["id"] != "hr1")


def test_tuned_embedder_is_tagged_and_its_index_refuses_public_callers(acl, tmp_path, tiny_embedder):
    from retrieval.embedder import load_embedder
    from retrieval.tune_embedder import EmbedderTuneConfig, tune_embedder
    from retrieval.index import IndexConfig, build_index
    from retrieval.retriever import Retriever

    base = dict(index=str(acl["index"]), qa=str(acl["qa"]), test_fraction=0.3, batch_size=2, max_steps=1, mine_range=3)
    res = tune_embedder(config(EmbedderTuneConfig, out=str(tmp_path / "emb_pub"), **base), progress=False)
    assert res.access == {"scope": "public"} and CANARY not in artifact_text(tmp_path / "emb_pub")
    assert (tmp_path / "emb_pub" / "train_pairs.jsonl").read_text()  # the checked text includes the pairs
    res = tune_embedder(config(EmbedderTuneConfig, out=str(tmp_path / "emb_hr"), groups=["hr"], **base), progress=False)
    assert res.access["scope"] == ["hr"]
    pairs = [json.loads(l) for l in (tmp_path / "emb_hr" / "train_pairs.jsonl").read_text().splitlines()]
    assert all(p["groups"] == (["hr"] if p["chunk_id"].startswith("salaries#") else []) for p in pairs)
    build_index(acl["root"] / "corpus", tmp_path / "idx", IndexConfig(chunk_tokens=64, overlap=8),
                embedder=load_embedder(str(tmp_path / "emb_hr")))
    r = Retriever.load(tmp_path / "idx")
    with pytest.raises(InputError, match="embedder .*lacks hr"):
        r.search("office hours")
    assert r.search("office hours", groups=["hr"])
