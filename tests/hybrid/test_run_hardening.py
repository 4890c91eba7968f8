"""`hybrid run` against hostile input: every bad file, override, flag or store is one `error:` line and
exit 2, before any stage runs, and nothing the user put under `out` is lost.

No model is loaded here: the stages reached are `eval` (its scoring replaced by a stub that writes the
report, as in test_run.py) or none, so each test takes well under a second (the tracking ones: a few)."""

import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hybrid.cli import app
from hybrid.run import STAGE_FILE, LoopConfig, load_loop
from core.errors import InputError
from tests.conftest import BUNDLED


def one_error(res) -> str:
    """The single `error:` line a refused command prints (exit 2, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture()
def eval_loop(tmp_path, monkeypatch):
    """A loop of the eval stage alone over the bundled corpus; the eval writes a stub report."""
    import hybrid.eval

    def fake_eval(cfg, progress=True):
        Path(cfg.out, "report.json").write_text(json.dumps({"configs": {}}))

    monkeypatch.setattr(hybrid.eval, "run_eval", fake_eval)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join((BUNDLED / "qa.jsonl").read_text().splitlines(keepends=True)[:2]))
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump({"corpus": str(BUNDLED / "docs"), "out": str(tmp_path / "run"), "eval_qa": str(qa),
                                    "stages": ["eval"], "tracking": {"backend": "none"}}))
    return path


def run(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


# --- 1. a folder that is not the stage's own ---------------------------------------------------------------

def test_the_eval_stage_refuses_a_folder_it_did_not_write_and_keeps_what_is_in_it(eval_loop, tmp_path):
    eval_dir = tmp_path / "run" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "notes.md").write_text("mine")
    line = one_error(run(eval_loop))
    assert line == (f"error: {eval_dir}: exists and is not the eval stage's output (no report.json in it); "
                    f"move what is in it, or set another 'out'")
    assert (eval_dir / "notes.md").read_text() == "mine" and not (eval_dir / "report.json").exists()
    (eval_dir / "notes.md").unlink()  # an empty folder is anyone's: the stage writes into it
    res = run(eval_loop)
    assert res.exit_code == 0, res.output
    assert json.loads((eval_dir / "report.json").read_text()) == {"configs": {}}


# --- 2. overrides and flags that cannot take effect ---------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["bogus=1"], "error: override: unknown key(s) bogus; known: corpus, out,"),
    (["generator.lora_rank=16"], "error: override: unknown key(s) generator.lora_rank (did you mean generator.lora_r?)"),
    (["generator.max_step=80"], "error: override: unknown key(s) generator.max_step (did you mean generator.max_steps?)"),
    (["..=5"], "error: override '..=5': an empty part in the key; use dotted names, e.g. generator.max_steps=80"),
    (["stages="], "error: override 'stages=': no value; give one (null unsets an optional key)"),
    (["out="], "error: override 'out=': no value; give one"),
    (["stages=,"], "error: stages: names no stage; list the ones to run, e.g. stages=index,synth"),
    (["stages=eval", "stages=index"], "error: override 'stages=index': stages is given twice; keep one"),
    (["groups=['']"], "error: groups: an empty group name in ['']; list group names"),
    (["tracking.uri=''"], "error: tracking.uri: empty; name one, or null for the default"),
    (["--only", ","], "error: --only ',': names no stage; give one or more, e.g. --only index,synth"),
    (["--only", ""], "error: --only '': names no stage"),
    # a stage's setting when that stage does not run would only change fingerprints downstream
    (["generator.max_steps=80"], "error: override generator.max_steps=80: its stage does not run here (stages "
                                 "run: eval); add the stage to --only or stages, or drop the override"),
    (["tracking.run_name=x", "tracking.log_adapters=true"],
     "error: tracking.run_name, tracking.log_adapters: tracking.backend is none, so nothing is tracked"),
    (["eval.gate_threshold=0.3"], "error: eval: --gate-threshold: takes effect only with --gate; drop it"),
])
def test_an_override_that_cannot_take_effect_is_refused(eval_loop, tmp_path, args, expected):
    assert one_error(run(eval_loop, *args)).startswith(expected)
    assert not (tmp_path / "run").exists()  # refused before any stage


def test_an_empty_group_or_path_in_the_file_is_refused_as_in_an_override(eval_loop):
    doc = yaml.safe_load(eval_loop.read_text())
    eval_loop.write_text(yaml.safe_dump({**doc, "groups": [""]}))
    assert "groups: an empty group name" in one_error(run(eval_loop))
    eval_loop.write_text(yaml.safe_dump({**doc, "out": ""}))  # Path("") is the current directory
    assert one_error(run(eval_loop)) == "error: out: empty; name a directory"
    eval_loop.write_text(yaml.safe_dump({**doc, "eval_qa": " "}))
    assert one_error(run(eval_loop)) == "error: eval_qa: empty; name a file of questions, or null to skip the eval stage"


# --- 3. what used to end in a traceback ---------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["synth=5"], "error: override: synth is a section, got 5; set its keys as synth.KEY=VALUE"),
    (["generator=[1,2]"], "error: override: generator is a section, got [1, 2]; set its keys as generator.KEY=VALUE"),
    (["generator=5", "generator.max_steps=3"], "error: override 'generator.max_steps=3': generator is given a value "
                                               "by another override; give the section's keys or the value, not both"),
    (["generator.train=5", "generator.max_steps=3"],  # the hoisted max_steps never silently replaces train=5
     "error: override: generator.train is a section, got 5; set its keys as generator.train.KEY=VALUE"),
])
def test_a_value_where_a_section_belongs_is_one_line(eval_loop, args, expected):
    assert one_error(run(eval_loop, *args)) == expected


@pytest.mark.parametrize("record", ['{"index": "ab', "[1, 2]", '{"eval": 5}', b"\xff\xfe"])
def test_a_damaged_stage_record_is_one_line_and_kept(eval_loop, tmp_path, record):
    out = tmp_path / "run"
    out.mkdir()
    path = out / STAGE_FILE
    path.write_bytes(record if isinstance(record, bytes) else record.encode())
    assert one_error(run(eval_loop)) == (f"error: {path}: not the loop's stage record (a mapping of stage to "
                                         f"fingerprint; truncated or edited?); delete it and every stage runs again")
    assert path.read_bytes() == (record if isinstance(record, bytes) else record.encode())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_store_fails_in_one_line_within_seconds(eval_loop, tmp_path):
    t0 = time.monotonic()
    uri = f"http://127.0.0.1:{closed_port()}"
    line = one_error(run(eval_loop, "tracking.backend=mlflow", f"tracking.uri={uri}"))
    assert line.startswith(f"error: tracking.uri {uri}: cannot reach the tracking server (")
    assert time.monotonic() - t0 < 30  # not minutes of retries
    (tmp_path / "file").write_text("")
    uri = f"sqlite:///{tmp_path}/file/sub/ml.db"  # a directory that cannot be created: a file is in the way
    assert one_error(run(eval_loop, "tracking.backend=mlflow", f"tracking.uri={uri}")).startswith(
        f"error: tracking.uri {uri}: {tmp_path}/file/sub: cannot write there")
    (tmp_path / "notadb.db").write_text("not a database")
    uri = f"sqlite:///{tmp_path}/notadb.db"
    assert one_error(run(eval_loop, "tracking.backend=mlflow", f"tracking.uri={uri}")).startswith(
        f"error: tracking.uri {uri}: the tracking store did not answer as an MLflow store")
    assert not (tmp_path / "run" / "eval").exists()  # no stage ran


def test_track_on_one_command_checks_the_store_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    out = tmp_path / "index"
    res = CliRunner().invoke(app, ["index", str(BUNDLED / "docs"), "--out", str(out), "-q", "--track", "mlflow"])
    assert one_error(res).startswith("error: $MLFLOW_TRACKING_URI http://127.0.0.1:")
    assert not out.exists()  # refused before the index was built, not after
    res = CliRunner().invoke(app, ["eval", str(BUNDLED / "qa.jsonl"), "--index", str(out), "--only", "retrieval",
                                   "--track", "mlflow"])
    assert one_error(res) == ("error: --track mlflow needs --out DIR: the run records the report written there; add "
                              "--out DIR or drop --track")


def test_track_on_a_retrieval_eval_records_its_report(tmp_path, monkeypatch, small_index):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"id": "q1", "question": "How long does the Kestrel buoy battery last?",
                              "answers": ["14 months"], "gold_ids": ["buoys/kestrel"]}) + "\n")
    res = CliRunner().invoke(app, ["eval", str(qa), "--index", str(small_index), "--only",
                                   "retrieval", "--out", str(tmp_path / "rep"), "--track", "mlflow"])
    assert res.exit_code == 0, res.output
    client = MlflowClient(uri)
    (run_,) = client.search_runs([client.get_experiment_by_name("hybrid").experiment_id])
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    name, metrics = next(iter(report["configs"].items()))
    assert run_.data.metrics[f"{name}.mrr@10".replace("@", "_at_")] == metrics["mrr@10"]
    assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {"report.json", "report.md"}


# Each command as a user types it (split on spaces: no argument here holds one).
@pytest.mark.parametrize("command, expected", [
    ("eval qa.jsonl --index i --only retrieval -k 3 --adapter a",
     "error: --adapter, -k: --only retrieval generates nothing and scores every question; drop them"),
    ("eval qa.jsonl --gate-threshold 0.3", "error: --gate-threshold: takes effect only with --gate"),
    ("index docs --out i --index-type flat --hnsw-m 8 --ivf-nlist 4",
     "error: --hnsw-m: --index-type flat builds no HNSW graph; drop it; --ivf-nlist: --index-type flat builds no IVF"),
    ("index docs --out i --index-type hnsw --ann-threshold 5",
     "error: --ann-threshold: --index-type hnsw is used whatever the size; drop it"),
    ("tune generator --examples e.jsonl --out o --p-oracle 0.5",
     "error: --p-oracle: --examples are prepared RAFT examples"),
    ("tune generator --index i --qa q --out o --no-oracle both --p-oracle 0.5",
     "error: --p-oracle: --no-oracle both writes every question with and without its oracle; drop it"),
    ("tune dpo --adapter a --out o --pairs-file p --n-samples 3",
     "error: --n-samples: --pairs-file holds prepared pairs"),
    ("tune dpo --adapter a --out o --index i --qa q --pairs contrastive --temperature 0.7",
     "error: --temperature: --pairs contrastive samples and scores nothing; drop it"),
    ("tune embedder --index i --out o --qa q --eval-qa e --test-fraction 0.3",
     "error: --test-fraction: --eval-qa is the held-out set; drop it"),
    ("tune reranker --index i --out o --qa q --ict-queries-per-chunk 3",
     "error: --ict-queries-per-chunk: --qa gives the training questions; drop it"),
    ("tune judge --pairs p --index i --out o",
     "error: --index: --index is read only to build pairs from --qa; drop it"),
    ("tune calibrate --adapter a --qa q -k 3", "error: -k: -k is the passages retrieved from --index; drop it"),
    ("ask why? --index i --gate-threshold 0.3", "error: --gate-threshold: takes effect only with --judge"),
    ("serve --index i --backend-url http://x/v1", "error: --backend-url: used only with --backend openai"),
])
def test_an_option_that_cannot_take_effect_is_refused_on_every_command(tmp_path, monkeypatch, command, expected):
    monkeypatch.chdir(tmp_path)  # nothing is read or written: refused while the options are checked
    assert one_error(CliRunner().invoke(app, command.split())).startswith(expected)
    assert list(tmp_path.iterdir()) == []


def test_text_that_is_not_utf8_is_refused_naming_the_flag(eval_loop, small_index):
    # argv bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
    res = CliRunner().invoke(app, ["search", "caf\udce9", "--index", str(small_index)])
    assert one_error(res) == "error: QUERY: not valid UTF-8 text; pass UTF-8"
    assert one_error(run(eval_loop, "tracking.experiment=caf\udce9")) == \
        "error: tracking.experiment: not valid UTF-8 text; pass UTF-8"
    eval_loop.write_text(eval_loop.read_text() + 'groups: ["\\udcff"]\n')  # YAML's own escape makes one too
    assert one_error(run(eval_loop)) == "error: --config key groups: not valid UTF-8 text; pass UTF-8"
    assert "gr\\udcffoups (did you mean groups?)" in one_error(run(eval_loop, "gr\udcffoups=1"))


# --- 4. size: an error quotes a bounded value, YAML aliases expand boundedly --------------------------------

def aliased(levels: int, width: int = 9) -> list[str]:
    lines = ["a0: &a0 [" + ", ".join(["xxxxxxxx"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return lines


def test_a_billion_laughs_yaml_is_refused_in_one_short_line(eval_loop):
    bomb = eval_loop.parent / "bomb.yaml"
    bomb.write_text("\n".join(aliased(9)) + "\n")  # ~600 bytes; 9**9 strings once expanded
    line = one_error(CliRunner().invoke(app, ["run", str(bomb)]))
    assert line == (f"error: --config {bomb}: expands to over 100000 values through its aliases (&name / *name); "
                    f"write the values out")
    bomb.write_text("\n".join(aliased(6)) + "\n")  # 9**6 strings: over the bound, yet quick to build without it
    assert one_error(CliRunner().invoke(app, ["run", str(bomb)])) == (
        f"error: --config {bomb}: expands to over 100000 values through its aliases (&name / *name); "
        f"write the values out")
    bomb.write_text("a: &a [*a]\n")
    assert one_error(CliRunner().invoke(app, ["run", str(bomb)])).endswith("refers to itself or nests too deeply; "
                                                                          "write the values out")


def test_an_error_quotes_at_most_80_characters_of_a_value(eval_loop):
    doc = yaml.safe_load(eval_loop.read_text())
    head = yaml.safe_dump({k: v for k, v in doc.items() if k != "tracking"})
    # 9**4 strings through aliases: under the bound, so the file loads, and the wrong type is quoted briefly
    eval_loop.write_text(head + "\n".join(aliased(4)) + "\ntracking: {backend: none, store_groups: *a3}\n")
    line = one_error(run(eval_loop))
    assert line.startswith("error: --config: unknown key(s) a0, a1, a2, a3;")  # the anchors' own keys
    quoted = line.split("tracking.store_groups: expected a list of strings, got ", 1)[1]
    assert quoted.startswith("[[[") and quoted.endswith("...") and len(quoted) <= 80
    eval_loop.write_text(head + "tracking: {backend: none, uri: [" + ", ".join(["y" * 1000] * 100) + "]}\n")
    line = one_error(run(eval_loop))
    quoted = line.split("--config key tracking.uri: expected a string, got ", 1)[1]
    assert quoted.startswith("['yyy") and len(quoted) <= 80


# --- 5. any override: a config or one line -------------------------------------------------------------------

KEYS = ["corpus", "out", "eval_qa", "groups", "stages", "generator", "generator.max_steps", "generator.train",
        "generator.lora_r", "synth", "synth.max_chunks", "eval.k", "tracking.uri", "tracking.backend", "index.embedder"]
ODD = st.sampled_from(["", ".", "..", "\udcff", "\x00", "\n", "é", "日本", " ", "=", "train", "*", "&a"])
segments = st.lists(st.sampled_from(KEYS) | ODD | st.text(max_size=6), min_size=1, max_size=3)
yaml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=2), max_leaves=6)
raw_values = (st.integers(0, 99).map(str) | st.sampled_from(["eval", "index,eval", "hr", "[hr, it]", "none", "null"]) |
              st.text(max_size=12) | ODD | yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True,
                                                                                      width=10**6).strip()))
keys = st.sampled_from(KEYS) | segments.map(".".join)  # half of them real keys: some overrides take effect
pairs = st.lists(st.builds(lambda k, eq, v: k + eq + v, keys, st.sampled_from(["="] * 5 + [""]), raw_values),
                 max_size=3)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs)
def test_any_overrides_give_a_config_or_one_error_line(eval_loop, overrides):
    try:
        cfg = load_loop(eval_loop, overrides)
    except InputError as exc:
        event("refused")
        text = str(exc)
        assert "\n" not in text and "\r" not in text and len(text) <= 2000
        text.encode("utf-8")  # printable on any UTF-8 stderr: no lone surrogate
    else:
        event("a config")
        assert isinstance(cfg, LoopConfig) and cfg.stages and all(isinstance(g, str) and g for g in cfg.groups)
    res = CliRunner().invoke(app, ["config", "show", str(eval_loop), *overrides])  # and end to end
    assert res.exit_code in (0, 2), (res.output, res.exception)
    if res.exit_code == 2:
        one_error(res)
