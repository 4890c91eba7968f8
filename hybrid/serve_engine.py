"""The serving engine behind `hybrid serve`: one thread owns the model, batches requests, swaps adapters.

PEFT's active adapter is state of the whole model, so two requests for different adapters must
never generate at the same time on it. Here that holds by construction: the HTTP side only
authenticates, validates and queues (`Engine.submit`); one engine thread takes everything from
the queue, so nothing else ever touches the model, the adapters or the index. It collects the
requests that arrive within `batch_window_s` (at most `max_batch`), retrieves for all of them,
then generates once per group of requests that share adapter, caller groups and decoding
settings. With `batching="mixed"` (the default) requests for different adapters and the base share
one `generate` call, each row through its own adapter (PEFT's `adapter_names`); with
"by-adapter" there is one call per adapter, one after another. A streamed request generates
alone (tokens go to its client as they come).

Adapters given at start or found by name in `adapter_dir` are loaded on first use; at most
`max_adapters` sit on the base, the least recently used is taken off first, and one in use by
the running batch is never taken off (`AdapterPool`).

With a remote engine (`RemoteGenerator`: vLLM, LoRAX or another `hybrid serve`), generation is
forwarded under the adapter's name; retrieval, access control, the prompt, citation checks and
abstention stay here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from retrieval import access
from retrieval.errors import InputError
from tuning.prompting import ABSTAIN, build_messages, parse_answer


class ServeError(Exception):
    """A request the engine refuses: HTTP status and one-line message (the app renders it OpenAI-style)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


@dataclass
class Job:
    """One request in the engine's queue. `emit(event)` hands an event back to the request's handler:
    ("token", text) while streaming, then ("done", payload) or ("error", ServeError)."""

    kind: Literal["chat", "search"]
    question: str
    groups: list[str]
    emit: Callable[[tuple], None]
    adapter: str | None = None  # None: the base model
    k: int = 5
    history: list[dict] = field(default_factory=list)
    max_tokens: int = 96
    temperature: float = 0.0
    stream: bool = False
    prompt_tokens: int = 0  # counted by the engine's context check (0 with a remote engine)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client has gone


