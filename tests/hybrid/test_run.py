"""`hybrid init` and `hybrid run`: one file drives the loop; a rerun redoes only what a change touches."""

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hybrid.cli import app
from hybrid.run import STAGE_FILE, fingerprints, init_text, load_loop, run_loop, sections
from core.errors import InputError
from tests.conftest import BUNDLED
from tests.tuning.test_tune_generator import small_qa


@pytest.fixture()
def loop_file(tmp_path, tiny_embedder_dir, tiny_llm_dir, monkeypatch):
    """A loop over the bundled corpus with the tiny models; synth writes fixed bundled questions (the
    teacher is tested in tests/tuning/test_synth.py; here the stage's wiring is the point)."""
    import tuning.synth

    rows = small_qa(tmp_path).read_text()
    calls = []

    def fake_synthesize(cfg, progress=True, log=print):
        calls.append(cfg.out)
        open(cfg.out, "w").write(rows)
        return {}

    monkeypatch.setattr(tuning.synth, "synthesize", fake_synthesize)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(l + "\n" for l in (BUNDLED / "qa.jsonl").read_text().splitlines()[-3:]))
    doc = {"corpus": str(BUNDLED / "docs"), "out": str(tmp_path / "run"), "eval_qa": str(held),
           "stages": ["index", "synth", "generator", "eval"],
           "index": {"embedder": str(tiny_embedder_dir), "chunk_tokens": 96, "overlap": 0},
           "generator": {"base_model": str(tiny_llm_dir), "num_distractors": 1, "val_fraction": 0,
                         "test_fraction": 0, "train": {"max_steps": 1, "grad_accum": 1, "max_length": 1024}},
           "eval": {"base_model": str(tiny_llm_dir), "closed_book": False, "max_new_tokens": 4},
           "tracking": {"backend": "none"}}
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, calls


