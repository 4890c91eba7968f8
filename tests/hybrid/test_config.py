"""YAML -> workflow dataclass: any YAML text in, a config or one InputError out, never another exception."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.config import build_config
from core.errors import InputError
from tuning.tune_dpo import DPOTuneConfig
from tuning.tune_generator import GeneratorTuneConfig

import dataclasses

from training.train_settings import TrainSettings

TOP = [f.name for f in dataclasses.fields(DPOTuneConfig) if f.name != "train"] + ["Groups", "x"]
TRAIN = [f.name for f in dataclasses.fields(TrainSettings)] + ["batch", "Learning_rate"]
scalars = st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=6)
mappings = st.builds(lambda top, train, nest: {**top, **({"train": train} if nest else {})},
                     st.dictionaries(st.sampled_from(TOP), values, max_size=4),
                     st.dictionaries(st.sampled_from(TRAIN), values, max_size=4) | values, st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | st.text(alphabet=string.printable, max_size=200))
def test_any_bytes_as_yaml_give_a_config_or_input_error(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    try:
        cfg = build_config(GeneratorTuneConfig, path, {"out": "o", "examples": "e.jsonl"})
    except InputError:
        return
    assert isinstance(cfg.train.learning_rate, (int, float)) and isinstance(cfg.lora_r, int)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mappings)
def test_any_yaml_mapping_gives_a_typed_config_or_input_error(tmp_path, mapping):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    try:
        cfg = build_config(DPOTuneConfig, path, {"adapter": "a", "out": "o", "pairs_file": "p.jsonl"})
    except InputError:
        return
    # whatever got through has the declared types: nothing reaches a trainer as the wrong kind of value
    assert isinstance(cfg.train.max_steps, int) and not isinstance(cfg.train.max_steps, bool)
    assert isinstance(cfg.train.groups, list) and all(isinstance(g, str) and g for g in cfg.train.groups)
    assert cfg.pairs in ("sampled", "contrastive")


def test_scientific_notation_is_a_number_and_a_misspelt_key_gets_a_suggestion(tmp_path):
    import pytest

    path = tmp_path / "c.yaml"
    path.write_text("lora_r: 8\ntrain:\n  learning_rate: 1e-4\n  warmup_ratio: 5E-2\n")  # YAML 1.1 reads these as text
    cfg = build_config(GeneratorTuneConfig, path, {"out": "o", "examples": "e.jsonl"})
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.warmup_ratio == 0.05
    path.write_text("lora_rank: 8\ntrain:\n  learning_rte: 0.001\n  max_steps: 1e3\n")
    with pytest.raises(InputError) as err:
        build_config(GeneratorTuneConfig, path, {"out": "o", "examples": "e.jsonl"})
    msg = str(err.value)
    assert "lora_rank (did you mean lora_r?)" in msg and "train.learning_rte (did you mean train.learning_rate?)" in msg
    assert "train.max_steps: expected an integer, got '1e3'" in msg  # an integer field takes no float text


def test_any_commands_config_refuses_an_alias_bomb_and_text_no_path_holds(tmp_path):
    """The YAML reader and the value checks are the generic layer: every command's --config gets them."""
    import pytest

    path = tmp_path / "c.yaml"
    lines = ["a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 8)]
    path.write_text("\n".join(lines) + "\nlora_r: 8\n")  # 10**8 strings once expanded, 300 bytes as written
    with pytest.raises(InputError) as err:
        build_config(GeneratorTuneConfig, path, {"out": "o", "examples": "e.jsonl"})
    assert str(err.value) == (f"--config {path}: expands to over 100000 values through its aliases (&name / *name); "
                              f"write the values out")
    path.write_text('base_model: "a\\0b"\ntrain: {groups: ["\\udcff"]}\n')
    with pytest.raises(InputError) as err:
        build_config(GeneratorTuneConfig, path, {"out": "o", "examples": "e.jsonl"})
    assert str(err.value) == ("--config key base_model: contains a NUL character; remove it; "
                              "--config key train.groups: not valid UTF-8 text; pass UTF-8")
