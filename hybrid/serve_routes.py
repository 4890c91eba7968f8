"""The routes of `hybrid serve` (FastAPI): who may call what, and how each route's request reaches
the engine and its answer comes back.

/v1/chat/completions and /v1/completions answer a question through the same RAG pipeline (the
last user message, or the prompt); /v1/embeddings embeds the caller's own text with the index's
embedder; /v1/search retrieves. Every route but /health needs a key when --keys is given.
"""


import asyncio
import base64
import json
import time
import uuid
from pathlib import Path

from core import access
from core.errors import quoted
from hybrid.serve_answers import Shape, annotations, served_content, sse
from hybrid.serve_engine import AdapterPool, Engine, Job, ServeError
from hybrid.serve_http import ErrorsMiddleware, Metrics, MetricsMiddleware, error_body, install_error_handlers
from hybrid.serve_keys import PUBLIC, Caller, KeyRing
from hybrid.serve_requests import hybrid_fields, parse_chat, parse_completion, parse_embeddings, unicode_text


def base_id(pipe) -> str:
    """The model id of the base: the packaged name, or a local model directory's name."""
    return Path(pipe.info.name).name


def embedder_id(pipe) -> str:
    """The model id of the index's embedder: the packaged name, or its directory's name."""
    return Path(pipe.retriever.embedder.name.split(":", 1)[-1]).name


class Doorman:
    """Who a request is (its key) and which model it may name."""

    def __init__(self, pipe, pool: AdapterPool, keys: KeyRing | None, metrics: Metrics):
        self.pipe, self.pool, self.keys, self.metrics, self.base = pipe, pool, keys, metrics, base_id(pipe)

    def caller(self, request) -> Caller:
        """The request's caller (its key's name goes into the request log line, never the key)."""
        caller = PUBLIC if self.keys is None else self._keyed(request)
        request.state.key_name = caller.name
        return caller

    def _keyed(self, request) -> Caller:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        caller = self.keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if caller is None:
            self.metrics.auth_failures.inc()
            raise ServeError(401, "no valid API key: send 'Authorization: Bearer KEY' with a key listed in --keys",
                             "authentication_error", "invalid_api_key")
        return caller

    def adapter(self, caller: Caller, model: str) -> str | None:
        """The adapter a request may use (None: the base), or a ServeError: 404 unknown, 403 forbidden."""
        if model == self.base:
            scope, label = self.pipe.base_scope, f"base model {model}"
        elif self.pool.path(model) is None:
            raise ServeError(404, f"model {quoted(model, 60)} not found: GET /v1/models lists the base model and the "
                                  f"adapters this key may use", code="model_not_found", param="model")
        else:
            scope, label = self.pool.scope(model), f"adapter '{model}'"
            if scope is None:
                raise ServeError(403, f"{label} has no {access.ACCESS_FILE}: what it learned from is unknown, so it "
                                      f"is never served; retrain it", "permission_error", "adapter_forbidden")
        if not caller.may_name(model, self.base):
            raise ServeError(403, f"key '{caller.name}' may not use {label} (its adapters: "
                                  f"{', '.join(caller.adapters or [])})", "permission_error", "adapter_forbidden")
        if missing := sorted(set(scope) - set(caller.groups)):
            raise ServeError(403, f"{label} was trained on documents of group(s) {', '.join(sorted(scope))}; key "
                                  f"'{caller.name}' lacks {', '.join(missing)}", "permission_error", "adapter_forbidden")
        return None if model == self.base else model

    def models(self, caller: Caller) -> list[dict]:
        created = int(time.time())
        data = [{"id": self.base, "object": "model", "created": created, "owned_by": "hybrid", "parent": None}] \
            if caller.may_name(self.base, self.base) and set(self.pipe.base_scope) <= set(caller.groups) else []
        for name in self.pool.names():
            scope = self.pool.scope(name)
            if scope is not None and set(scope) <= set(caller.groups) and caller.may_name(name, self.base):
                data.append({"id": name, "object": "model", "created": created, "owned_by": "hybrid",
                             "parent": self.base})
        return data


