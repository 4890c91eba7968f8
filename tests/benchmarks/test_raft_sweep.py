import json

import pytest

from benchmarks.experiments.raft_sweep import choose, recipe, selection_rows


def _cfg(acc: float, halluc: float) -> dict:
    return {"accuracy_answerable": acc, "hallucination_rate": halluc}


def test_choose_takes_the_lowest_hallucination_inside_the_accuracy_floor():
    configs = {"rag": _cfg(0.80, 0.40), "rag+a": _cfg(0.76, 0.30), "rag+b": _cfg(0.74, 0.10), "rag+c": _cfg(0.90, 0.35)}
    # floor 0.75: b (0.74) is out however low its hallucination; a beats c
    assert choose(configs, 0.05) == "rag+a"
    # a wider floor lets b in
    assert choose(configs, 0.10) == "rag+b"


def test_choose_keeps_the_untuned_reader_on_a_tie_or_when_no_adapter_is_inside():
    assert choose({"rag": _cfg(0.8, 0.3), "rag+a": _cfg(0.8, 0.3)}, 0.05) == "rag"
    assert choose({"rag": _cfg(0.8, 0.3), "rag+a": _cfg(0.5, 0.0)}, 0.05) == "rag"


def _adapter(tmp_path, name: str, held: list[str], qa: str) -> tuple[str, object]:
    d = tmp_path / name
    d.mkdir()
    rec = {"config": {"train": {"learning_rate": 1e-4, "max_steps": 10, "seed": 13}, "p_oracle": 0.8,
                      "no_oracle": "abstain", "qa": qa},
           "steps": 10, "minutes": 1.0, "final_val_loss": 0.1, "data": {"held_out_ids": held}}
    (d / "hybrid_run.json").write_text(json.dumps(rec))
    (d / "held_out.jsonl").write_text("".join(json.dumps({"id": i, "question": f"q {i}?", "answers": ["x"],
                                                           "gold_ids": ["doc"]}) + "\n" for i in held))
    return name, d


def _rows(adapters, synth):
    return selection_rows(adapters, {n: recipe(d) for n, d in adapters.items()}, synth)


def _synth(tmp_path):
    rows = [{"id": "s:a#0:0", "question": "asked?", "answers": ["y"], "gold_ids": ["doc"], "synth": {"kind": "answerable"}},
            {"id": "s:a#0:u", "question": "never said?", "answers": [], "gold_ids": [], "groups": [],
             "synth": {"kind": "unanswerable"}}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_selection_rows_are_the_shared_held_out_rows_and_the_synthesised_unanswerables(tmp_path):
    synth = _synth(tmp_path)
    adapters = dict([_adapter(tmp_path, "a", ["h1", "h2"], str(tmp_path / "answerable.jsonl")),
                     _adapter(tmp_path, "b", ["h2", "h1"], str(tmp_path / "answerable.jsonl"))])
    rows = _rows(adapters, synth)
    assert [r["id"] for r in rows] == ["h1", "h2", "s:a#0:u"]
    assert rows[-1] == {"id": "s:a#0:u", "question": "never said?", "answers": [], "gold_ids": []}


def test_selection_rows_refuse_adapters_that_held_out_different_rows(tmp_path, capsys):
    synth = _synth(tmp_path)
    adapters = dict([_adapter(tmp_path, "a", ["h1", "h2"], "x.jsonl"), _adapter(tmp_path, "b", ["h1", "h3"], "x.jsonl")])
    with pytest.raises(SystemExit) as e:
        _rows(adapters, synth)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: the adapters held out different rows")


def test_selection_rows_refuse_the_file_the_adapters_trained_on(tmp_path, capsys):
    synth = _synth(tmp_path)
    adapters = dict([_adapter(tmp_path, "a", ["h1"], str(synth))])
    with pytest.raises(SystemExit) as e:
        _rows(adapters, synth)
    assert e.value.code == 2 and "is the file the adapters trained on" in capsys.readouterr().err