class RemoteGenerator:
    """Generation forwarded to an OpenAI-compatible engine; `model` = the adapter's (or base's) name."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0):
        from openai import OpenAI

        self.url = url
        self.client = OpenAI(base_url=url, api_key=api_key or "unused", timeout=timeout_s, max_retries=0)

    def _one(self, messages: list[dict], model: str, max_tokens: int, temperature: float, on_token=None):
        import openai

        try:
            if on_token is None:
                r = self.client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        temperature=temperature)
                text = r.choices[0].message.content or ""
                return text, (r.usage.completion_tokens if r.usage else len(text.split()))
            pieces = []
            for chunk in self.client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                             temperature=temperature, stream=True):
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    pieces.append(piece)
                    on_token(piece)
            return "".join(pieces), len(pieces)
        except openai.APIStatusError as exc:
            raise ServeError(502, f"backend {self.url} answered {exc.status_code} for model {model}: "
                                  f"{str(exc.message)[:200]}", "backend_error") from None
        except openai.APIError as exc:
            raise ServeError(502, f"backend {self.url} unreachable for model {model} ({exc.__class__.__name__}); "
                                  f"check --backend-url", "backend_error") from None

    def generate(self, messages_batch, model: str, max_tokens: int, temperature: float, on_token=None):
        """(text, new tokens) per prompt; a batch goes out as concurrent requests so the engine can batch them."""
        if on_token is not None and len(messages_batch) == 1:
            return [self._one(messages_batch[0], model, max_tokens, temperature, on_token)]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(messages_batch))) as ex:
            return list(ex.map(lambda m: self._one(m, model, max_tokens, temperature), messages_batch))


class AdapterPool:
    """Which adapters may be served and which sit on the base now (LRU, at most `max_adapters`)."""

    def __init__(self, pipe, known: dict[str, str], adapter_dir: str | Path | None, max_adapters: int, metrics=None):
        self.pipe, self.known, self.max_adapters, self.metrics = pipe, dict(known), max_adapters, metrics
        self.adapter_dir = Path(adapter_dir) if adapter_dir else None
        self.loaded: OrderedDict[str, None] = OrderedDict((n, None) for n in pipe.adapters)  # oldest use first
        self.in_use: dict[str, int] = {}

    def path(self, name: str) -> Path | None:
        """The adapter's directory: given at start, or `adapter_dir/name` (a plain name, no path)."""
        if name in self.known:
            return Path(self.known[name])
        if self.adapter_dir and name and "/" not in name and "\\" not in name and name not in (".", ".."):
            d = self.adapter_dir / name
            if (d / "adapter_config.json").is_file():
                return d
        return None

    def names(self) -> list[str]:
        found = sorted(d.name for d in self.adapter_dir.iterdir() if (d / "adapter_config.json").is_file()) \
            if self.adapter_dir and self.adapter_dir.is_dir() else []
        return list(self.known) + [n for n in found if n not in self.known]

    def scope(self, name: str) -> list[str] | None:
        """The adapter's access scope ([] = public), None when it has no access record (then it is never served)."""
        p = self.path(name)
        try:
            return None if p is None else access.scope(p)
        except InputError:
            return None

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_cache(what)

    def acquire(self, name: str) -> None:
        """Make `name` available on the base (loading it, evicting the least recently used idle one)."""
        self.in_use[name] = self.in_use.get(name, 0) + 1
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self._count("hit")
            return
        self._count("miss")
        while len(self.loaded) >= self.max_adapters:
            idle = next((n for n in self.loaded if not self.in_use.get(n)), None)
            if idle is None:  # every loaded adapter serves a running request: go over the cap, never drop one
                break
            self.pipe.remove_adapter(idle)
            del self.loaded[idle]
            self._count("eviction")
        try:
            self.pipe.add_adapter(name, self.path(name))
        except BaseException:
            self.release(name)
            raise
        self.loaded[name] = None

    def release(self, name: str) -> None:
        self.in_use[name] -= 1
        if not self.in_use[name]:
            del self.in_use[name]


def served_content(a) -> str:
    """What the completion's `content` is: the model's own text when it is served as written, the
    abstention sentence when the pipeline replaced or never generated it (gate, calibration,
    --require-support, nothing visible). Streaming sends exactly this, so nothing replaced is streamed."""
    return a.raw if a.raw and (not a.abstained or parse_answer(a.raw).abstained) else ABSTAIN


