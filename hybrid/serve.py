"""`hybrid serve`: an OpenAI-compatible server (FastAPI + uvicorn) over the index, the base model and its adapters.

    hybrid serve --index runs/index --adapter raft=runs/raft --keys keys.yaml --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    r = client.chat.completions.create(model="raft", messages=[{"role": "user", "content": "How long ...?"}])
    r.choices[0].message.content, r.model_extra["hybrid"]["citations"]

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/chat/completions
(stream or not), POST /v1/search. Every completion carries hybrid's extension object `hybrid`:
answer, abstained, citations (doc_id, chunk_id, quote, verified), passages (doc_id, chunk_id,
score) and, with --judge, support. A key (keys.yaml, hybrid/serve_keys.py) decides the groups
its retrieval reads with and the adapters it may use; errors are OpenAI-style JSON
`{"error": {"message", "type", "code"}}`. The engine (hybrid/serve_engine.py) owns the model.
"""

import asyncio
import errno
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from retrieval import access
from retrieval.errors import InputError, quoted
from retrieval.precision import Precision, option
from hybrid.pipeline import Pipeline, parse_adapters
from hybrid.serve_engine import AdapterPool, Engine, Job, RemoteGenerator, ServeError, served_content
from hybrid.serve_keys import PUBLIC, Caller, KeyRing, load_keys
from hybrid.serve_requests import error_response, hybrid_fields, parse_chat, unicode_text
from tuning import run_record
from tuning.generator import BASE_MODEL_HELP
from tuning.prompting import ABSTAIN

log = logging.getLogger("hybrid.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/search")


@dataclass
class ServeConfig:
    """Settings of `hybrid serve` (YAML keys = field names)."""

    index: str = field(metadata={"help": "Index directory to retrieve from."})
    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "flag": "--adapter", "parse": lambda values: parse_adapters(values),
        "help": "Adapter NAME=DIR (repeat); requests pick it with model=NAME. Loaded on first use."})
    adapter_dir: str | None = field(default=None, metadata={
        "help": "Directory whose sub-directories are adapters, served by their directory name on first use."})
    base_model: str | None = field(default=None, metadata={
        "help": f"Generator: {BASE_MODEL_HELP}.",
        "default_help": "the adapters' base, else smollm2"})
    keys: str | None = field(default=None, metadata={
        "help": "keys.yaml: [{name, sha256, groups, adapters?}]. Without it: loopback only, public documents "
                "and public adapters."})
    judge: str | None = field(default=None, metadata={
        "help": "Groundedness judge dir: a 'support' score in every answer, and the gate (abstain when no passage answers)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (non-loopback needs --keys)."})
    port: int = field(default=8000, metadata={"help": "Port to bind."})
    max_adapters: int = field(default=4, metadata={
        "help": "Adapters on the base at once; the least recently used idle one is taken off first."})
    backend: Literal["inprocess", "openai"] = field(default="inprocess", metadata={
        "help": "inprocess: generate here; openai: forward generation to --backend-url (vLLM, LoRAX, hybrid serve) "
                "under the adapter's name (its key from $HYBRID_BACKEND_KEY)."})
    backend_url: str | None = field(default=None, metadata={"help": "With --backend openai: the engine's /v1 URL."})
    k: int = field(default=5, metadata={"flag": "-k", "help": "Passages per question (a request may send 'k')."})
    max_new_tokens: int = field(default=96, metadata={"help": "Default max_tokens of a completion."})
    max_tokens_limit: int = field(default=512, metadata={"help": "Largest max_tokens a request may ask for."})
    max_queue: int = field(default=64, metadata={"help": "Requests waiting at most; beyond it: 429 with Retry-After."})
    max_batch: int = field(default=8, metadata={"help": "Requests batched into one generate call at most."})
    batching: Literal["mixed", "by-adapter"] = field(default="mixed", metadata={
        "help": "mixed: requests for different adapters share one generate call (PEFT adapter_names); "
                "by-adapter: one call per adapter, in turn."})
    batch_window_ms: float = field(default=20.0, metadata={"help": "How long the engine collects requests for a batch."})
    max_body_kb: int = field(default=256, metadata={"help": "Largest request body in KiB; beyond it: 413."})
    mode: Literal["dense", "lexical", "hybrid"] | None = field(default=None, metadata={
        "help": "Retrieval mode.", "default_help": "the index's"})
    rerank: str | None = field(default=None, metadata={"help": "Reranker dir (hybrid tune reranker)."})
    require_support: bool = field(default=False, metadata={
        "help": "Abstain when no quote verifies and the answer is not in the passages (streams the whole answer at once)."})
    stall_seconds: float = field(default=120.0, metadata={
        "help": "GET /health answers 503 when the running batch has made no progress (no token) for this long."})
    drain_seconds: float = field(default=30.0, metadata={
        "help": "On SIGINT/SIGTERM: how long requests in flight may take to finish before the server stops."})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = []
        if self.keys is None and self.host not in LOOPBACK:
            out.append(f"--host {self.host}: without --keys anyone who reaches it is served; bind to 127.0.0.1 or "
                       f"pass --keys keys.yaml")
        if self.backend == "openai" and not self.backend_url:
            out.append("--backend openai needs --backend-url URL (the engine's OpenAI-compatible /v1 address)")
        if self.adapter_dir and not Path(self.adapter_dir).is_dir():
            out.append(f"--adapter-dir {self.adapter_dir}: not a directory")
        if not 1 <= self.port <= 65535:
            out.append(f"--port {self.port}: a TCP port is 1 to 65535")
        for name, seconds in (("--stall-seconds", self.stall_seconds), ("--drain-seconds", self.drain_seconds)):
            if not seconds > 0:
                out.append(f"{name} must be > 0, got {seconds}")
        for name, value in (("--max-adapters", self.max_adapters), ("-k", self.k),
                            ("--max-new-tokens", self.max_new_tokens), ("--max-queue", self.max_queue),
                            ("--max-batch", self.max_batch), ("--max-body-kb", self.max_body_kb)):
            if value < 1:
                out.append(f"{name} must be >= 1, got {value}")
        if self.max_new_tokens > self.max_tokens_limit:
            out.append(f"--max-new-tokens {self.max_new_tokens} is over --max-tokens-limit {self.max_tokens_limit}")
        return out