def test_the_loop_runs_then_skips_what_is_up_to_date_and_redoes_what_a_change_touches(loop_file, tmp_path):
    path, synth_calls = loop_file
    quiet = lambda *_: None
    cfg = load_loop(path)
    assert run_loop(cfg, progress=False, log=quiet) == {s: "ran" for s in ("index", "synth", "generator", "eval")}
    run = tmp_path / "run"
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["configs"]) == {"rag", "rag+raft"} and report["configs"]["rag"]["n"] == 3
    assert (run / "synth" / "qa.jsonl").is_file() and not (run / "synth.partial").exists()
    adapter_mtime = (run / "generator" / "adapter_model.safetensors").stat().st_mtime_ns

    assert set(run_loop(load_loop(path), progress=False, log=quiet).values()) == {"up to date"}
    assert (run / "generator" / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime
    assert len(synth_calls) == 1

    status = run_loop(load_loop(path, ["generator.max_steps=2"]), progress=False, log=quiet)
    assert status == {"index": "up to date", "synth": "up to date", "generator": "ran", "eval": "ran"}
    assert json.loads((run / "generator" / "hybrid_run.json").read_text())["steps"] == 2
    assert len(synth_calls) == 1


def test_fingerprints_follow_the_inputs(loop_file, tmp_path):
    path, _ = loop_file
    cfg = load_loop(path)
    base = fingerprints(cfg, sections(cfg))
    changed = fingerprints(load_loop(path, ["synth.max_chunks=7"]), sections(load_loop(path, ["synth.max_chunks=7"])))
    assert changed["index"] == base["index"] and all(changed[s] != base[s] for s in ("synth", "generator", "eval"))
    held = cfg.eval_qa
    open(held, "a").write("\n")
    after = fingerprints(cfg, sections(cfg))
    assert after["generator"] == base["generator"] and after["eval"] != base["eval"]


def test_loop_config_errors_name_the_key(loop_file, tmp_path):
    path, _ = loop_file
    doc = yaml.safe_load(path.read_text())
    doc["generator"]["lora_rank"] = 8
    doc["synth"] = {"index": "elsewhere"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"synth.index are set by the loop"):
        load_loop(path)
    del doc["synth"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"generator.lora_rank \(did you mean generator.lora_r\?\)"):
        load_loop(path)
    del doc["generator"]["lora_rank"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match="stages: unknown stage 'train'"):
        load_loop(path, ["stages=index,train"])


def test_init_writes_a_file_that_loads_and_cli_run_only(tmp_path, loop_file):
    runner = CliRunner()
    res = runner.invoke(app, ["init", str(tmp_path / "new")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "new" / "hybrid.yaml").read_text()
    # the command line's paths (the working directory's) written relative to the file's folder
    assert text == init_text(os.path.relpath("corpora/brindle/docs", tmp_path / "new"),
                             os.path.relpath("corpora/brindle/qa.jsonl", tmp_path / "new"))
    assert "# Questions offered per chunk. (int)\n  # per_chunk: 1" in text
    cfg = load_loop(tmp_path / "new" / "hybrid.yaml")  # the shipped example is valid as written
    assert cfg.synth.teacher == "qwen2.5-coder-0.5b" and cfg.generator.train.grad_accum == 4
    assert runner.invoke(app, ["init", str(tmp_path / "new")]).exit_code == 2  # never overwritten
    path, _ = loop_file
    res = runner.invoke(app, ["run", str(path), "--only", "index", "-q"])
    assert res.exit_code == 0, res.output
    assert "index: ran" in res.stdout and "generator: skipped" in res.stdout
    assert json.loads((tmp_path / "run" / STAGE_FILE).read_text()).keys() == {"index"}
    res = runner.invoke(app, ["run", str(path), "generator.max_steps"])
    assert res.exit_code == 2 and "use KEY=VALUE" in res.stderr


def test_config_show_says_where_each_value_came_from(loop_file):
    path, _ = loop_file
    res = CliRunner().invoke(app, ["config", "show", str(path), "generator.max_steps=9"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert "generator.train.max_steps: 9  # override" in lines
    assert "index.chunk_tokens: 96  # file" in lines and "index.hnsw_m: 32  # default" in lines
    assert not any(l.startswith(("synth.index:", "eval.adapters:", "generator.train.groups:")) for l in lines)


def test_the_shipped_example_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # its paths are read from its own folder: any working directory will do
    cfg = load_loop(BUNDLED / "hybrid.yaml")
    assert cfg.corpus == str(BUNDLED / "docs") and cfg.out == str(BUNDLED.parents[1] / "runs" / "loop")
    secs = sections(cfg)
    assert cfg.stages == ["index", "synth", "embedder", "probe", "eval"]  # make demo's recipe
    assert secs["probe"].base_model == secs["eval"].base_model == "qwen2.5-coder-0.5b" and secs["probe"].k == 3
    assert secs["eval"].limit == 60 and secs["synth"].max_chunks == 40 and secs["eval"].probe == secs["probe"].out
    assert secs["embedder"].train.groups == cfg.groups


def test_mlflow_holds_each_stage_params_metrics_artifacts_and_scope(loop_file, tmp_path):
    from mlflow import MlflowClient

    path, _ = loop_file
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    cfg = load_loop(path, [f"tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.experiment=t",
                           "stages=index,synth,generator,eval", "groups=hr"])
    run_loop(cfg, progress=False, log=lambda *_: None)
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])}
    assert set(runs) == {"loop", "index", "synth", "generator", "eval"}
    parent = runs["loop"].info.run_id
    assert all(runs[s].data.tags["mlflow.parentRunId"] == parent for s in ("index", "synth", "generator", "eval"))
    assert all(r.data.tags["hybrid.access_scope"] == "hr" for r in runs.values())
    gen, ev = runs["generator"], runs["eval"]
    assert gen.data.params["train.max_steps"] == "1" and gen.data.params["base_model"] == cfg.generator.base_model
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert ev.data.metrics["rag.accuracy"] == report["configs"]["rag"]["accuracy"]
    assert ev.data.metrics["rag_plus_raft.hallucination_rate"] == report["configs"]["rag+raft"]["hallucination_rate"]
    assert [m.step for m in client.get_metric_history(gen.info.run_id, "train_loss.loss")] == [1]
    assert {a.path for a in client.list_artifacts(ev.info.run_id)} >= {"report.md", "chart.png", "params.json"}
    assert "hybrid_run.json" in {a.path for a in client.list_artifacts(gen.info.run_id)}
    # an hr adapter never goes to a store not declared for hr
    with pytest.raises(InputError, match="tracking.log_adapters: .*lacking hr"):
        run_loop(load_loop(path, [f"tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.log_adapters=true",
                                  "groups=hr"]), progress=False, log=lambda *_: None)
    run_loop(load_loop(path, [f"tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.experiment=t",
                              "tracking.log_adapters=true", "tracking.store_groups=[hr]", "groups=hr",
                              "stages=index,synth,generator", "generator.max_steps=2"]), progress=False, log=lambda *_: None)
    latest = max((r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])
                  if r.info.run_name == "generator"), key=lambda r: r.info.start_time)
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(latest.info.run_id, "adapter")}


