"""benchmarks/harness.py: the offline environment, --out/--json, and the one result-file format."""

import json
import os

from benchmarks import harness


def test_importing_the_harness_sets_the_offline_environment():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert harness.child_env(OMP_NUM_THREADS="1")["OMP_NUM_THREADS"] == "1"
    assert harness.child_env()["HF_HUB_OFFLINE"] == os.environ["HF_HUB_OFFLINE"]


def test_every_benchmark_parser_has_out_and_json():
    args = harness.parser("doc", out="x").parse_args(["--json"])
    assert (args.out, args.json) == ("x", True)


def test_a_result_file_carries_the_header_and_reads_back(tmp_path):
    path = harness.write_result(tmp_path / "r" / "result.json", "benchmarks.performance.speed", {"ratio": 1.05},
                                argv=["--quick"])
    doc = json.loads(path.read_text())
    assert doc["schema"] == harness.SCHEMA and doc["results"] == {"ratio": 1.05}
    h = doc["header"]
    assert h["command"] == "python -m benchmarks.performance.speed --quick"
    assert set(h["machine"]) == {"cpu", "cpus", "amx_bf16", "avx512_bf16", "gpu", "python"}
    assert h["date"].endswith("+00:00") and "commit" in h and "dirty" in h
    assert harness.read_result(path) == {"ratio": 1.05}


def test_an_older_bare_result_file_reads_as_its_results(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"sft": {"ratio": 1.0}}))
    assert harness.read_result(tmp_path / "old.json") == {"sft": {"ratio": 1.0}}