class Engine:
    """The thread that owns the pipeline (see the module docstring)."""

    def __init__(self, pipe, pool: AdapterPool, max_queue: int = 64, max_batch: int = 8,
                 batch_window_s: float = 0.02, metrics=None, batching: str = "mixed"):
        self.pipe, self.pool, self.metrics = pipe, pool, metrics
        # mixed: one generate call for requests of several adapters (PEFT adapter_names); by-adapter: one per adapter
        self.mixed = batching == "mixed" and pipe.remote is None
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._run, name="hybrid-engine", daemon=True)

    def context_limit(self) -> int | None:
        if self.pipe.model is None:
            return None  # a remote engine checks its own context
        return getattr(self.pipe.model.config, "max_position_embeddings", None)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ServeError(429, f"the queue is full ({self.queue.maxsize} requests waiting); retry shortly",
                             "rate_limit_error", "queue_full") from None

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            batch, deadline = [job], time.monotonic() + self.batch_window_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            try:
                self.process([j for j in batch if not j.cancelled.is_set()])
            except Exception as exc:  # the engine keeps serving; these requests get a 500
                for j in batch:
                    j.emit(("error", ServeError(500, f"internal error ({exc.__class__.__name__})", "server_error")))

    def process(self, batch: list[Job]) -> None:
        """Retrieve for every job, answer search jobs, then generate per (adapter, groups, decoding) group."""
        by_groups: dict[tuple, list[Job]] = {}
        for j in batch:
            by_groups.setdefault((tuple(j.groups), j.k), []).append(j)
        passages: dict[int, list[dict]] = {}
        for (groups, k), jobs in by_groups.items():
            try:
                found = self.pipe.retrieve([j.question for j in jobs], groups=list(groups), k=k)
            except InputError as exc:  # e.g. a reranker trained on groups these keys lack
                for j in jobs:
                    j.emit(("error", ServeError(403, str(exc), "permission_error", "reranker_forbidden")))
                continue
            for j, ps in zip(jobs, found):
                passages[id(j)] = ps
        chats: dict[tuple, list[Job]] = {}
        for j in batch:
            if id(j) not in passages:
                continue
            if j.kind == "search":
                j.emit(("done", {"passages": passages[id(j)]}))
            elif not passages[id(j)]:  # nothing visible to this caller: abstain without the model
                j.emit(("done", {"answer": None, "prompt_tokens": 0}))
            elif (err := self._context_problem(j, passages[id(j)])) is not None:
                j.emit(("error", err))
            else:
                key = (None if self.mixed else j.adapter, tuple(j.groups), j.max_tokens, j.temperature,
                       id(j) if j.stream else None)
                chats.setdefault(key, []).append(j)
        for (_, groups, max_tokens, temperature, _), jobs in chats.items():
            self._generate(jobs, list(groups), max_tokens, temperature, passages)

    def _context_problem(self, j: Job, ps: list[dict]) -> ServeError | None:
        limit = self.context_limit()
        if limit is None:
            return None
        text = self.pipe.tok.apply_chat_template(build_messages(j.question, ps, j.history), add_generation_prompt=True,
                                                 tokenize=False)
        n = len(self.pipe.tok(text, add_special_tokens=False)["input_ids"])
        j.prompt_tokens = n
        if n + j.max_tokens > limit:
            return ServeError(400, f"the prompt is {n} tokens (conversation + {len(ps)} passages) and max_tokens "
                                   f"{j.max_tokens}: over the model's context of {limit} tokens; shorten the "
                                   f"conversation, lower max_tokens or k", code="context_length_exceeded")
        return None

    def _generate(self, jobs: list[Job], groups, max_tokens, temperature, passages) -> None:
        rows = [j.adapter for j in jobs]
        needed = [a for a in dict.fromkeys(rows) if a is not None]
        for i, a in enumerate(needed):  # all of them on the base while this batch runs
            try:
                self.pool.acquire(a)
            except BaseException:
                for b in needed[:i]:
                    self.pool.release(b)
                raise
        adapter = rows if len(set(rows)) > 1 else rows[0]
        try:
            stream = jobs[0].stream
            t0 = time.perf_counter()
            answers = self.pipe.answer_batch(
                [j.question for j in jobs], [passages[id(j)] for j in jobs], adapter=adapter, groups=groups,
                histories=[j.history for j in jobs], max_new_tokens=max_tokens, temperature=temperature,
                on_token=(lambda t: jobs[0].emit(("token", t))) if stream else None,
                should_stop=lambda: all(j.cancelled.is_set() for j in jobs))
            seconds = time.perf_counter() - t0
        except InputError as exc:
            for j in jobs:
                j.emit(("error", ServeError(403 if "access group" in str(exc) else 400, str(exc))))
            return
        except ServeError as exc:
            for j in jobs:
                j.emit(("error", exc))
            return
        finally:
            for a in needed:
                self.pool.release(a)
        if self.metrics is not None:
            for model in dict.fromkeys(rows):
                self.metrics.tokens.labels(model or self.pipe.info.name).inc(
                    sum(a.new_tokens for a, r in zip(answers, rows) if r == model))
            self.metrics.generated(sum(a.new_tokens for a in answers), seconds, len(jobs),
                                   stopped=sum(j.cancelled.is_set() for j in jobs))
        for j, a in zip(jobs, answers):
            j.emit(("done", {"answer": a, "prompt_tokens": j.prompt_tokens}))
