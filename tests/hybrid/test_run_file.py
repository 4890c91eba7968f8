"""hybrid.yaml as a file that means one thing: its relative paths read from its own folder, `config
show` labelling each key truthfully, and the MLflow parent run holding the resolved file.

No model is loaded: the loop runs the eval stage alone, its scoring replaced by a stub that writes
the report (as in test_loop_hardening.py)."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hybrid.cli import app
from hybrid.run import load_loop, provenance
from hybrid.run_config import MODEL_KEYS, PATH_KEYS, WIRED, LoopConfig, keys
from tests.conftest import BUNDLED


@pytest.fixture()
def mine(tmp_path, monkeypatch):
    """tmp/mine/hybrid.yaml naming its documents and questions relative to itself; the working
    directory is another folder, tmp/elsewhere."""
    import hybrid.eval

    def fake_eval(cfg, progress=True):
        Path(cfg.out, "report.json").write_text(json.dumps({"configs": {}}))

    monkeypatch.setattr(hybrid.eval, "run_eval", fake_eval)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "docs").symlink_to(BUNDLED / "docs")
    (folder / "qa.jsonl").write_text("".join((BUNDLED / "qa.jsonl").read_text().splitlines(keepends=True)[:2]))
    (folder / "hybrid.yaml").write_text(yaml.safe_dump({
        "corpus": "docs", "eval_qa": "qa.jsonl", "stages": ["eval"], "tracking": {"backend": "none"},
        "index": {"embedder": "minilm"}, "generator": {"base_model": "models/gen"}}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return folder


def show(*args) -> dict[str, str]:
    res = CliRunner().invoke(app, ["config", "show", *map(str, args)])
    assert res.exit_code == 0, res.output
    return dict(line.split(": ", 1) for line in res.stdout.splitlines())


# --- 1. relative paths: the file's folder; the command line's: the working directory --------------------

def test_relative_paths_in_the_file_are_read_from_its_folder(mine, tmp_path):
    res = CliRunner().invoke(app, ["run", "../mine/hybrid.yaml"])
    assert res.exit_code == 0, res.output
    assert (mine / "run" / "eval" / "report.json").is_file()  # out's default, `run`, beside the file
    assert not (tmp_path / "elsewhere" / "run").exists()
    rows = show("../mine/hybrid.yaml")
    assert rows["corpus"] == f'"{mine / "docs"}"  # file' and rows["eval_qa"] == f'"{mine / "qa.jsonl"}"  # file'
    assert rows["out"] == f'"{mine / "run"}"  # default'
    assert rows["index.embedder"] == '"minilm"  # file'  # a packaged model's name is not a path
    assert rows["generator.base_model"] == f'"{mine / "models" / "gen"}"  # file'
    # an override is typed on the command line: read from the working directory; an absolute path is kept
    rows = show("../mine/hybrid.yaml", "out=o2", f"eval_qa={mine / 'qa.jsonl'}", "tracking.backend=mlflow",
                "tracking.uri=sqlite:///ml.db")
    assert rows["out"] == f'"{tmp_path / "elsewhere" / "o2"}"  # override'
    assert rows["eval_qa"] == f'"{mine / "qa.jsonl"}"  # override'
    assert rows["tracking.uri"] == f'"sqlite:///{tmp_path / "elsewhere" / "ml.db"}"  # override'
    doc = yaml.safe_load((mine / "hybrid.yaml").read_text())
    doc["out"], doc["tracking"] = "../runs/x", {"backend": "mlflow", "uri": "sqlite:///ml.db"}
    (mine / "hybrid.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_loop(mine / "hybrid.yaml")
    assert cfg.out == str(tmp_path / "runs" / "x") and cfg.tracking.uri == f"sqlite:///{mine / 'ml.db'}"


def test_every_path_key_is_resolved():
    """A key whose help speaks of a file, folder or dir is in PATH_KEYS or MODEL_KEYS: a new path key
    left out would be read from the working directory again."""
    hinted = {".".join(here) for here, _ in keys(LoopConfig(corpus="c")) if _text(here)
              and any(w in _help(here).lower() for w in (" dir", "file", "folder", "directory", "jsonl", "yaml"))}
    assert hinted - {"eval.shard"} <= set(PATH_KEYS) | set(MODEL_KEYS)  # shard: I/N, its help names --merge's dirs


def _field(here: list[str]):
    from hybrid.config import _hints

    cls, found = LoopConfig, None
    for k in here:
        found = (next(x for x in dataclasses.fields(cls) if x.name == k), _hints(cls)[k])
        cls = found[1]
    return found


def _help(here: list[str]) -> str:
    return _field(here)[0].metadata.get("help", "")


def _text(here: list[str]) -> bool:
    from hybrid.config import _strip_optional

    return _strip_optional(_field(here)[1])[0] in (str, list[str])


# --- 2. default | file | override: what the file holds is what its author wrote ---------------------------

def test_config_show_labels_file_only_what_the_file_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(BUNDLED.parents[1])  # init's default corpus: the bundled one
    res = CliRunner().invoke(app, ["init", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    path = tmp_path / "new" / "hybrid.yaml"
    rows = show(path)
    assert {k for k, v in rows.items() if not v.endswith("# default")} == {"corpus", "eval_qa"}
    text = path.read_text()
    assert "  # hnsw_m: 32\n" in text and "    # max_steps: " in text
    # written down at the default's value, a key is the file's: it stays when hybrid's default changes
    path.write_text(text.replace("  # hnsw_m: 32\n", "  hnsw_m: 32\n").replace("    # max_steps: ", "    max_steps: "))
    rows = show(path, "index.chunk_tokens=64")
    assert rows["index.hnsw_m"] == "32  # file" and rows["generator.train.max_steps"].endswith("# file")
    assert rows["index.chunk_tokens"] == "64  # override" and rows["index.overlap"].endswith("# default")
    assert [(k, v) for k, v, where in provenance(path) if where == "file"][:3] == [
        ("corpus", str(BUNDLED / "docs")), ("eval_qa", str(BUNDLED / "qa.jsonl")), ("index.hnsw_m", 32)]


def test_a_section_left_empty_is_empty(tmp_path):
    (tmp_path / "hybrid.yaml").write_text(f"corpus: {BUNDLED / 'docs'}\nindex:\ngenerator:\n  train:\n")
    assert load_loop(tmp_path / "hybrid.yaml").generator == LoopConfig(corpus="c").generator


# --- 3. the parent run: the resolved file, hybrid's version, none when nothing ran ------------------------

def test_the_parent_run_holds_the_resolved_file_and_version_and_nothing_ran_means_no_run(mine, tmp_path):
    from mlflow import MlflowClient

    import hybrid

    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    args = ["run", "../mine/hybrid.yaml", "tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.experiment=t"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("t").experiment_id
    parent = next(r for r in client.search_runs([experiment]) if r.info.run_name == "loop")
    assert parent.data.tags["hybrid.version"] == hybrid.__version__
    assert res.stderr.splitlines()[-1] == (f"tracked: MLflow run {parent.info.run_id} (experiment t); see it: "
                                           f"mlflow ui --backend-store-uri {uri}")
    saved = Path(client.download_artifacts(parent.info.run_id, "hybrid.yaml", str(tmp_path)))
    assert load_loop(saved) == load_loop(mine / "hybrid.yaml", args[2:])  # the file `hybrid run` takes back
    assert yaml.safe_load(saved.read_text())["corpus"] == str(mine / "docs")

    res = CliRunner().invoke(app, args)  # every stage up to date: no new run, and it says so
    assert res.exit_code == 0 and "eval: up to date" in res.output
    assert len(client.search_runs([experiment])) == 2  # loop + eval, from the first run only
    assert res.stderr.splitlines()[-1] == "tracking: every stage was up to date; no MLflow run was recorded"


def test_a_password_in_the_tracking_uri_is_not_copied_into_the_store(mine):
    from hybrid.run_config import resolved_yaml

    cfg = load_loop(mine / "hybrid.yaml", ["tracking.backend=mlflow", "tracking.uri=postgresql://me:s3cret@db/ml"])
    text = resolved_yaml(cfg)
    assert "s3cret" not in text and "postgresql://me:***@db/ml" in text
    assert set(WIRED["eval"]).isdisjoint(yaml.safe_load(text)["eval"])  # the loop's own paths are not the file's


def test_a_run_folder_moved_with_its_file_keeps_its_fingerprints(tmp_path):
    """Paths are absolute once read, so the fingerprints write the run folder's own path as OUT: the same
    hybrid.yaml in another folder (a project moved or renamed) still finds every stage up to date."""
    from hybrid.run import fingerprints, sections

    prints = []
    for name in ("before", "after"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "docs").symlink_to(BUNDLED / "docs")
        (folder / "qa.jsonl").write_bytes((BUNDLED / "qa.jsonl").read_bytes())
        (folder / "hybrid.yaml").write_text("corpus: docs\neval_qa: qa.jsonl\nstages: [index, synth, embedder, "
                                            "generator, dpo, calibrate, eval]\n")
        cfg = load_loop(folder / "hybrid.yaml")
        prints.append(fingerprints(cfg, sections(cfg)))
    assert prints[0] == prints[1]