def test_training_settings_may_sit_at_the_sections_level_and_distributed_is_validated(loop_file, tmp_path):
    import torch

    path, _ = loop_file
    doc = yaml.safe_load(path.read_text())
    doc["generator"]["max_steps"] = 2  # generator.max_steps in the file is generator.train.max_steps
    del doc["generator"]["train"]["max_steps"]
    path.write_text(yaml.safe_dump(doc))
    assert load_loop(path).generator.train.max_steps == 2
    res = CliRunner().invoke(app, ["config", "show", str(path)])
    assert "generator.train.max_steps: 2  # file" in res.stdout.splitlines()
    doc["generator"]["train"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"generator.max_steps given both at generator's level and under generator.train; keep one"):
        load_loop(path)
    with pytest.raises(InputError, match=r"generator.max_steps given both"):  # overrides: the same rule
        load_loop(path, ["generator.max_steps=1", "generator.train.max_steps=2"])
    del doc["generator"]["train"]["max_steps"]
    doc["generator"]["groups"] = ["hr"]  # the loop's groups, hoisted or not
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InputError, match=r"generator.train.groups are set by the loop"):
        load_loop(path)
    del doc["generator"]["groups"]
    path.write_text(yaml.safe_dump(doc))
    cfg = load_loop(path, ["generator.distributed=ddp", "generator.num_processes=2"])
    assert (cfg.generator.train.distributed, cfg.generator.train.num_processes) == ("ddp", 2)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match=r"generator: --distributed fsdp2: shards the model across GPUs"):
            run_loop(load_loop(path, ["generator.distributed=fsdp2"]), progress=False, log=lambda m: None)
        assert not (tmp_path / "run").exists()  # refused before any stage ran


