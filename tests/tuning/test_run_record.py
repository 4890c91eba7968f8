"""The run record, the calibration record: one validated loader each, a one-line error for every malformed one."""

import json

import pytest

from retrieval.errors import InputError
from tuning import run_record
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
                         ('{"threshold": true}', "numeric threshold"), ("[]", "numeric threshold")]:
        (tmp_path / CAL_FILE).write_text(text)
        with pytest.raises(InputError, match=needle):
            load_calibration(tmp_path)
    (tmp_path / CAL_FILE).write_text(json.dumps({"threshold": -1.5, "adapter_run": run_record.fingerprint(tmp_path)}))
    assert load_calibration(tmp_path)["threshold"] == -1.5
    run_record.write(tmp_path, {"base_model": {"name": "tiny", "fingerprint": "cd"}})  # retrained
    with pytest.raises(InputError, match="another training run"):
        load_calibration(tmp_path)