class Metrics:
    """What GET /metrics reports (Prometheus text format, prometheus-client)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("hybrid_requests", "Requests by route and status code.", ["route", "code"], registry=r)
        self.latency = Histogram("hybrid_request_seconds", "Request latency to the last byte.", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("hybrid_generated_tokens", "Tokens generated, by model.", ["model"], registry=r)
        self.gen_seconds = Counter("hybrid_generation_seconds", "Seconds spent in generate calls.", registry=r)
        self.tps = Gauge("hybrid_tokens_per_second", "Tokens/s of the last generate call (all its requests).", registry=r)
        self.batch = Histogram("hybrid_batch_size", "Requests per generate call.", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32))
        self.cache = Counter("hybrid_adapter_cache", "Adapter cache events (hit, miss, eviction).", ["event"],
                             registry=r)
        self.auth_failures = Counter("hybrid_auth_failures", "Requests with no or a wrong API key.", registry=r)
        self.cancelled = Counter("hybrid_generation_cancelled", "Requests whose client left before the end.",
                                 registry=r)

    def adapter_cache(self, event: str) -> None:
        self.cache.labels(event).inc()

    def generated(self, tokens: int, seconds: float, requests: int, stopped: int = 0) -> None:
        self.gen_seconds.inc(seconds)
        self.tps.set(tokens / seconds if seconds > 0 else 0.0)
        self.batch.observe(requests)
        self.cancelled.inc(stopped)


class MetricsMiddleware:
    """Counts every request by route and status and times it to the last byte (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


class ErrorsMiddleware:
    """Whatever fails inside a route is a 500 in OpenAI's error shape and one log line naming the
    exception's class (never its message, which may quote a request or a passage; never a traceback)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"yes": False}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                started["yes"] = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:  # noqa: BLE001 - the last line of defence of every route
            log.warning("hybrid serve: %s %s failed (%s)", scope.get("method"), scope["path"] if scope["path"] in
                        ROUTES else "(other route)", exc.__class__.__name__)
            if not started["yes"]:
                body = json.dumps({"error": {"message": f"internal error ({exc.__class__.__name__})",
                                             "type": "server_error", "code": "internal_error"}}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})


# --- building the served pipeline ----------------------------------------------------------------
def base_id(pipe) -> str:
    """The model id of the base: the packaged name, or a local model directory's name."""
    return Path(pipe.info.name).name


def load_served(cfg: ServeConfig, keys: KeyRing | None):
    """(pipeline, adapter pool) for `cfg`: the base model (or a remote engine), no adapter loaded yet."""
    groups = keys.all_groups() if keys else []  # the server may hold what any of its keys may read
    # The judge scores every request's answers, so it may have learned only from what every key reads.
    shared = keys.shared_groups() if keys else []
    judge = None
    if cfg.judge:
        from tuning.judge import Judge

        try:
            judge = Judge.load(cfg.judge, groups=shared, gate=True, precision=cfg.precision)
        except InputError as exc:
            raise InputError(f"{exc} (the judge serves every key: train it within the groups all keys in "
                             f"--keys share: {', '.join(shared) or 'public only'})") from None
    if cfg.backend == "openai":
        from tuning.generator import GeneratorInfo
        from retrieval.retriever import Retriever

        name = cfg.base_model or next((run_record.read(p, f"--adapter {n}={p}")["base_model"]["name"]
                                       for n, p in cfg.adapters.items()), "smollm2")
        pipe = Pipeline(Retriever.load(cfg.index, reranker=cfg.rerank, precision=cfg.precision), None, None,
                        GeneratorInfo(name=name, path="", fingerprint=""), [], k=cfg.k,
                        max_new_tokens=cfg.max_new_tokens, require_support=cfg.require_support,
                        judge=judge, groups=groups,
                        remote=RemoteGenerator(cfg.backend_url, os.environ.get("HYBRID_BACKEND_KEY")))
        pipe.mode = cfg.mode
    else:
        base = cfg.base_model or next((run_record.read_adapter(n, p, groups)["base_model"]["name"]
                                       for n, p in cfg.adapters.items()), None)
        pipe = Pipeline.load(cfg.index, base_model=base, k=cfg.k, max_new_tokens=cfg.max_new_tokens,
                             require_support=cfg.require_support, groups=groups, mode=cfg.mode, rerank=cfg.rerank,
                             precision=cfg.precision)
        pipe.judge = judge
    for name, path in cfg.adapters.items():  # refuse a bad --adapter now, not at its first request
        run_record.check_base(name, path, run_record.read_adapter(name, path, groups), pipe.info)
    return pipe, AdapterPool(pipe, cfg.adapters, cfg.adapter_dir, cfg.max_adapters)


# --- the app ---------------------------------------------------------------------------------------
def create_app(cfg: ServeConfig, pipe, pool: AdapterPool, engine: Engine, keys: KeyRing | None, metrics: Metrics):
    """The FastAPI app; `engine` must be started by the caller (`run` does)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    from starlette.exceptions import HTTPException

    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ErrorsMiddleware)  # inside the metrics: a failed request is counted as its 500
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_exception_handler(ServeError, lambda request, exc: error_response(exc))
    # an unknown route or method: the same error shape as every other refusal
    app.add_exception_handler(HTTPException, lambda request, exc: error_response(ServeError(
        exc.status_code, f"{request.method} {quoted(request.url.path, 60)}: {exc.detail}; the routes are "
                         f"{', '.join(ROUTES)}", code="not_found" if exc.status_code == 404 else None)))
    base = base_id(pipe)

    def caller_of(request: Request) -> Caller:
        if keys is None:
            return PUBLIC
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        caller = keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if caller is None:
            metrics.auth_failures.inc()
            raise ServeError(401, "no valid API key: send 'Authorization: Bearer KEY' with a key listed in --keys",
                             "authentication_error", "invalid_api_key")
        return caller

    def allowed(caller: Caller, model: str) -> str | None:
        """The adapter a request may use (None: the base), or a ServeError: 404 unknown, 403 forbidden."""
        if model == base:
            scope, label = pipe.base_scope, f"base model {model}"
        elif pool.path(model) is None:
            raise ServeError(404, f"model {quoted(model, 60)} not found: GET /v1/models lists the base model and the "
                                  f"adapters this key may use", code="model_not_found")
        else:
            scope, label = pool.scope(model), f"adapter '{model}'"
            if scope is None:
                raise ServeError(403, f"{label} has no {access.ACCESS_FILE}: what it learned from is unknown, so it "
                                      f"is never served; retrain it", "permission_error", "adapter_forbidden")
        if not caller.may_name(model, base):
            raise ServeError(403, f"key '{caller.name}' may not use {label} (its adapters: "
                                  f"{', '.join(caller.adapters or [])})", "permission_error", "adapter_forbidden")
        if missing := sorted(set(scope) - set(caller.groups)):
            raise ServeError(403, f"{label} was trained on documents of group(s) {', '.join(sorted(scope))}; key "
                                  f"'{caller.name}' lacks {', '.join(missing)}", "permission_error", "adapter_forbidden")
        return None if model == base else model

    async def body_of(request: Request):
        limit = cfg.max_body_kb * 1024
        if int(request.headers.get("content-length") or 0) > limit:
            raise ServeError(413, f"the body is over {cfg.max_body_kb} KiB (--max-body-kb)", code="body_too_large")
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise ServeError(413, f"the body is over {cfg.max_body_kb} KiB (--max-body-kb)", code="body_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ServeError(400, "the body is not valid JSON", code="invalid_json") from None
        except RecursionError:
            raise ServeError(400, "the body's JSON is nested too deeply", code="invalid_json") from None

    def submit(job_kwargs: dict):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e), **job_kwargs)
        engine.submit(job)
        return job, events

    async def first_event(job: Job, events: asyncio.Queue):
        try:
            event = await events.get()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if event[0] == "error":
            raise event[1]
        return event

    @app.get("/health")
    async def health():
        from fastapi.responses import JSONResponse

        if (why := engine.stalled(cfg.stall_seconds)) is not None:  # a load balancer takes it out of rotation
            return JSONResponse({"status": "stalled", "reason": why, "model": base}, status_code=503)
        return {"status": "ok", "model": base, "adapters_loaded": list(pool.loaded)}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        caller_of(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        caller = caller_of(request)
        created = int(time.time())
        data = [{"id": base, "object": "model", "created": created, "owned_by": "hybrid", "parent": None}] \
            if caller.may_name(base, base) and set(pipe.base_scope) <= set(caller.groups) else []
        for name in pool.names():
            scope = pool.scope(name)
            if scope is not None and set(scope) <= set(caller.groups) and caller.may_name(name, base):
                data.append({"id": name, "object": "model", "created": created, "owned_by": "hybrid", "parent": base})
        return {"object": "list", "data": data}

    @app.post("/v1/search")
    async def search(request: Request):
        caller = caller_of(request)
        body = await body_of(request)
        query, k = (body.get("query"), body.get("k", cfg.k)) if isinstance(body, dict) else (None, None)
        if not isinstance(query, str) or not query.strip():
            raise ServeError(400, "'query' must be a non-empty string")
        unicode_text(query, "'query'")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
            raise ServeError(400, "'k' must be an integer in [1, 50]")
        job, events = submit({"kind": "search", "question": query, "groups": caller.groups, "k": k})
        _, payload = await first_event(job, events)
        return {"object": "list", "data": payload["passages"]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        caller = caller_of(request)
        req = parse_chat(await body_of(request), cfg)
        adapter = allowed(caller, req["model"])
        job, events = submit({"kind": "chat", "question": req["question"], "groups": caller.groups,
                              "adapter": adapter, "k": req["k"], "history": req["history"],
                              "max_tokens": req["max_tokens"], "temperature": req["temperature"],
                              "stream": req["stream"]})
        event = await first_event(job, events)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def finish(payload) -> tuple[str, str, dict, dict]:
            a = payload["answer"]
            content = ABSTAIN if a is None else served_content(a)
            new = 0 if a is None else a.new_tokens
            usage = {"prompt_tokens": payload["prompt_tokens"], "completion_tokens": new,
                     "total_tokens": payload["prompt_tokens"] + new}
            return content, "length" if new >= req["max_tokens"] else "stop", usage, hybrid_fields(a)

        if not req["stream"]:
            content, reason, usage, ext = finish(event[1])
            return {"id": cid, "object": "chat.completion", "created": created, "model": req["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": reason}], "usage": usage, "hybrid": ext}

        def chunk(delta: dict, reason=None, **extra) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": req["model"], "choices": [{"index": 0, "delta": delta,
                                                                              "finish_reason": reason}], **extra},
                                         ensure_ascii=False) + "\n\n"

        async def sse(event):
            streamed = False
            try:
                yield chunk({"role": "assistant"})
                while True:
                    if event[0] == "token":
                        streamed = True
                        yield chunk({"content": event[1]})
                    elif event[0] == "error":
                        e = event[1]
                        yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind,
                                                               "code": e.code}}) + "\n\n"
                        break
                    else:
                        content, reason, usage, ext = finish(event[1])
                        if not streamed:  # decided before generating, or --require-support: sent whole
                            yield chunk({"content": content})
                        yield chunk({}, reason, usage=usage, hybrid=ext)
                        break
                    event = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a client that left stops its generation; after the end, a no-op

        return StreamingResponse(sse(event), media_type="text/event-stream")

    return app


def build(cfg: ServeConfig):
    """(app, engine) for `cfg`, the engine started: what `run` serves and the tests drive."""
    keys = load_keys(cfg.keys) if cfg.keys else None
    metrics = Metrics()
    pipe, pool = load_served(cfg, keys)
    pool.metrics = metrics
    engine = Engine(pipe, pool, max_queue=cfg.max_queue, max_batch=cfg.max_batch,
                    batch_window_s=cfg.batch_window_ms / 1000, metrics=metrics, batching=cfg.batching).start()
    return create_app(cfg, pipe, pool, engine, keys, metrics), engine


def listen(cfg: ServeConfig):
    """The listening socket of --host/--port, bound now: a port in use or an address this machine does not
    have is one line before the model loads (uvicorn then serves on this very socket, so nothing can take
    the port in between)."""
    import socket

    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InputError(f"--host {quoted(cfg.host)}: not an address of this machine ({exc}); use e.g. 127.0.0.1") \
            from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)  # bound, not listening: no client waits in a backlog while the model loads
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"--port {cfg.port} on {cfg.host}: in use (another server listens there); pick another "
                             f"--port or stop that server") from None
        raise InputError(f"--host {quoted(cfg.host)} --port {cfg.port}: cannot bind ({exc.strerror}); use an address "
                         f"of this machine, e.g. 127.0.0.1") from None
    return sock


def run(cfg: ServeConfig, log=print) -> None:
    """Bind, load everything, then serve until SIGINT/SIGTERM: requests in flight get up to
    --drain-seconds to finish, queued ones a 503, and the process ends."""
    import uvicorn

    sock = listen(cfg)
    try:
        app, engine = build(cfg)
    except BaseException:
        sock.close()
        raise
    log(f"serving {base_id(engine.pipe)} with {len(cfg.adapters)} adapter(s) on http://{cfg.host}:{cfg.port}/v1 "
        f"({'keys from ' + cfg.keys if cfg.keys else 'no keys: public documents only'})")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=cfg.drain_seconds))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(timeout_s=cfg.drain_seconds)
        sock.close()