def test_track_on_one_command_logs_what_the_loop_logs_for_its_stage(tmp_path, tiny_embedder_dir, tiny_llm_dir,
                                                                    monkeypatch):
    """`--track mlflow` on `hybrid index` and `hybrid tune generator`: one run each in $MLFLOW_TRACKING_URI,
    read back with MlflowClient; without --track nothing is written. Artifacts lie beside the store the URI
    names, not in the directory the command ran from."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'ml.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cmds")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    runner = CliRunner()
    index = tmp_path / "index"
    res = runner.invoke(app, ["index", str(BUNDLED / "docs"), "--out", str(index), "--embedder", str(tiny_embedder_dir),
                              "--chunk-tokens", "96", "--overlap", "0", "-q", "--track", "mlflow"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["tune", "generator", "--index", str(index), "--qa", str(small_qa(tmp_path)), "--out",
                              str(tmp_path / "gen"), "--base-model", str(tiny_llm_dir), "--max-steps", "2",
                              "--num-distractors", "1", "--val-fraction", "0", "--grad-accum", "1", "--group", "hr",
                              "-q", "--track", "mlflow"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["index", str(BUNDLED / "docs"), "--out", str(index), "--embedder", str(tiny_embedder_dir),
                              "--chunk-tokens", "96", "--overlap", "0", "-q"])  # --track none: the default
    assert res.exit_code == 0, res.output
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("cmds").experiment_id])}
    assert set(runs) == {"index", "generator"}
    manifest = json.loads((index / "manifest.json").read_text())
    assert runs["index"].data.metrics["documents"] == manifest["counts"]["documents"]
    assert runs["index"].data.params["chunk_tokens"] == "96"
    assert "manifest.json" in {a.path for a in client.list_artifacts(runs["index"].info.run_id)}
    assert list((tmp_path / "store" / "mlartifacts").rglob("manifest.json")) and not list((tmp_path / "cwd").iterdir())
    gen = runs["generator"]
    assert gen.data.tags["hybrid.access_scope"] == "hr" and gen.data.params["train.groups"] == '["hr"]'
    assert [m.step for m in client.get_metric_history(gen.info.run_id, "train_loss.loss")] == [1, 2]
    rec = json.loads((tmp_path / "gen" / "hybrid_run.json").read_text())
    assert gen.data.metrics["steps"] == rec["steps"] == 2


def test_dpo_calibrate_and_serve_are_wired_to_the_last_adapter_and_rerun_with_it(loop_file, tmp_path, monkeypatch):
    """The optional stages: dpo on the generator's adapter, calibrate on the last adapter with the
    generator's held-out questions, eval on both adapters, serve on the last one. Their own work is
    tested with their commands; here the stage functions record what the loop hands them."""
    import hybrid.tune_calibrate
    import hybrid.eval
    import hybrid.serve
    import tuning.tune_dpo
    import tuning.tune_generator
    from tuning.abstention import CAL_FILE

    seen = []

    def fake_adapter(cfg, progress=True, log=print):
        seen.append(("dpo" if hasattr(cfg, "beta") else "generator", cfg))
        (tmp_path / "run" / ("dpo" if hasattr(cfg, "beta") else "generator")).mkdir(parents=True, exist_ok=True)
        return {}

    def fake_calibrate(cfg, log=print):
        seen.append(("calibrate", cfg))
        (Path(cfg.adapter) / CAL_FILE).write_text("{}")

    def fake_eval(cfg, progress=True):
        seen.append(("eval", cfg))
        Path(cfg.out, "report.json").write_text(json.dumps({"configs": {}}))

    from pathlib import Path

    monkeypatch.setattr(tuning.tune_generator, "tune_generator", fake_adapter)
    monkeypatch.setattr(tuning.tune_dpo, "tune_dpo", fake_adapter)
    monkeypatch.setattr(hybrid.tune_calibrate, "calibrate", fake_calibrate)
    monkeypatch.setattr(hybrid.eval, "run_eval", fake_eval)
    monkeypatch.setattr(hybrid.serve, "run", lambda cfg, log=print: seen.append(("serve", cfg)))
    path, _ = loop_file
    cfg = load_loop(path, ["stages=index,synth,generator,dpo,calibrate,eval", "dpo.beta=0.2"])
    run = tmp_path / "run"
    status = run_loop(cfg, progress=False, log=lambda m: None)
    assert [k for k, v in status.items() if v == "ran"] == ["index", "synth", "generator", "dpo", "calibrate", "eval"]
    by = dict(seen)
    assert by["dpo"].adapter == str(run / "generator") and by["dpo"].out == str(run / "dpo") and by["dpo"].beta == 0.2
    assert by["dpo"].qa == str(run / "synth" / "qa.jsonl") and by["dpo"].train.groups == cfg.groups
    assert by["calibrate"].adapter == str(run / "dpo") and by["calibrate"].qa == str(run / "generator" / "held_out.jsonl")
    assert by["eval"].adapters == {"raft": str(run / "generator"), "dpo": str(run / "dpo")}
    seen.clear()
    assert run_loop(load_loop(path, ["stages=index,synth,generator,dpo,calibrate,eval", "dpo.beta=0.3"]),
                    progress=False, log=lambda m: None) == {
        "index": "up to date", "synth": "up to date", "generator": "up to date", "dpo": "ran", "calibrate": "ran",
        "eval": "ran"}  # a DPO setting redoes DPO, the threshold beside its adapter, and the eval
    seen.clear()
    status = run_loop(load_loop(path, ["stages=index,synth,generator,dpo,calibrate,eval", "dpo.beta=0.3"]),
                      only=["serve"], progress=False, log=lambda m: None)
    assert status["serve"] == "ran" and [s for s, _ in seen] == ["serve"]
    assert seen[0][1].adapters == {"raft": str(run / "dpo")} and seen[0][1].index == str(run / "index")


def test_the_probe_stage_reads_the_evals_reader_and_feeds_eval_and_serve(loop_file, tmp_path, monkeypatch):
    """The probe recipe as a loop (index, synth, probe, eval): the probe is trained on the synthesised
    questions for the base model the eval's rag answers with, and the eval and the server read it; no
    generator staged, no adapter scored. The probe's own work is tested in tests/tuning/test_probe.py."""
    import hybrid.eval
    import hybrid.serve
    import tuning.tune_probe

    seen = []

    def fake_probe(cfg, progress=True, log=print):
        seen.append(("probe", cfg))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        Path(cfg.out, "hybrid_probe.json").write_text(json.dumps({
            "rows": 40, "held_out_rows": 12, "target_hallucination": 0.2, "minutes": 0.5,
            "held_out": {"hallucination": 0.4, "hallucination_ruled": 0.2, "answered": 0.6},
            "heads": {"answerable": {"layer": 2, "cv_auroc": 0.9}, "right": {"layer": 1, "cv_auroc": 0.7}}}))

    def fake_eval(cfg, progress=True):
        seen.append(("eval", cfg))
        Path(cfg.out, "report.json").write_text(json.dumps({"configs": {}}))

    monkeypatch.setattr(tuning.tune_probe, "tune_probe", fake_probe)
    monkeypatch.setattr(hybrid.eval, "run_eval", fake_eval)
    monkeypatch.setattr(hybrid.serve, "run", lambda cfg, log=print: seen.append(("serve", cfg)))
    path, _ = loop_file
    doc = yaml.safe_load(path.read_text())
    doc["generator"]["base_model"] = "smollm2"  # not staged: the probe reads the eval's reader, not this one
    path.write_text(yaml.safe_dump(doc))
    stages = "stages=index,synth,probe,eval"
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    tracked = ["tracking.backend=mlflow", f"tracking.uri={uri}", "tracking.experiment=p"]
    status = run_loop(load_loop(path, [stages, *tracked]), progress=False, log=lambda m: None)
    assert status == {s: "ran" for s in ("index", "synth", "probe", "eval")}
    reader = yaml.safe_load(path.read_text())["eval"]["base_model"]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    probe_run = next(r for r in client.search_runs([client.get_experiment_by_name("p").experiment_id])
                     if r.info.run_name == "probe")
    assert probe_run.data.metrics["held_out.hallucination_ruled"] == 0.2
    assert probe_run.data.metrics["heads.answerable.cv_auroc"] == 0.9
    assert probe_run.data.tags["hybrid.base_model"] == reader  # the probe's reader, not the generator's default
    assert "hybrid_probe.json" in {a.path for a in client.list_artifacts(probe_run.info.run_id)}
    by, run = dict(seen), tmp_path / "run"
    assert by["probe"].base_model == reader and by["probe"].adapter is None and by["probe"].k == by["eval"].k
    assert (by["probe"].index, by["probe"].qa, by["probe"].out) == (
        str(run / "index"), str(run / "synth" / "qa.jsonl"), str(run / "probe"))
    assert by["eval"].probe == str(run / "probe") and by["eval"].adapters == {}

    seen.clear()  # a probe setting redoes the probe and the eval only
    status = run_loop(load_loop(path, [stages, *tracked, "probe.max_rows=40"]), progress=False, log=lambda m: None)
    assert status == {"index": "up to date", "synth": "up to date", "probe": "ran", "eval": "ran"}
    assert dict(seen)["probe"].max_rows == 40

    seen.clear()
    run_loop(load_loop(path, [stages, *tracked, "probe.max_rows=40"]), only=["serve"], progress=False,
             log=lambda m: None)
    assert seen[0][1].probe == str(run / "probe") and seen[0][1].adapters == {}
    # without the stage, nothing reads a probe
    assert sections(load_loop(path))["eval"].probe is None
    with pytest.raises(InputError, match=r"probe.base_model, probe.k are set by the loop .*reader and k from the eval's"):
        load_loop(path, [stages, "probe.base_model=smollm2", "probe.k=5"])
