"""The launcher: shipped accelerate configs (golden files, TRL's presets), the refused combinations,
the launch command, and a self-launched 2-process embedder run on CPU."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hybrid.cli import app
from training import launch
from training.train_settings import TrainSettings

GOLDEN = Path(__file__).parent / "golden"
KINDS = ("ddp", "fsdp2", "zero2", "zero3")


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_configs_equal_the_golden_files(kind):
    golden = yaml.safe_load((GOLDEN / f"accelerate_{kind}.yaml").read_text())
    assert launch.render(kind, 4, "bf16") == golden
    fp32 = launch.render(kind, 2, "no")
    assert (fp32["num_processes"], fp32["mixed_precision"]) == (2, "no")
    assert {k: v for k, v in fp32.items() if k not in ("num_processes", "mixed_precision")} == \
        {k: v for k, v in golden.items() if k not in ("num_processes", "mixed_precision")}


@pytest.mark.parametrize("kind,preset", [("ddp", "multi_gpu"), ("fsdp2", "fsdp2"), ("zero2", "zero2"), ("zero3", "zero3")])
def test_shipped_configs_are_trls_presets(kind, preset):
    """The shipped files start from TRL's presets; a TRL upgrade that changes them shows up here."""
    import trl

    trl_file = Path(trl.__file__).parent / "accelerate_configs" / f"{preset}.yaml"
    assert yaml.safe_load((launch.CONFIG_DIR / f"{kind}.yaml").read_text()) == yaml.safe_load(trl_file.read_text())


def test_the_engines_are_the_ones_asked_for():
    assert launch.render("fsdp2", 2, "no")["fsdp_config"]["fsdp_version"] == 2
    assert launch.render("zero2", 2, "no")["deepspeed_config"]["zero_stage"] == 2
    z3 = launch.render("zero3", 2, "no")["deepspeed_config"]
    # without the 16-bit gather on save, ZeRO-3 + LoRA writes empty adapters
    assert z3["zero_stage"] == 3 and z3["zero3_save_16bit_model"] is True
    assert launch.render("ddp", 2, "no")["distributed_type"] == "MULTI_GPU"


def _train(**kw) -> TrainSettings:
    return TrainSettings(**kw)


def test_known_broken_combinations_are_refused_with_their_flag():
    full = ("ddp", "fsdp2", "zero2", "zero3")
    gpu = dict(cuda_devices=2)
    assert launch.problems(_train(), allowed=full) == []
    assert launch.problems(_train(distributed="ddp", num_processes=2), allowed=full, cuda_devices=0) == []
    assert launch.problems(_train(distributed="fsdp2", num_processes=2), allowed=full, **gpu) == []
    merge = launch.problems(_train(distributed="fsdp2"), allowed=full, merge=True, **gpu)
    assert len(merge) == 1 and merge[0].startswith("--merge with --distributed fsdp2")
    assert launch.problems(_train(distributed="ddp"), allowed=full, merge=True, **gpu) == []  # DDP holds whole weights
    cpu = launch.problems(_train(distributed="fsdp2", num_processes=2), allowed=full, cuda_devices=0)
    assert any("needs CUDA" in p for p in cpu)
    assert any(p.startswith("--num-processes: on CPU") for p in
               launch.problems(_train(distributed="ddp"), allowed=full, cuda_devices=0))
    assert launch.problems(_train(distributed="ddp", num_processes=4), allowed=full, **gpu) == \
        ["--num-processes 4: this machine has 2 GPU(s)"]
    assert launch.problems(_train(num_processes=2), allowed=full) == \
        ["--num-processes needs --distributed ddp|fsdp2|zero2|zero3"]
    assert launch.problems(_train(distributed="fsdp2"), allowed=("ddp",), **gpu) == \
        ["--distributed fsdp2: not supported by this trainer (supported: ddp)"]
    zero = launch.problems(_train(distributed="zero3"), allowed=full, quantized=True, **gpu)
    if __import__("importlib").util.find_spec("deepspeed") is None:
        assert zero == ["--distributed zero3: DeepSpeed is not installed; pip install deepspeed, or use fsdp2"]


def test_cli_refuses_before_loading_anything(tmp_path):
    res = CliRunner().invoke(app, ["tune", "generator", "--examples", str(tmp_path / "x.jsonl"), "--out",
                                   str(tmp_path / "a"), "--distributed", "fsdp2", "--merge"])
    assert res.exit_code == 2 and "--merge with --distributed fsdp2" in res.output
    import torch

    assert ("needs CUDA" in res.output) == (not torch.cuda.is_available())
    res = CliRunner().invoke(app, ["tune", "judge", "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "j"),
                                   "--distributed", "ddp", "--num-processes", "2"])
    assert res.exit_code == 2 and "--distributed ddp: not supported by this trainer (supported: none)" in res.output
    res = CliRunner().invoke(app, ["tune", "dpo", "--adapter", str(tmp_path), "--index", str(tmp_path), "--qa",
                                   str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "d"), "--distributed", "ddp",
                                   "--num-processes", "2"])
    assert res.exit_code == 2 and "sampled pairs would differ per process" in res.output


