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

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from core import access
from core.errors import InputError
from training import run_record
from tuning.prompting import build_messages

log = logging.getLogger("hybrid.serve")


class ServeError(Exception):
    """A request the engine refuses: HTTP status and one-line message (the app renders it OpenAI-style)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


@dataclass
class Job:
    """One request in the engine's queue. `emit(event)` hands an event back to the request's handler:
    ("token", text) while streaming, then ("done", payload) or ("error", ServeError).
    An "embed" job embeds `inputs` with the index's embedder (`question` unused)."""

    kind: Literal["chat", "search", "embed"]
    question: str
    groups: list[str]
    emit: Callable[[tuple], None]
    adapter: str | None = None  # None: the base model
    k: int = 5
    history: list[dict] = field(default_factory=list)
    max_tokens: int = 96
    temperature: float = 0.0
    stream: bool = False
    inputs: list[str] = field(default_factory=list)
    prompt_tokens: int = 0  # counted by the engine's context check (0 with a remote engine)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client has gone
    ended: bool = False  # its "done" or "error" has been sent: nothing more is

    def end(self, event: tuple) -> None:
        """Send the job's last event ("done", payload) or ("error", ServeError), once: a later one is dropped."""
        if not self.ended:
            self.ended = True
            self.emit(event)

    def fail(self, exc: ServeError) -> None:
        self.end(("error", exc))


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
        self.checked: dict[str, tuple] = {}  # adapter_dir name -> (its files' stamp, problem or None)

    def path(self, name: str) -> Path | None:
        """The adapter's directory: given at start, or `adapter_dir/name` (a plain name, no path) that
        passed its check when found (`usable`); None for anything else."""
        if name in self.known:
            return Path(self.known[name])
        if not self.adapter_dir or not plain_name(name):
            return None
        d = self.adapter_dir / name
        return d if self.usable(name, d) else None

    def names(self) -> list[str]:
        """The adapters that may be served: those given at start, then those found in `adapter_dir`
        (rescanned on every call) that pass their check."""
        try:
            found = sorted(d.name for d in self.adapter_dir.iterdir() if plain_name(d.name)) \
                if self.adapter_dir and self.adapter_dir.is_dir() else []
        except OSError:
            found = []
        return list(self.known) + [n for n in found if n not in self.known and self.usable(n, self.adapter_dir / n)]

    def usable(self, name: str, d: Path) -> bool:
        """Whether `adapter_dir/name` is an adapter this server can serve: a LoRA adapter with a valid run
        record, trained on the loaded base, with an access record. Checked when found and again whenever
        its files change; one that fails is reported once (the server log) and never served."""
        try:
            stamp = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None
                          for f in (d / "adapter_config.json", d / run_record.RUN_FILE, d / access.ACCESS_FILE))
        except (OSError, ValueError):
            return False
        if stamp[0] is None:
            return False  # not an adapter directory at all: nothing to report
        if self.checked.get(name, (None,))[0] != stamp:
            self.checked[name] = (stamp, self._problem(name, d))
            if self.checked[name][1]:
                log.warning("hybrid serve: --adapter-dir %s: %s; it is not served", name, self.checked[name][1])
        return self.checked[name][1] is None

    def _problem(self, name: str, d: Path) -> str | None:
        label = f"--adapter-dir adapter {name}"
        try:
            rec = run_record.read_adapter(name, d, self.pipe.groups)
            run_record.check_base(name, d, rec, self.pipe.info)
            access.scope(d)
        except (InputError, KeyError, TypeError, AttributeError) as exc:
            return str(exc).replace(f"--adapter {name}={d}", label)[:300]
        return None

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