async def read_body(request, max_kb: int):
    """The request's JSON body, read up to `max_kb` KiB (413 beyond, 400 when it is not JSON)."""
    limit = max_kb * 1024
    if int(request.headers.get("content-length") or 0) > limit:
        raise ServeError(413, f"the body is over {max_kb} KiB (--max-body-kb)", code="body_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ServeError(413, f"the body is over {max_kb} KiB (--max-body-kb)", code="body_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ServeError(400, "the body is not valid JSON", code="invalid_json") from None
    except RecursionError:
        raise ServeError(400, "the body's JSON is nested too deeply", code="invalid_json") from None


def submit(engine: Engine, job_kwargs: dict):
    """Queue a job; its events arrive on the returned asyncio queue (the engine thread emits them)."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(emit=lambda e: loop.call_soon_threadsafe(events.put_nowait, e), **job_kwargs)
    engine.submit(job)
    return job, events


async def first_event(job: Job, events: asyncio.Queue):
    try:
        event = await events.get()
    except asyncio.CancelledError:
        job.cancelled.set()  # the client left while waiting: its generation stops
        raise
    if event[0] == "error":
        raise event[1]
    return event


def finish(payload: dict, req: dict) -> tuple[str, str, dict, dict, list]:
    """(content, finish_reason, usage, hybrid object, annotations) of a finished answer."""
    a, fmt = payload["answer"], req["content_format"]
    new = 0 if a is None else a.new_tokens
    usage = {"prompt_tokens": payload["prompt_tokens"], "completion_tokens": new,
             "total_tokens": payload["prompt_tokens"] + new}
    return (served_content(a, fmt), "length" if new >= req["max_tokens"] else "stop", usage, hybrid_fields(a),
            annotations(a, fmt, payload.get("titles") or {}))


async def stream_events(shape: Shape, event, events: asyncio.Queue, job: Job, req: dict):
    """The SSE stream: tokens as generated (raw content only), else the content whole once the answer
    is checked; then the finish chunk with usage and the hybrid object, then [DONE]."""
    streamed = False
    try:
        if shape.kind == "chat":
            yield shape.piece(None, first=True)
        while True:
            if event[0] == "token":
                streamed = True
                yield shape.piece(event[1])
            elif event[0] == "error":
                e = event[1]
                yield sse(error_body(e.message, e.kind, e.param, e.code))
                break
            else:
                content, reason, usage, ext, notes = finish(event[1], req)
                if not streamed:  # plain content, or decided before generating: sent whole
                    yield shape.piece(content, notes)
                yield shape.last(reason, usage, ext)
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops its generation; after the end, a no-op


def embeddings_body(out: dict, model: str, as_base64: bool) -> dict:
    """OpenAI's embeddings response; base64 is the float32 little-endian bytes (what the openai client asks for)."""
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_base64 else v.tolist()}
            for i, v in enumerate(out["vectors"])]
    n = sum(out["tokens"])
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}


def create_app(cfg, pipe, pool: AdapterPool, engine: Engine, keys: KeyRing | None, metrics: Metrics):
    """The FastAPI app; `engine` must be started by the caller (`hybrid.serve.run` does)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(ErrorsMiddleware)  # inside the metrics: a failed request is counted as its 500
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    install_error_handlers(app)
    door = Doorman(pipe, pool, keys, metrics)
    embedder = pipe.retriever.embedder if pipe.retriever is not None else None
    dim = embedder.dim if embedder is not None else 0

    @app.get("/health")
    async def health():
        if (why := engine.stalled(cfg.stall_seconds)) is not None:  # a load balancer takes it out of rotation
            return JSONResponse({"status": "stalled", "reason": why, "model": door.base}, status_code=503)
        return {"status": "ok", "model": door.base, "adapters_loaded": list(pool.loaded)}

    @app.get("/metrics")
    async def metrics_route(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        door.caller(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": door.models(door.caller(request))}

    @app.post("/v1/search")
    async def search(request: Request):
        caller = door.caller(request)
        body = await read_body(request, cfg.max_body_kb)
        query, k = (body.get("query"), body.get("k", cfg.k)) if isinstance(body, dict) else (None, None)
        if not isinstance(query, str) or not query.strip():
            raise ServeError(400, "'query' must be a non-empty string", param="query")
        unicode_text(query, "'query'")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
            raise ServeError(400, "'k' must be an integer in [1, 50]", param="k")
        job, events = submit(engine, {"kind": "search", "question": query, "groups": caller.groups, "k": k})
        _, payload = await first_event(job, events)
        return {"object": "list", "data": payload["passages"]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        caller = door.caller(request)
        if embedder is None:
            raise ServeError(404, "this server has no index embedder", code="model_not_found", param="model")
        req = parse_embeddings(await read_body(request, cfg.max_body_kb), embedder_id(pipe), dim)
        job, events = submit(engine, {"kind": "embed", "question": "", "groups": caller.groups,
                                      "inputs": req["inputs"]})
        _, out = await first_event(job, events)
        return embeddings_body(out, embedder_id(pipe), req["base64"])

    async def answer(request: Request, kind: str):
        caller = door.caller(request)
        req = (parse_chat if kind == "chat" else parse_completion)(await read_body(request, cfg.max_body_kb), cfg)
        adapter = door.adapter(caller, req["model"])
        # only raw content streams token by token: the plain content is known once the answer is checked
        tokens = req["stream"] and req["content_format"] == "raw"
        job, events = submit(engine, {"kind": "chat", "question": req["question"], "groups": caller.groups,
                                      "adapter": adapter, "k": req["k"], "history": req["history"],
                                      "max_tokens": req["max_tokens"], "temperature": req["temperature"],
                                      "stream": tokens})
        event = await first_event(job, events)
        shape = Shape(kind, f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()),
                      req["model"])
        if not req["stream"]:
            return shape.whole(*finish(event[1], req))
        return StreamingResponse(stream_events(shape, event, events, job, req), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, "text")

    return app
