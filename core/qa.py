"""The QA file format shared by every stage (JSONL, one question a line).

    {"id": str, "question": str, "answers": [str], "gold_ids": [doc id]?,
     "passages": [{"id": str, "title": str?, "text": str}]?, "groups": [group]?, "reason": str?}

`answers: []` marks an unanswerable question (the right behaviour is to
abstain). `gold_ids` are document ids, used for retrieval metrics and as RAFT
oracles. `passages`, when present, is a fixed context. `groups` are the access groups of the
text a question was written from (`hybrid synth` sets them; a trainer without those groups skips
the row). `reason`, when present, is a teacher's chain of thought quoting the gold chunk, which
RAFT's chain-of-thought target uses instead of the extracted sentence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError


@dataclass(frozen=True)
class QARow:
    id: str
    question: str
    answers: tuple[str, ...]
    gold_ids: tuple[str, ...] = ()
    passages: tuple[dict, ...] | None = None
    groups: tuple[str, ...] = ()
    reason: str = ""
    source_chunk: str = ""  # hybrid synth's provenance: the chunk the question was written from

    @property
    def answerable(self) -> bool:
        return bool(self.answers)


def load_qa(path: str | Path) -> list[QARow]:
    """Read and validate a QA file.

    Raises:
        InputError: naming `file:line` and the field for any malformed row.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"QA file {path} does not exist; pass a JSONL file of questions")
    rows, seen = [], {}
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a BOM from an editor is not part of line 1
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save the QA file as UTF-8 JSONL") from None
    except OSError as exc:
        raise InputError(f"QA file {path}: cannot read it ({exc.strerror}); pass a readable JSONL file") from None
    # Lines end at "\n" only: splitlines() would also cut at U+2028/U+0085, which JSON strings may hold raw.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        except (ValueError, RecursionError):  # a number over Python's digit limit, absurd nesting
            raise InputError(f"{where}: not valid JSON (a number too long or nesting too deep); each line must "
                             f"be one JSON object") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: each line must be a JSON object")
        qid, question, answers = obj.get("id"), obj.get("question"), obj.get("answers")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
            raise InputError(f"{where}: field 'id' must be a non-empty string")
        qid = str(qid)
        if qid in seen:
            raise InputError(f"{where}: duplicate id {qid!r} (first at line {seen[qid]}); ids must be unique")
        seen[qid] = lineno
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{where}: field 'question' must be a non-empty string")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise InputError(f"{where}: field 'answers' must be a list of strings ([] = unanswerable)")
        gold = obj.get("gold_ids", [])
        if gold is None:
            gold = []
        if not isinstance(gold, list) or not all(isinstance(g, str) for g in gold):
            raise InputError(f"{where}: field 'gold_ids' must be a list of document ids")
        passages = obj.get("passages")
        if passages is not None:
            if not isinstance(passages, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                         and isinstance(p.get("id"), (str, int)) for p in passages):
                raise InputError(f"{where}: field 'passages' must be a list of {{\"id\", \"title\"?, \"text\"}} objects")
            passages = tuple(passages)
        groups = obj.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise InputError(f"{where}: field 'groups' must be a list of access group names ([] = public)")
        reason = obj.get("reason") or ""
        if not isinstance(reason, str):
            raise InputError(f"{where}: field 'reason' must be a string")
        source = obj.get("source_chunk") or ""
        if not isinstance(source, str):
            raise InputError(f"{where}: field 'source_chunk' must be a chunk id string")
        rows.append(QARow(id=qid, question=question.strip(), answers=tuple(a for a in answers if a.strip()),
                          gold_ids=tuple(gold), passages=passages, groups=tuple(groups), reason=reason.strip(),
                          source_chunk=source))
    if not rows:
        raise InputError(f"QA file {path} holds no questions")
    return rows


def split_rows(rows: list[QARow], test_fraction: float, seed: int) -> tuple[list[QARow], list[QARow]]:
    """Deterministic train/test split by a seeded hash of each row's id.

    The same id always lands on the same side for a given seed, whatever the
    file order or the other rows, so adding questions never moves old ones.

    Returns:
        (train, test).
    """
    train = [r for r in rows if id_bucket(r.id, seed) >= test_fraction]
    test = [r for r in rows if id_bucket(r.id, seed) < test_fraction]
    return train, test


def id_bucket(row_id: str, seed: int) -> float:
    """A question id's place in [0, 1) under `seed` (the split's seeded hash)."""
    h = hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()
    return int(h[:12], 16) / float(1 << 48)