def plain_name(name) -> bool:
    """A name that can only mean a direct sub-directory: printable text (no lone surrogate, no NUL), no
    separator or dot-name, within a file name's limits (a 5,000-character `model` is simply no adapter)."""
    return isinstance(name, str) and 0 < len(name) <= 200 and name not in (".", "..") and \
        name.isprintable() and not any(c in name for c in "/\\")


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
        # progress: when the running batch started (None: idle) and when it last moved (a token, a step)
        self.busy_since: float | None = None
        self.moved_at = time.monotonic()
        self.stopping = threading.Event()

    def context_limit(self) -> int | None:
        if self.pipe.model is None:
            return None  # a remote engine checks its own context
        return getattr(self.pipe.model.config, "max_position_embeddings", None)

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise ServeError(503, "the server is shutting down; retry on another instance", "server_error",
                             "shutting_down")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ServeError(429, f"the queue is full ({self.queue.maxsize} requests waiting); retry shortly",
                             "rate_limit_error", "queue_full") from None

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new jobs, fail the queued ones (503), let the running batch end, bounded by `timeout_s`.

        Never blocks on a full queue: the queue is drained before the stop mark goes in."""
        self.stopping.set()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(ServeError(503, "the server is shutting down", "server_error", "shutting_down"))
        self.queue.put_nowait(None)
        if self.thread.is_alive():
            self.thread.join(timeout=timeout_s)

    def moved(self) -> None:
        """Note progress (called after every generated token, and between the stages of a batch)."""
        self.moved_at = time.monotonic()

    def stalled(self, after_s: float) -> str | None:
        """Why the engine is not serving (None when it is): its thread has ended, or the running batch
        has not moved for `after_s` seconds."""
        if not self.thread.is_alive():
            return "the engine thread has stopped"
        since = self.busy_since
        if since is not None and time.monotonic() - max(since, self.moved_at) > after_s:
            return f"the running batch has made no progress for over {after_s:g} s"
        return None

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None or self.stopping.is_set():
                if job is not None:
                    job.fail(ServeError(503, "the server is shutting down", "server_error", "shutting_down"))
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
            self.busy_since = self.moved_at = time.monotonic()
            try:
                self.process([j for j in batch if not j.cancelled.is_set()])
            except Exception as exc:  # noqa: BLE001 - the engine keeps serving; unanswered requests get a 500
                for j in batch:
                    j.fail(_internal(exc))
            finally:
                self.busy_since = None

    def process(self, batch: list[Job]) -> None:
        """Retrieve for every job, answer search jobs, then generate per (adapter, groups, decoding) group.

        A failure is its request's alone: a group that fails is retried one request at a time, so
        only the request that fails alone gets the error, and the engine goes on to the next."""
        for j in [j for j in batch if j.kind == "embed"]:
            for j, vectors in isolated([j], lambda js: [self._embed(js[0])]):
                j.end(("done", vectors))
        batch = [j for j in batch if j.kind != "embed"]
        by_groups: dict[tuple, list[Job]] = {}
        for j in batch:
            by_groups.setdefault((tuple(j.groups), j.k), []).append(j)
        passages: dict[int, list[dict]] = {}
        for (groups, k), jobs in by_groups.items():
            for j, ps in isolated(jobs, lambda js: self._retrieve(js, list(groups), k)):
                passages[id(j)] = ps
            self.moved()
        chats: dict[tuple, list[Job]] = {}
        for j in batch:
            if id(j) not in passages:
                continue
            if j.kind == "search":
                j.end(("done", {"passages": passages[id(j)]}))
            elif not passages[id(j)]:  # nothing visible to this caller: abstain without the model
                j.end(("done", {"answer": None, "prompt_tokens": 0}))
            elif (err := self._context_problem(j, passages[id(j)])) is not None:
                j.fail(err)
            else:
                key = (None if self.mixed else j.adapter, tuple(j.groups), j.max_tokens, j.temperature,
                       id(j) if j.stream else None)
                chats.setdefault(key, []).append(j)
        for (_, groups, max_tokens, temperature, _), jobs in chats.items():
            for j, a in isolated(jobs, lambda js: self._generate(js, list(groups), max_tokens, temperature,
                                                                 passages)):
                j.end(("done", {"answer": a, "prompt_tokens": j.prompt_tokens, "titles": titles(passages[id(j)])}))
            self.moved()

    def _embed(self, j: Job) -> dict:
        """The index's embedder on `j.inputs`: {"vectors": (N, dim) float32, "tokens": per input}. A tuned
        embedder learned from its groups' documents, so only a caller holding them may use it (as search)."""
        emb = self.pipe.retriever.embedder
        try:
            access.require(self.pipe.retriever._embedder_scope, j.groups, f"the index's embedder {Path(emb.path).name}")
        except InputError as exc:
            raise ServeError(403, str(exc), "permission_error", "embedder_forbidden") from None
        tokens = [len(ids) for ids in emb.tokenizer(j.inputs, add_special_tokens=True)["input_ids"]]
        # the model would cut a longer input short and embed only its start: refused rather than done quietly
        if over := [(i, n) for i, n in enumerate(tokens) if n > emb.max_seq_length]:
            raise ServeError(400, f"input[{over[0][0]}] is {over[0][1]} tokens, over the embedder's "
                                  f"{emb.max_seq_length}; split it (as the index's chunks are)",
                             code="context_length_exceeded", param="input")
        return {"vectors": emb.encode(j.inputs), "tokens": tokens}

    def _retrieve(self, jobs: list[Job], groups: list[str], k: int) -> list[list[dict]]:
        try:
            return self.pipe.retrieve([j.question for j in jobs], groups=groups, k=k)
        except InputError as exc:  # e.g. a reranker trained on groups these keys lack
            raise ServeError(403, str(exc), "permission_error", "reranker_forbidden") from None

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

    def _generate(self, jobs: list[Job], groups, max_tokens, temperature, passages) -> list:
        """One generate call for `jobs` (their adapters held on the base meanwhile); their answers, in order."""
        rows = [j.adapter for j in jobs]
        needed = [a for a in dict.fromkeys(rows) if a is not None]
        for i, a in enumerate(needed):  # all of them on the base while this batch runs
            try:
                self.pool.acquire(a)
            except BaseException as exc:
                for b in needed[:i]:
                    self.pool.release(b)
                if isinstance(exc, InputError):  # checked when found, broken since (files changed on disk)
                    log.warning("hybrid serve: adapter '%s' could not be loaded: %s", a, str(exc)[:300])
                    raise ServeError(503, f"adapter '{a}' could not be loaded; the server log says why",
                                     "server_error", "adapter_unavailable") from None
                raise
        adapter = rows if len(set(rows)) > 1 else rows[0]

        def on_token(t: str) -> None:
            self.moved()
            jobs[0].emit(("token", t))

        def should_stop() -> bool:
            self.moved()  # called after every generated token
            return self.stopping.is_set() or all(j.cancelled.is_set() for j in jobs)

        try:
            t0 = time.perf_counter()
            answers = self.pipe.answer_batch(
                [j.question for j in jobs], [passages[id(j)] for j in jobs], adapter=adapter, groups=groups,
                histories=[j.history for j in jobs], max_new_tokens=max_tokens, temperature=temperature,
                on_token=on_token if jobs[0].stream else None, should_stop=should_stop)
            seconds = time.perf_counter() - t0
        except InputError as exc:
            raise ServeError(403 if "access group" in str(exc) else 400, str(exc)) from None
        finally:
            for a in needed:
                self.pool.release(a)
        if self.metrics is not None:
            for model in dict.fromkeys(rows):
                self.metrics.tokens.labels(model or self.pipe.info.name).inc(
                    sum(a.new_tokens for a, r in zip(answers, rows) if r == model))
            self.metrics.generated(sum(a.new_tokens for a in answers), seconds, len(jobs),
                                   stopped=sum(j.cancelled.is_set() for j in jobs))
        return answers


