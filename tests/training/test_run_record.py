"""The run record, the calibration record: one validated loader each, a one-line error for every malformed one."""

import json

import pytest

from core.errors import InputError
from training import run_record
from tuning.abstention import CAL_FILE, load_calibration


def test_run_record_round_trip_and_fingerprint(tmp_path):
    rec = {"kind": "hybrid-generator-adapter", "base_model": {"name": "tiny", "fingerprint": "ab12"}}
    run_record.write(tmp_path, rec)
    assert run_record.read(tmp_path, "--adapter x") == rec
    first = run_record.fingerprint(tmp_path)
    run_record.write(tmp_path, {**rec, "steps": 3})  # a retrained adapter is another run
    assert run_record.fingerprint(tmp_path) not in (None, first)
    assert run_record.fingerprint(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text,needle", [
    (None, "no hybrid_run.json"),
    ('{"base_model": {"name": "tiny", "finger', "unreadable"),          # truncated
    ("[1, 2]", "lacks base_model.name"),                                # not an object
    ('{"kind": "x"}', "lacks base_model.name"),                        # no base_model
    ('{"base_model": {"name": "tiny"}}', "lacks base_model.name / base_model.fingerprint"),
    ('{"base_model": {"name": 3, "fingerprint": "ab"}}', "lacks base_model.name"),
])
def test_malformed_run_records_are_one_input_error(tmp_path, text, needle):
    if text is not None:
        (tmp_path / run_record.RUN_FILE).write_text(text)
    with pytest.raises(InputError, match=needle) as err:
        run_record.read(tmp_path, "--adapter raft=DIR")
    assert str(err.value).startswith("--adapter raft=DIR: ") and "\n" not in str(err.value)


def test_calibration_record_is_validated_and_tied_to_its_run(tmp_path):
    run_record.write(tmp_path, {"base_model": {"name": "tiny", "fingerprint": "ab"}})
    assert load_calibration(tmp_path) is None  # never calibrated
    for text, needle in [("{oops", "unreadable"), ('{"threshold": "high"}', "numeric threshold"),
                         ('{"threshold": true}', "numeric threshold"), ("[]", "numeric threshold"),
                         ('{"threshold": 1, "auroc": "high"}', "'auroc' must be a number"),
                         ('{"threshold": 1, "auroc": NaN}', "'auroc' must be a number")]:
        (tmp_path / CAL_FILE).write_text(text)
        with pytest.raises(InputError, match=needle):
            load_calibration(tmp_path)
    (tmp_path / CAL_FILE).write_text(json.dumps({"threshold": -1.5, "adapter_run": run_record.fingerprint(tmp_path)}))
    assert load_calibration(tmp_path)["threshold"] == -1.5
    run_record.write(tmp_path, {"base_model": {"name": "tiny", "fingerprint": "cd"}})  # retrained
    with pytest.raises(InputError, match="another training run"):
        load_calibration(tmp_path)


SFT_RECORD = {"kind": "hybrid-generator-adapter", "strategy": "lora", "base_model": {"name": "tiny", "fingerprint": "ab"},
              "config": {"lora_r": 8, "target_modules": "q_proj,v_proj", "train": {"seed": 13}},
              "data": {"held_out_ids": ["q1"]}}


def without(record: dict, dotted: str) -> dict:
    """A deep copy of the record lacking the field at a dotted path."""
    rec = json.loads(json.dumps(record))
    *parents, last = dotted.split(".")
    node = rec
    for key in parents:
        node = node[key]
    del node[last]
    return rec


@pytest.mark.parametrize("record,needle", [
    (without(SFT_RECORD, "data"), "lacks data.held_out_ids (a list of question ids)"),
    ({**SFT_RECORD, "data": "held"}, 'field data must be an object, not "held"'),
    ({**SFT_RECORD, "data": {"held_out_ids": "q1"}}, 'field data.held_out_ids must be a list of question ids, not "q1"'),
    ({**SFT_RECORD, "data": {"held_out_ids": [1]}}, "field data.held_out_ids must be a list of question ids"),
    (without(SFT_RECORD, "strategy"), "lacks strategy"),
    (without(SFT_RECORD, "config"), "lacks config.lora_r"),
    ({**SFT_RECORD, "config": {**SFT_RECORD["config"], "lora_r": True}}, "field config.lora_r must be an integer"),
    (without(SFT_RECORD, "config.target_modules"), "lacks config.target_modules"),
    (without(SFT_RECORD, "config.train.seed"), "lacks config.train.seed"),
    ({**SFT_RECORD, "config": {"lora_r": 8, "target_modules": "q", "seed": "13"}}, "field config.seed must be an integer"),
    ({**SFT_RECORD, "stage": "dpo", "sft_adapter": "runs/raft"}, "a DPO adapter; DPO continues an SFT adapter: pass the "
                                                                  "one it was trained from (runs/raft)"),
])
def test_sft_run_record_read_by_dpo_is_validated_field_by_field(tmp_path, record, needle):
    run_record.write(tmp_path, record)
    with pytest.raises(InputError) as err:
        run_record.read_sft(tmp_path, "--adapter DIR")
    assert str(err.value).startswith("--adapter DIR: ") and needle in str(err.value) and "\n" not in str(err.value)


def test_sft_run_record_of_either_era_is_read(tmp_path):
    run_record.write(tmp_path, SFT_RECORD)
    assert run_record.read_sft(tmp_path, "--adapter DIR") == SFT_RECORD
    older = {**SFT_RECORD, "config": {"lora_r": 8, "target_modules": "q_proj", "seed": 13}}  # before TrainSettings
    run_record.write(tmp_path, older)
    assert run_record.read_sft(tmp_path, "--adapter DIR") == older
