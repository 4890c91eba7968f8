"""Re-read an eval's stored completions with today's answer parser, without generating again.

Each line of `hybrid eval`'s predictions.jsonl keeps the reader's raw completion (`raw`), so a
change to the parser (tuning/prompting.py `parse_answer`) can be measured on answers already
paid for: every line is parsed and graded again exactly as the Pipeline and the eval do it
(`parse_answer` -> abstained / answer -> `classify`, `token_f1`), and the summary is printed next
to the stored one. Derived configurations (`+cal`, `+gate`, `+answered`) are left out: they
depend on scores and thresholds, not on the parse alone.

    .venv/bin/python -m benchmarks.analyses.regrade benchmarks/out/readers/smollm2_halueval60 --out out.json

Prints, per configuration: n, accuracy on answerable, abstention on unanswerable, hallucination
(stored -> re-read), and how many lines changed label. `--out FILE` writes every result (with the
changed lines) as a result file (benchmarks/harness.py's format); `--json` prints it as one JSON object.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks.harness import finish, parser  # first: sets the offline environment

from core.errors import InputError
from core.qa import load_qa
from hybrid.prediction import Prediction
from hybrid.report import summarize
from tuning.grading import classify, token_f1
from tuning.prompting import ABSTAIN, parse_answer


def regraded(p: Prediction, golds: dict[str, list[str]] | None = None) -> Prediction:
    """One prediction line graded again from its raw completion (as Pipeline.answer_batch parses it),
    against `golds[p.id]` where given (a QA file's answers, e.g. with aliases added), else its own."""
    parsed = parse_answer(p.raw)
    answer = ABSTAIN if parsed.abstained else parsed.answer
    answers = (golds or {}).get(p.id, p.answers)
    return replace(p, prediction=answer, abstained=parsed.abstained, malformed=parsed.malformed, answers=answers,
                   label=classify(answer, parsed.abstained, answers), f1=token_f1(answer, answers))


def qa_answers(path: Path) -> dict[str, list[str]]:
    """{id: answers} of a QA file; an id whose answerability changed is refused (that is another test set)."""
    return {r.id: list(r.answers) for r in load_qa(path)}


def regrade_dir(d: Path, seed: int = 0, golds: dict[str, list[str]] | None = None) -> dict:
    lines = [Prediction.from_json(json.loads(x))
             for x in (d / "predictions.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    by_config: dict[str, dict[str, Prediction]] = {}
    for p in lines:  # the last line of a (config, id) wins, as when the eval resumes
        if "+" in p.config.removeprefix("rag+") or "|" in p.config:  # derived: +cal, +gate, +answered, A|B
            continue
        by_config.setdefault(p.config, {})[p.id] = p
    out = {}
    for config, preds in by_config.items():
        old = list(preds.values())
        new = [regraded(p, golds) for p in old]
        if golds and any(bool(a.answers) != bool(b.answers) for a, b in zip(old, new)):
            raise InputError(f"--qa changes which questions of {d} are answerable; give a QA file that only adds aliases")
        out[config] = {"stored": summarize(old, seed), "reread": summarize(new, seed),
                       "changed": sum(a.label != b.label for a, b in zip(old, new)),
                       "changes": [{"id": a.id, "raw": a.raw, "stored": a.label, "reread": b.label,
                                    "answer": b.prediction, "gold": a.answers}
                                   for a, b in zip(old, new) if a.label != b.label]}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, out_help="result file: every result, with the changed lines; none unless given")
    ap.add_argument("dirs", nargs="+", type=Path, help="eval --out directories")
    ap.add_argument("--qa", type=Path, help="grade against this QA file's answers (by id), e.g. with aliases added; "
                                            "default: the answers stored on each line")
    args = ap.parse_args(argv)
    results = {}
    try:
        golds = qa_answers(args.qa) if args.qa else None
        for d in args.dirs:
            results[str(d)] = regrade_dir(d, golds=golds)
    except InputError as exc:  # bad input: one line, exit 2, as hybrid's own commands do
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for d in args.dirs:
        r = results[str(d)]
        for config, x in r.items():
            s, n = x["stored"], x["reread"]
            f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{d.name} {config}: n={n['n']} accuracy {f(s['accuracy_answerable'])} -> "
                  f"{f(n['accuracy_answerable'])}, abstention {f(s['abstention_unanswerable'])} -> "
                  f"{f(n['abstention_unanswerable'])}, hallucination {f(s['hallucination_rate'])} -> "
                  f"{f(n['hallucination_rate'])} ({x['changed']} lines changed)")
    finish(args, "benchmarks.analyses.regrade", results, argv)


if __name__ == "__main__":
    main()
