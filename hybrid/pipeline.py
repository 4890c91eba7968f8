"""Answer questions from retrieved passages, with verified citations.

    from hybrid import Pipeline
    pipe = Pipeline.load("runs/index", adapters={"raft": "runs/adapter"})
    result = pipe.ask("How long does the Kestrel-7 battery last?", groups=["engineering"], adapter="raft")
    result = pipe.answer("...", passages=[{"doc_id": "a", "title": "...", "text": "..."}])  # own retriever

One base model is loaded once; any number of LoRA adapters sit on it and are
chosen per call (`adapter=None` is the base model: PEFT's adapter switch-off),
so switching adapters never reloads the base.

Access: an adapter (or merged model, or judge) trained on restricted documents
carries their groups (core/access.py). `load` refuses any whose groups are
not all among the caller's `groups`, and each call checks the chosen adapter
against that call's groups, so the multi-adapter switch cannot hand a public
caller an `hr` adapter.

Calibrated abstention: an adapter calibrated with `hybrid tune calibrate` carries a
threshold on its own abstention score (tuning/abstention.py); the pipeline abstains
when a prompt scores at or above it (`calibrated=False` serves the greedy answer as is).

The probe (`probe=DIR`, `hybrid tune probe`): for the reader it was trained on (the base model or
one adapter), a question whose passages it finds not answering it is refused before anything is
generated, and an answer its rule scores below the cut is refused after (tuning/probe.py); the
Answer says which (`probe_decided`).

Selection (`ask(select=[...])`, with a judge): several adapters answer, the answer the judge
finds best supported by the passages is served, and the best-calibrated of them decides whether
to abstain: what `hybrid eval --select` reports as rag+A|B+cal.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from core import access
from core.errors import Arg, InputError
from hybrid.answer import Answer, best_supported, deciding_adapter, passage_refs, passages_for, verify
from hybrid.pipeline_settings import PipelineSettings, check_select
from retrieval.retriever import MODES, Retriever
from training import run_record
from tuning import abstention
from tuning.abstention import calibration_abstains, load_calibration
from tuning.generation import PrefixCache, TemplateStop, generate_batch, generation_kwargs, load_generator, opening
from tuning.judge import THRESHOLD, Judge, gate_abstains
from tuning.probe import Probe, read_states
from tuning.prompting import ABSTAIN, ANSWER_OPENING, build_messages, chat_text, parse_answer, quote_in

__all__ = ["Answer", "Pipeline", "PipelineSettings", "passages_for", "verify"]  # what a library user imports here


class Pipeline:
    """Retriever (optional) + one base generator + named LoRA adapters."""

    def __init__(self, retriever: Retriever | None, model, tokenizer, info, adapters: list[str],
                 k: int = 5, max_new_tokens: int = 96, require_support: bool = False, judge=None,
                 groups=None, scopes: dict[str, list[str]] | None = None, base_scope: list[str] | None = None,
                 gate_threshold: float | None = None, thresholds: dict[str, float | None] | None = None,
                 calibrated: bool = True, aurocs: dict[str, float] | None = None, remote=None):
        self.retriever, self.model, self.tok, self.info = retriever, model, tokenizer, info
        self.remote = remote  # an OpenAI-compatible engine that generates instead of `model` (hybrid/serve_engine.py)
        self.adapters = adapters
        self.groups = access.training_groups(groups)  # the caller's groups given at load
        self.scopes = scopes or {}  # adapter name -> its access scope ([] = public)
        self.base_scope = base_scope or []  # a merged model's scope
        self.gate_threshold = gate_threshold
        self.k, self.max_new_tokens, self.require_support = k, max_new_tokens, require_support
        self.judge = judge
        self.thresholds = thresholds or {}  # adapter name -> calibrated abstention threshold (or None)
        self.aurocs = aurocs or {}  # adapter name -> its calibration AUROC (which one decides under select)
        self.calibrated = calibrated
        self.openings: dict[str, str] = {}  # adapter name -> how its answers begin (its training format)
        self.runs: dict[str, str | None] = {}  # adapter name -> its training run's fingerprint (a probe reads one)
        self.probe: Probe | None = None
        self.probe_reader: str | None = None  # the adapter whose states the probe reads (None: the base model)
        # one question at a time (ask, the server's single requests): the system prompt's keys and
        # values are computed once per adapter, not per question (greedy answers unchanged)
        self.prefix_cache = PrefixCache()
        self.mode: str | None = None  # retrieval mode; None = the index's default
        self.precision = info.precision if info is not None else "fp32"  # the generator's (training/precision.py)

    @classmethod
    def load(cls, settings: PipelineSettings | str | Path | None = None,
             adapters: dict[str, str] | str | None = None, **options) -> "Pipeline":
        """Load retriever, base generator, adapters and judge as `settings` says.

        The commands pass their `PipelineSettings`; a library caller may pass the index dir (or
        None: only `answer` with your own passages) and the settings' other fields as keywords,
        `adapters` as {name: adapter dir} or one dir (named "default"), e.g.
        `Pipeline.load("runs/index", adapters={"raft": "runs/raft"}, groups=["hr"], k=3)`.
        Every adapter, a merged base model and the judge must have been trained within the
        settings' groups; the base model defaults to the adapters' base, else the packaged one.

        Raises:
            InputError: missing adapter, an adapter trained on another base model, or an
                artifact trained on documents of groups the caller lacks.
        """
        if not isinstance(settings, PipelineSettings):
            if isinstance(adapters, (str, Path)):
                adapters = {"default": str(adapters)}
            settings = PipelineSettings(index=None if settings is None else str(settings), adapters=dict(adapters or {}),
                                        **options)
        elif adapters is not None or options:
            raise TypeError("Pipeline.load: pass PipelineSettings alone, or the index dir and keywords")
        s = settings
        groups, base_model = s.groups, s.base_model
        records = {name: run_record.read_adapter(name, path, groups) for name, path in s.adapters.items()}  # fail before loading
        base_scope = []
        if base_model is not None and (run_record.exists(base_model) or
                                       (Path(base_model) / access.ACCESS_FILE).exists()):
            access.check(base_model, groups, Arg("base_model", base_model))  # a merged model keeps its tag
            base_scope = access.scope(base_model)
        if base_model is None and records:
            base_model = next(iter(records.values()))["base_model"]["name"]
        if s.rerank is not None and not s.index:
            raise InputError(Arg("rerank"), " needs ", Arg("index_dir", field="index"), ": it re-orders retrieved passages")
        if s.mode is not None and s.mode not in MODES:  # before the first question, not at it
            raise InputError(Arg("mode", s.mode), f": expected one of {', '.join(MODES)}")
        retriever = Retriever.load(s.index, reranker=s.rerank, precision=s.precision) if s.index else None
        model, tok, info = load_generator(base_model, device=s.device, precision=s.precision)
        for name, rec in records.items():
            run_record.check_base(name, s.adapters[name], rec, info)
        judge = Judge.load(s.judge, groups=groups, gate=True, precision=s.precision) if s.judge is not None else None
        pipe = cls(retriever, model, tok, info, [], k=s.k, max_new_tokens=s.max_new_tokens,
                   require_support=s.require_support, judge=judge, groups=groups, base_scope=base_scope,
                   gate_threshold=s.gate_threshold, calibrated=s.calibrated)
        for name, path in s.adapters.items():
            pipe.add_adapter(name, path)
        if s.probe is not None:
            pipe.set_probe(s.probe)
        pipe.model.eval()
        pipe.mode = s.mode
        return pipe

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Put one more LoRA adapter on the loaded base, under `name` (the server loads them on first use).

        Validated as at `load`: a run record on this base model, an access record within the groups
        given to `load`. Its calibration, if any, comes with it.
        """
        rec = run_record.read_adapter(name, path, self.groups)
        run_record.check_base(name, path, rec, self.info)
        if self.model is not None:
            from peft import PeftModel

            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()
        self.adapters.append(name)
        self.prefix_cache.clear()  # a name may now stand for other weights
        self.scopes[name] = access.scope(path)
        self.runs[name] = run_record.fingerprint(path)
        self.openings[name] = ANSWER_OPENING[(rec.get("config") or {}).get("answer_format") or "cot"]
        cal = load_calibration(path) if self.calibrated and self.model is not None else None
        self.thresholds[name] = cal and float(cal["threshold"])
        if cal:
            self.aurocs[name] = float(cal.get("auroc") or 0.0)

    def set_probe(self, path: str | Path) -> None:
        """Use the probe at `path` for the reader it was trained on: the base model, or the loaded
        adapter of that training run. Refused (one line) when it is out of the load groups' scope,
        read another base model's states, or its adapter is not loaded."""
        label = Arg("probe", str(path))
        probe = Probe.load(path, self.groups, label)
        run = probe.record.get("adapter_run")
        reader = next((n for n, f in self.runs.items() if f == run), None) if run is not None else None
        if run is not None and reader is None:
            raise InputError(label, f": reads the states of adapter {probe.record.get('adapter')}; load that adapter "
                             "too (", Arg("adapters"), ")")
        probe.check_reader(self.info, run, label)
        self.probe, self.probe_reader = probe, reader

    def remove_adapter(self, name: str) -> None:
        """Take an adapter off the base (its weights are freed; the base is untouched)."""
        if name not in self.adapters:
            raise InputError(Arg("adapter", name), f": not loaded; loaded: {', '.join(self.adapters) or 'none'}")
        if self.model is not None:
            self.model.delete_adapter(name)
        self.adapters.remove(name)
        self.prefix_cache.clear()
        if self.probe is not None and name == self.probe_reader:
            self.probe = self.probe_reader = None  # it read this adapter's states
        for table in (self.scopes, self.thresholds, self.aurocs, self.openings, self.runs):
            table.pop(name, None)

    def check_access(self, adapter: str | None, groups) -> None:
        """Refuse an adapter (or merged base) trained on groups the caller of this call lacks."""
        access.require(self.base_scope, groups, Arg("base_model"))
        if adapter:
            access.require(self.scopes.get(adapter, []), groups, Arg("adapter", adapter))

    # --- generation ------------------------------------------------------------------------
    def _active_adapter(self, adapter: str | None):
        """Context manager that activates one adapter, or none (the base model)."""
        import contextlib

        if adapter is None:
            return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        if adapter not in self.adapters:
            raise InputError(Arg("adapter", adapter), f": not loaded; loaded: {', '.join(self.adapters) or 'none'}")
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    def generate(self, messages_batch: list[list[dict]], adapter: str | None = None,
                 on_token: Callable[[str], None] | None = None, max_new_tokens: int | None = None,
                 temperature: float = 0.0, should_stop: Callable[[], bool] | None = None) -> list[tuple[str, int]]:
        """Generation for a batch of chat prompts (left padding); returns (text, new tokens).

        Greedy unless `temperature` > 0; `max_new_tokens` defaults to the pipeline's; `should_stop`
        (checked after each token) ends generation early, e.g. when a streaming client has gone.
        `adapter` may be a list, one per prompt (None = the base): one mixed-adapter `generate`
        (PEFT's `adapter_names`), so requests for several adapters share the batch.
        With a remote engine (`remote`), the prompts are sent to it under the adapter's name.
        """
        budget = max_new_tokens or self.max_new_tokens
        if isinstance(adapter, list):
            if len(set(adapter)) > 1 and self.remote is None:  # PEFT routes each row through its own adapter
                for a in set(adapter) - {None}:
                    if a not in self.adapters:
                        raise InputError(Arg("adapter", a), f": not loaded; loaded: {', '.join(self.adapters) or 'none'}")
                return generate_batch(self.model, self.tok, messages_batch, budget, temperature, should_stop,
                                      adapter_names=[a or "__base__" for a in adapter])
            adapter = adapter[0]
        if self.remote is not None:
            return self.remote.generate(messages_batch, adapter or self.info.name, budget, temperature, on_token)
        if on_token is None or len(messages_batch) != 1:
            with self._active_adapter(adapter):
                return generate_batch(self.model, self.tok, messages_batch, budget, temperature, should_stop,
                                      prefix_cache=self.prefix_cache, prefix_key=adapter)
        import torch
        from transformers import TextIteratorStreamer

        self.tok.padding_side = "left"
        text = chat_text(self.tok, messages_batch[0])
        enc = self.tok([text], return_tensors="pt", add_special_tokens=False).to(self.model.device)
        kwargs = generation_kwargs(self.tok, budget, temperature, should_stop,
                                   TemplateStop(self.tok, enc["input_ids"].shape[1], [opening(messages_batch[0])]))
        with self._active_adapter(adapter), torch.inference_mode():
            if (cache := self.prefix_cache.lookup(self.model, enc["input_ids"][0].tolist(), adapter)) is not None:
                kwargs["cache"] = cache
            streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
            failed: list[BaseException] = []

            def work():  # a failure inside generate must still end the stream, or its reader waits forever
                try:
                    self.model.generate(**enc, **kwargs, streamer=streamer)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                    failed.append(exc)
                    streamer.end()

            worker = threading.Thread(target=work, name="hybrid-stream", daemon=True)
            worker.start()
            pieces = []
            for piece in streamer:
                pieces.append(piece)
                on_token(piece)
            worker.join()
            if failed:
                raise failed[0]
        text = "".join(pieces)
        return [(text, len(self.tok(text, add_special_tokens=False)["input_ids"]))]

    def answer_batch(self, questions: list[str], passages_batch: list[list[dict]],
                     adapter: str | None | list[str | None] = None, on_token=None, groups=None,
                     histories: list[list[dict]] | None = None, opening: bool = False, **decoding) -> list[Answer]:
        """Answer questions from given passages (dicts with text, title?, doc_id?/id?, chunk_id?, score?).

        What needs only the question and its passages is decided before generating: the judge gate
        (no passage answers the question) and a calibrated adapter's abstention score. A question
        either abstains is never generated, so `on_token` streams only answers that will be served.
        `require_support` needs the answer itself, so with it nothing is streamed.
        `groups`: the caller's access groups for this call (default: those given to `load`).
        `histories`: per question, earlier chat turns for the prompt (the server's conversations).
        `decoding`: `max_new_tokens`, `temperature`, `should_stop` for this call (see `generate`).
        `adapter` may be a list, one per question (None = the base): one mixed-adapter batch.
        `opening`: every completion starts from the answer's opening (it answers; the eval's
        calibrated configuration uses it where the threshold overrules a greedy abstention).
        """
        n = len(questions)
        rows = list(adapter) if isinstance(adapter, list) else [adapter] * n
        for a in dict.fromkeys(rows):
            self.check_access(a, self.groups if groups is None else groups)
        t0 = time.perf_counter()
        thresholds = [self.thresholds.get(a) if a and self.calibrated else None for a in rows]
        scores: list = [None] * n
        for a in dict.fromkeys(a for a, t in zip(rows, thresholds) if t is not None):  # each calibrated adapter
            idx = [i for i in range(n) if rows[i] == a]
            for i, v in zip(idx, self.abstain_scores([questions[i] for i in idx], [passages_batch[i] for i in idx],
                                                     adapter=a)):
                scores[i] = v
        answerable = self.judge.answerable(questions, passages_batch) if self.judge is not None else [None] * n
        gate_at = THRESHOLD if self.gate_threshold is None else self.gate_threshold
        results: list[Answer | None] = [None] * n
        for i in range(n):
            cal, gated = calibration_abstains(scores[i], thresholds[i]), gate_abstains(answerable[i], gate_at)
            if cal or gated:
                results[i] = Answer(answer=ABSTAIN, abstained=True, passages=passage_refs(passages_batch[i]),
                                    gated=gated, calibrated_abstain=cal)
        probed = [i for i in range(n) if self.probe is not None and rows[i] == self.probe_reader]
        answerable_p = self._probe_before(questions, passages_batch, [i for i in probed if results[i] is None], results)
        todo = [i for i in range(n) if results[i] is None]
        todo_adapter = [rows[i] for i in todo] if isinstance(adapter, list) else adapter
        histories = histories or [None] * n
        # a calibrated row may be answered again below, and the probe's rule reads the whole answer,
        # so only rows neither decides stream
        streams = not self.require_support and all(thresholds[i] is None for i in todo) and not probed
        generated = self._generated([questions[i] for i in todo], [passages_batch[i] for i in todo], todo_adapter,
                                    on_token if streams else None, groups, [histories[i] for i in todo],
                                    opening=opening, **decoding) if todo else []
        for i, a in zip(todo, generated):
            results[i] = a
        # The threshold decides both ways: below it the adapter answers, even where its greedy
        # completion abstained (it is written again from the answer's opening).
        again = [i for i in todo if thresholds[i] is not None and results[i].abstained]
        if again:
            answered = self._generated([questions[i] for i in again], [passages_batch[i] for i in again],
                                       [rows[i] for i in again], None, groups, [histories[i] for i in again],
                                       opening=True, **decoding)
            for i, a in zip(again, answered):
                results[i], a.calibrated_answer = a, True
        self._probe_after(questions, passages_batch, [i for i in probed if i in todo], results)
        live = [i for i in todo if not results[i].abstained]
        if self.judge is not None and live:
            support = self.judge.support([questions[i] for i in live], [results[i].answer for i in live],
                                         [passages_batch[i] for i in live])
            for i, sup in zip(live, support):
                results[i].support = float(sup)
        ms = (time.perf_counter() - t0) * 1000 / max(n, 1)
        for i, p in answerable_p.items():
            results[i].probe_answerable = p
        for a, score, ans in zip(results, scores, answerable):
            a.latency_ms = ms
            a.abstain_score = None if score is None else float(score)
            a.answerable = None if ans is None else float(ans)
        return results

    def _probe_before(self, questions, passages_batch, idx: list[int], results: list) -> dict[int, float]:
        """The probe's answerability of rows `idx`; those below its cut abstain now (in `results`),
        nothing generated. Returns {row: P answerable}."""
        if not idx:
            return {}
        p, _ = self.probe.score(self.probe_states([questions[i] for i in idx], [passages_batch[i] for i in idx],
                                                  [None] * len(idx)))
        for i, v in zip(idx, p):
            if self.probe.decide(float(v)) == "before":
                results[i] = Answer(answer=ABSTAIN, abstained=True, passages=passage_refs(passages_batch[i]),
                                    probe_decided="before")
        return {i: float(v) for i, v in zip(idx, p)}

    def _probe_after(self, questions, passages_batch, idx: list[int], results: list) -> None:
        """The rule's score of the answers of rows `idx`; those below its cut become the abstention."""
        idx = [i for i in idx if not results[i].abstained]
        if not idx:
            return
        _, score = self.probe.score(self.probe_states([questions[i] for i in idx], [passages_batch[i] for i in idx],
                                                      [results[i].raw for i in idx]))
        for i, v in zip(idx, score):
            a = results[i]
            a.probe_score = float(v)
            if self.probe.decide(None, float(v)) == "after":
                a.answer, a.abstained, a.citations, a.probe_decided = ABSTAIN, True, [], "after"

    def probe_states(self, questions: list[str], passages_batch: list[list[dict]], completions: list[str | None]):
        """The probe reader's hidden states for (question, passages, completion) rows (tuning/probe.py)."""
        with self._active_adapter(self.probe_reader):
            return read_states(self.model, self.tok, questions, passages_batch, completions)

    def _calibrate(self, questions: list[str], passages_batch: list[list[dict]], answers: list[Answer],
                   adapter: str) -> None:
        """Abstain in place where `adapter`'s own abstention score reaches its threshold."""
        scores = self.abstain_scores(questions, passages_batch, adapter=adapter)
        for a, s in zip(answers, scores):
            a.abstain_score = float(s)
            if calibration_abstains(float(s), self.thresholds[adapter]):
                a.answer, a.abstained, a.citations, a.calibrated_abstain = ABSTAIN, True, [], True

    def answer_selected(self, questions: list[str], passages_batch: list[list[dict]], adapters: list[str],
                        groups=None) -> list[Answer]:
        """Answer with several adapters and serve, per question, the one the judge supports most
        (`hybrid eval --select`, configuration rag+A|B+cal).

        Each adapter answers greedily; among the answers that are not abstentions the highest
        judge support wins (ties: the first adapter listed; all abstained: the abstention). Then
        the best-calibrated of the adapters (highest calibration AUROC), if any is calibrated,
        decides whether to answer at all. The judge picks here; it does not gate.

        Returns:
            One Answer per question, `selected_from` naming the adapter; latency covers every
            adapter's generation and the judge.
        """
        check_select(adapters, self.adapters, self.judge)
        t0 = time.perf_counter()
        per = [self._generated(questions, passages_batch, a, None, groups) for a in adapters]
        for name, answers in zip(adapters, per):
            for a in answers:
                a.selected_from = name
            live = [i for i, a in enumerate(answers) if not a.abstained]
            sup = self.judge.support([questions[i] for i in live], [answers[i].answer for i in live],
                                     [passages_batch[i] for i in live]) if live else []
            for i, s in zip(live, sup):
                answers[i].support = float(s)
        chosen = [cands[best_supported([a.abstained for a in cands], [a.support for a in cands])]
                  for cands in zip(*per)]
        if self.calibrated and (decider := deciding_adapter(adapters, self.aurocs)):
            self._calibrate(questions, passages_batch, chosen, decider)
        ms = (time.perf_counter() - t0) * 1000 / max(len(questions), 1)
        for a in chosen:
            a.latency_ms = ms
        return chosen

    def _generated(self, questions: list[str], passages_batch: list[list[dict]], adapter: str | None, on_token,
                   groups, histories=None, opening: bool = False, **decoding) -> list[Answer]:
        """Greedy answers as the model writes them: parsed, quotes verified, `require_support` applied.

        `opening`: each completion starts from its adapter's answer opening (`ANSWER_OPENING` of the
        format it was trained on), i.e. it answers; the opening is part of the raw text parsed.
        """
        names = adapter if isinstance(adapter, list) else [adapter] * len(questions)
        for a in dict.fromkeys(names):
            self.check_access(a, self.groups if groups is None else groups)
        t0 = time.perf_counter()
        histories = histories or [None] * len(questions)
        msgs = [build_messages(q, ps, h) for q, ps, h in zip(questions, passages_batch, histories)]
        starts = [self.openings.get(a, ANSWER_OPENING["cot"]) if opening else "" for a in names]
        if opening:
            msgs = [m + [{"role": "assistant", "content": start}] for m, start in zip(msgs, starts)]
        gens = self.generate(msgs, adapter=adapter, on_token=on_token, **decoding)
        ms = (time.perf_counter() - t0) * 1000 / max(len(questions), 1)
        results = []
        for (text, n_new), ps, start in zip(gens, passages_batch, starts):
            raw = start + text
            parsed = parse_answer(raw)
            cites = verify(parsed, ps)
            abstained = parsed.abstained
            answer = ABSTAIN if abstained else parsed.answer
            if not abstained and self.require_support and not any(c["verified"] for c in cites) and \
                    not any(quote_in(parsed.answer, p["text"]) for p in ps):
                abstained, answer = True, ABSTAIN
            results.append(Answer(answer=answer, abstained=abstained, citations=cites, passages=passage_refs(ps),
                                  raw=raw, latency_ms=ms, new_tokens=n_new, malformed=parsed.malformed))
        return results

    def abstain_scores(self, questions: list[str], passages_batch: list[list[dict]], adapter: str | None = None):
        """The adapter's own abstention score per question (tuning/abstention.py); shape (N,)."""
        self.check_access(adapter, self.groups)
        with self._active_adapter(adapter):
            return abstention.abstain_scores(self.model, self.tok, questions, passages_batch)

    def completion_logprobs(self, messages: list[dict], completion: str, adapter: str | None = None):
        """Log-probability of each token of `completion` after the chat `messages`, under `adapter`
        (tuning/abstention.py; one forward pass, nothing generated); shape (T,)."""
        self.check_access(adapter, self.groups)
        with self._active_adapter(adapter):
            return abstention.completion_logprobs(self.model, self.tok, messages, completion)

    def answer(self, question: str, passages: list[dict], adapter: str | None = None, on_token=None,
               groups=None) -> Answer:
        """Answer one question from your own passages."""
        return self.answer_batch([question], [passages], adapter=adapter, on_token=on_token, groups=groups)[0]

    def retrieve(self, questions: list[str], groups=None, k: int | None = None) -> list[list[dict]]:
        """Passages for questions from the index (access control applied)."""
        if self.retriever is None:
            raise InputError("no ", Arg("index_dir", field="index"), " given: pass one, or call answer() with your own "
                             "passages")
        return passages_for(self.retriever, questions, k=k or self.k, groups=groups, mode=self.mode)

    def ask(self, question: str, groups=None, adapter: str | None = None, k: int | None = None,
            on_token=None, select: list[str] | None = None) -> Answer:
        """Retrieve, then answer; abstains without calling the model when nothing is visible.

        `groups` (None = public) decides both what is retrieved and which adapters may answer.
        `select`: answer with these adapters and serve the best-supported answer (answer_selected).
        """
        if not question.strip():
            raise InputError("the question is empty; pass the question to answer")
        for a in select or [adapter]:
            self.check_access(a, groups or [])
        passages = self.retrieve([question], groups=groups, k=k)[0]
        if not passages:
            return Answer(answer=ABSTAIN, abstained=True)
        if select:
            return self.answer_selected([question], [passages], select, groups=groups or [])[0]
        return self.answer(question, passages, adapter=adapter, on_token=on_token, groups=groups or [])
