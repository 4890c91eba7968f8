"""Which rows teach the answerability head that transfers to hand-written questions: the documents-only
rows, SQuAD 2.0's near-miss unanswerables, or both.

The head (tuning/probe.py `fit_head`: layer and regularisation by cross-validation on its own rows)
reads the reader's state at the last prompt token. Three heads, each fitted on one row set, are
scored on the bundled corpus's 181 hand-written questions (label: the question is answerable;
passages: the top -k retrieved for all four groups, as `hybrid eval` gives them). The bundled
questions only measure here; they choose nothing.

  documents  `hybrid synth` rows over the bundled corpus as `hybrid tune probe` builds its contexts:
             each answerable question with its chunk (1) and with it withheld (0), each synthesised
             unanswerable question (0)
  squad2     --squad-n questions of ../shared/data/squad2/dev-v2.0.json, half answerable, half
             `is_impossible`, each with its paragraph and two other paragraphs of its article
  both       the two sets together

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.experiments.probe_transfer --synth runs/b33/synth/qa.jsonl \\
        --index runs/b33/index --out benchmarks/results/probe_transfer.json
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from benchmarks.harness import finish, parser  # first: sets the offline environment

GROUPS = ["hr", "finance", "security", "engineering"]


def squad_rows(path: Path, n: int, seed: int) -> list[tuple[str, list[dict], bool, str]]:
    """(question, passages, answerable, article) for n SQuAD 2.0 questions, half impossible."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    pool = {True: [], False: []}
    for art in data:
        paras = [p["context"] for p in art["paragraphs"]]
        for i, p in enumerate(art["paragraphs"]):
            for q in p["qas"]:
                pool[not q["is_impossible"]].append((q["question"], i, paras, art["title"]))
    rng = random.Random(seed)
    out = []
    for answerable in (True, False):
        for question, i, paras, title in rng.sample(pool[answerable], n // 2):
            others = rng.sample([j for j in range(len(paras)) if j != i], min(2, len(paras) - 1))
            passages = [{"title": title, "text": paras[j]} for j in [i, *others]]
            rng.shuffle(passages)
            out.append((question, passages, answerable, title))
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, out="benchmarks/out/probe_transfer.json")
    p.add_argument("--synth", required=True, help="hybrid synth rows over the bundled corpus")
    p.add_argument("--index", required=True, help="the bundled corpus's index (as make demo builds it)")
    p.add_argument("--qa", default="corpora/brindle/qa.jsonl")
    p.add_argument("--squad", default="../shared/data/squad2/dev-v2.0.json")
    p.add_argument("--squad-n", type=int, default=400)
    p.add_argument("--base-model", default="qwen2.5-coder-0.5b")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--seed", type=int, default=13)
    args = p.parse_args(argv)

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from core.qa import load_qa
    from hybrid.answer import passages_for
    from retrieval.retriever import Retriever
    from tuning.generation import load_generator
    from tuning.probe import fit_head, read_states
    from tuning.raft_data import visible_rows
    from tuning.tune_probe import contexts

    t0 = time.perf_counter()
    retriever = Retriever.load(args.index)
    model, tok, info = load_generator(args.base_model, precision="auto")
    model.eval()

    def states(questions, passages):
        return read_states(model, tok, questions, passages, [None] * len(questions))

    test = load_qa(args.qa)
    test_st = states([r.question for r in test], passages_for(retriever, [r.question for r in test], args.k, GROUPS))
    test_y = np.array([bool(r.answers) for r in test])

    synth, _ = visible_rows(load_qa(args.synth), retriever, GROUPS)
    docs = contexts(synth, retriever, args.k, GROUPS, set())
    docs_st = states([r.question for r in docs], [r.passages for r in docs])
    docs_y = np.array([r.answerable for r in docs])
    docs_g = np.array([r.id.rsplit(":", 1)[0] for r in docs])

    squad = squad_rows(Path(args.squad), args.squad_n, args.seed)
    sq_st = states([q for q, *_ in squad], [ps for _, ps, *_ in squad])
    sq_y = np.array([a for _, _, a, _ in squad])
    sq_g = np.array([f"{t}:{i}" for i, (*_, t) in enumerate(squad)])

    sets = {"documents": (docs_st.prompt, docs_y, docs_g), "squad2": (sq_st.prompt, sq_y, sq_g),
            "both": (np.concatenate([docs_st.prompt, sq_st.prompt]), np.concatenate([docs_y, sq_y]),
                     np.concatenate([docs_g, sq_g]))}
    results = {"reader": info.name, "precision": info.precision, "test": {"qa": args.qa, "n": len(test),
                                                                           "unanswerable": int((~test_y).sum())},
               "rows": {"documents": len(docs), "squad2": len(squad)}, "heads": {}}
    for name, (x, y, g) in sets.items():
        head = fit_head(x, test_st.layers, y, g, args.seed)
        auroc = float(roc_auc_score(test_y, head.logit(test_st.prompt, test_st.layers)))
        results["heads"][name] = {"layer": head.layer, "c": head.c, "cv_auroc_own_rows": head.cv_auroc,
                                  "auroc_bundled": round(auroc, 4)}
        print(f"{name:10s} layer {head.layer:2d}  CV AUROC on its rows {head.cv_auroc:.3f}  "
              f"AUROC on the bundled questions {auroc:.3f}", flush=True)
    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    finish(args, "benchmarks.experiments.probe_transfer", results, argv)


if __name__ == "__main__":
    main()
