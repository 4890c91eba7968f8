"""The commands table (hybrid/commands.py) is the one list the CLI and `hybrid run` both read."""

import dataclasses

import typer.main

from hybrid.cli import app
from hybrid.commands import COMMANDS
from hybrid.run_config import LoopConfig, WIRED
from hybrid.run_stages import DEFAULT_STAGES, STAGES


def _cli_commands(group, prefix=()) -> dict[str, object]:
    found = {}
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            found.update(_cli_commands(cmd, prefix + (name,)))
        else:
            found[" ".join(prefix + (name,))] = cmd
    return found


def test_every_cli_command_is_a_row_of_the_table_and_in_its_order():
    cli = _cli_commands(typer.main.get_command(app))
    # Typer lists a group's own commands before its subgroups' (tune ..., config show)
    assert list(cli) == [n for n in COMMANDS if " " not in n] + [n for n in COMMANDS if " " in n]
    for name, row in COMMANDS.items():  # a row with a config dataclass reads it from --config YAML too
        assert any("--config" in p.opts for p in cli[name].params) == (row.config is not None), name


def test_every_row_names_a_function_that_exists():
    for row in COMMANDS.values():
        assert callable(row.function()), row.runs


def test_the_loop_s_sections_are_its_stages_commands_configs_in_order():
    example = LoopConfig(corpus="c")
    sections = {f.name: type(getattr(example, f.name)) for f in dataclasses.fields(LoopConfig)
                if dataclasses.is_dataclass(getattr(example, f.name)) and f.name != "tracking"}
    assert list(sections) == [s.name for s in STAGES]
    assert all(sections[s.name] is s.command.config for s in STAGES)
    assert DEFAULT_STAGES == ("index", "synth", "embedder", "generator", "eval")
    assert set(WIRED) == {s.name for s in STAGES} - {"index"}  # the index stage reads the corpus, set by no path


def test_a_stage_calls_its_command_s_function(monkeypatch):
    import tuning.tune_dpo

    seen = []
    monkeypatch.setattr(tuning.tune_dpo, "tune_dpo", lambda cfg, progress, log: seen.append((cfg, progress, log)))
    dpo = next(s for s in STAGES if s.name == "dpo")
    dpo.run(LoopConfig(corpus="c"), "section", progress=False, log=print)
    assert seen == [("section", False, print)]