def titles(passages: list[dict]) -> dict[str, str]:
    """doc_id -> title of the passages a request was answered from (its own, visible to its caller)."""
    return {p["doc_id"]: p.get("title") or "" for p in passages if p.get("doc_id")}


def _internal(exc: BaseException) -> ServeError:
    """A 500 that names the kind of failure only (its message may quote a request or a document)."""
    return ServeError(500, f"internal error ({exc.__class__.__name__}); the server goes on serving",
                      "server_error", "internal_error")


def isolated(jobs: list[Job], work: Callable[[list[Job]], list]) -> list[tuple[Job, object]]:
    """(job, result) for the jobs `work` succeeds on; every other job gets its error, alone.

    `work(jobs)` returns one result per job. When it fails for several jobs it is run again for each
    job on its own, so one request's bad input or failure never fails the requests batched with it.
    A ServeError is the request's own answer (a 4xx, a 403, a 502); anything else is a 500 logged in one line.
    """
    try:
        return list(zip(jobs, work(jobs)))
    except Exception as exc:  # noqa: BLE001 - isolate, then answer each request for itself
        if len(jobs) > 1:
            return [pair for j in jobs for pair in isolated([j], work)]
        if not isinstance(exc, ServeError):  # the class only: a message may quote the request or a passage
            log.warning("hybrid serve: a request failed inside the engine (%s); the engine goes on",
                        exc.__class__.__name__)
        for j in jobs:
            j.fail(exc if isinstance(exc, ServeError) else _internal(exc))
        return []