def test_launch_command_is_torchrun_on_cpu_and_accelerate_on_cuda(tmp_path, monkeypatch):
    import torch

    train = _train(distributed="ddp", num_processes=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = launch.command("retrieval.tune_embedder", tmp_path / "c.yaml", train, "no", tmp_path)
    assert cpu[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=2" in cpu
    assert cpu[-4:] == ["-m", "retrieval.tune_embedder", "--config", str(tmp_path / "c.yaml")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = launch.command("tuning.tune_generator", tmp_path / "c.yaml", _train(distributed="zero2", num_processes=4),
                         "bf16", tmp_path)
    assert gpu[-4:] == ["-m", "tuning.tune_generator", "--config", str(tmp_path / "c.yaml")]
    assert gpu[1:3] == ["-m", "accelerate.commands.launch"]
    written = yaml.safe_load(Path(gpu[gpu.index("--config_file") + 1]).read_text())
    assert written == yaml.safe_load((GOLDEN / "accelerate_zero2.yaml").read_text())


def test_under_a_launcher_a_run_trains_instead_of_launching_again(monkeypatch):
    train = _train(distributed="ddp", num_processes=2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_PROCESS_ID", raising=False)
    assert launch.should_launch(train) and not launch.should_launch(_train())
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not launch.should_launch(train)


def test_embedder_self_launches_two_processes_and_rank0_writes_one_model(tmp_path, tiny_embedder, monkeypatch):
    """`--distributed ddp --num-processes 2` from one process: torchrun (gloo) runs the same config in two,
    MNRL gathers the in-batch negatives across them, and rank 0 alone writes the model."""
    from retrieval.tune_embedder import EmbedderTuneConfig, tune_embedder
    from retrieval.index import IndexConfig, build_index
    from tests.conftest import write_doc

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = tmp_path / "corpus"
    rows = []
    for i, color in enumerate(["red", "blue", "green", "amber", "violet", "teal", "ochre", "cyan"]):
        write_doc(corpus, f"part-{i}.md", f"Part {i}", f"Part {i} is painted {color}. It weighs {i + 3} kilograms.")
        rows.append({"id": f"c{i}", "question": f"What colour is part {i}?", "answers": [color],
                     "gold_ids": [f"part-{i}"]})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(corpus, tmp_path / "index", IndexConfig(chunk_tokens=64, overlap=0), embedder=tiny_embedder)
    out = tmp_path / "tuned"
    cfg = EmbedderTuneConfig(index=str(tmp_path / "index"), out=str(out), qa=str(qa), test_fraction=0.25)
    cfg.train = TrainSettings(learning_rate=1e-3, batch_size=2, max_steps=2, max_length=64,
                              distributed="ddp", num_processes=2)
    result = tune_embedder(cfg, progress=False)
    assert result.train_steps == 2 and result.config["train"]["distributed"] == "ddp"
    assert (out / "model.safetensors").is_file() and (out / "hybrid_tuning.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tuned")) == ["tuned"]


def test_each_trainer_relaunches_its_own_module_and_the_launcher_names_no_upper_floor(tmp_path, monkeypatch):
    """The launched processes enter at the trainer's module (its `__main__` reads the config file back);
    training/launch.py itself names no module above the training floor."""
    import ast
    import re

    from core.errors import InputError
    from retrieval.tune_embedder import EmbedderTuneConfig
    from tuning.tune_generator import GeneratorTuneConfig

    text = (Path(launch.__file__)).read_text(encoding="utf-8")
    assert not re.search(r"\b(hybrid|tuning|retrieval)\.\w", text)
    started = []
    monkeypatch.setattr(launch, "launch", lambda module, cfg, *a, **k: started.append((module, cfg)) or
                        (_ for _ in ()).throw(InputError("stop")))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("ACCELERATE_PROCESS_ID", raising=False)
    monkeypatch.setattr(launch, "problems", lambda *a, **k: [])
    from retrieval.tune_embedder import tune_embedder
    from tuning.tune_generator import tune_generator

    ddp = _train(distributed="ddp", num_processes=2)
    for tune, cfg in [(tune_generator, GeneratorTuneConfig(out=str(tmp_path / "g"), examples="x.jsonl", train=ddp)),
                      (tune_embedder, EmbedderTuneConfig(index="i", out=str(tmp_path / "e"),
                                                          train=_train(distributed="ddp", num_processes=2,
                                                                       batch_size=2)))]:
        with pytest.raises(InputError, match="stop"):
            tune(cfg, progress=False)
    assert [m for m, _ in started] == ["tuning.tune_generator", "retrieval.tune_embedder"]
    for module, _ in started:  # each ends in the entry the launched processes run
        tree = ast.parse(Path(__import__(module, fromlist=["_"]).__file__).read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body), module
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump(__import__("dataclasses").asdict(started[0][1])))
    back = launch.read_config(GeneratorTuneConfig, config_file)
    assert back == started[0][1] and isinstance(back.train, TrainSettings)
