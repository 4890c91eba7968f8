import json

import pytest

from core.errors import InputError
from core.qa import QARow, load_qa, split_rows


def one_line_file(tmp_path, line: str):
    """A qa.jsonl holding `line` alone: the file the error messages below name."""
    p = tmp_path / "qa.jsonl"
    p.write_text(line + "\n")
    return p


def test_load_and_unanswerable(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"id": "a", "question": "Q?", "answers": ["x"], "gold_ids": ["d"]}) + "\n\n"
                 + json.dumps({"id": "b", "question": "R?", "answers": [],
                               "passages": [{"id": "p", "text": "t"}]}) + "\n")
    rows = load_qa(p)
    assert rows[0].answerable and not rows[1].answerable
    assert rows[1].gold_ids == () and rows[1].passages == ({"id": "p", "text": "t"},)


@pytest.mark.parametrize("line,pattern", [
    ("{", "qa.jsonl:1: not valid JSON"),
    ('{"id": "a", "answers": []}', "'question'"),
    ('{"id": "a", "question": "q", "answers": ["x"], "gold_ids": "d"}', "'gold_ids'"),
    ('{"id": "a", "question": "q", "answers": [], "passages": [{"text": "t"}]}', "'passages'"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, line, pattern):
    with pytest.raises(InputError, match=pattern):
        load_qa(one_line_file(tmp_path, line))


def test_duplicate_ids(tmp_path):
    p = tmp_path / "qa.jsonl"
    row = json.dumps({"id": "a", "question": "q", "answers": []})
    p.write_text(row + "\n" + row + "\n")
    with pytest.raises(InputError, match="qa.jsonl:2: duplicate id 'a'"):
        load_qa(p)


def test_split_is_deterministic_disjoint_and_stable_under_additions():
    rows = [QARow(id=str(i), question="q", answers=("a",)) for i in range(400)]
    train, test = split_rows(rows, 0.25, seed=3)
    assert {r.id for r in train}.isdisjoint({r.id for r in test}) and len(train) + len(test) == 400
    assert 60 < len(test) < 140
    train2, test2 = split_rows(rows + [QARow(id="new", question="q", answers=())], 0.25, seed=3)
    assert {r.id for r in test} <= {r.id for r in test2}
    assert split_rows(rows, 0.25, seed=4)[1] != test


def test_bom_raw_line_separators_and_crlf(tmp_path):
    p = tmp_path / "qa.jsonl"
    rows = [{"id": "a", "question": "one\u2028two\u0085three?", "answers": ["x\u2029y"]}, {"id": "b", "question": "R?", "answers": []}]
    p.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    got = load_qa(p)
    assert [(r.id, r.question, r.answers) for r in got] == [("a", rows[0]["question"], ("x\u2029y",)), ("b", "R?", ())]


@pytest.mark.parametrize("line,pattern", [
    ("[" * 100_000, "qa.jsonl:1: not valid JSON"),
    ('{"id": ' + "1" * 5000 + ', "question": "q", "answers": []}', "qa.jsonl:1: not valid JSON"),
    ('{"id": true, "question": "q", "answers": []}', "qa.jsonl:1: field 'id'"),
])
def test_pathological_lines_are_input_errors(tmp_path, line, pattern):
    with pytest.raises(InputError, match=pattern):
        load_qa(one_line_file(tmp_path, line))


def test_unreadable_qa_file_is_an_input_error(tmp_path, monkeypatch):
    from pathlib import Path

    p = tmp_path / "qa.jsonl"
    p.write_text('{"id": "a", "question": "q", "answers": []}\n')

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 0 does not stop root
    with pytest.raises(InputError, match="cannot read it \\(Permission denied\\)"):
        load_qa(p)
