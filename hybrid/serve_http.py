"""The HTTP layer every route of `hybrid serve` shares: OpenAI's error shape for every refusal
(ours, an unknown route or method, a request that fails validation, a failure inside a route),
the Prometheus metrics, and one log line per request.

A log line names the method, the route (one of ROUTES, else "(other)"), the status, the latency and
the key's name; never the key, a path the caller typed, nor any request or answer text, which may
quote a restricted passage.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from core.errors import quoted
from hybrid.serve_engine import ServeError

log = logging.getLogger("hybrid.serve")
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
          "/v1/search")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
LOG_LEVELS = ("debug", "info", "warning", "error")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: ServeError, headers: dict | None = None):
    """`exc` as a JSON response in OpenAI's error shape (429 with Retry-After)."""
    from fastapi.responses import JSONResponse

    headers = {**(headers or {}), **({"Retry-After": "1"} if exc.status == 429 else {})}
    return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status,
                        headers=headers or None)


def install_error_handlers(app) -> None:
    """Every refusal in OpenAI's error shape: ours (ServeError), Starlette's 404 and 405 (an unknown
    route or method) and FastAPI's request validation (422 there, a 400 naming the field here)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app.add_exception_handler(ServeError, lambda request, exc: error_response(exc))

    def http_error(request, exc):
        where = f"{request.method} {quoted(request.url.path, 60)}"
        if exc.status_code == 404:
            return error_response(ServeError(404, f"{where}: no such route; the routes are {', '.join(ROUTES)}",
                                             code="not_found"))
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("allow", "")
            return error_response(ServeError(405, f"{where}: method not allowed; this route takes {allow}",
                                             code="method_not_allowed"), headers={"allow": allow} if allow else None)
        return error_response(ServeError(exc.status_code, f"{where}: {exc.detail}"))

    def invalid(request, exc):
        first = (exc.errors() or [{}])[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(ServeError(400, f"'{field}': {first.get('msg', 'invalid')}", param=field,
                                         code="invalid_request"))

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)


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


def route_of(scope) -> str:
    """The route a request is counted and logged under: a known route, else "(other)" (the path
    itself is the caller's text)."""
    return scope["path"] if scope["path"] in ROUTES else "(other)"


class MetricsMiddleware:
    """Counts every request by route and status, times it to the last byte (streams included) and
    logs one line for it (the key's name: set by the route as `request.state.key_name`)."""

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
            seconds = time.perf_counter() - t0
            route = route_of(scope)
            self.metrics.requests.labels("other" if route == "(other)" else route, str(status["code"])).inc()
            self.metrics.latency.labels("other" if route == "(other)" else route).observe(seconds)
            method = scope.get("method") if scope.get("method") in METHODS else "(other)"
            key = (scope.get("state") or {}).get("key_name") or "-"
            log.info("%s %s %d %.1fms key=%s", method, route, status["code"], seconds * 1000, key)


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
            log.warning("hybrid serve: %s %s failed (%s)", scope.get("method") if scope.get("method") in METHODS
                        else "(other)", route_of(scope), exc.__class__.__name__)
            if not started["yes"]:
                body = json.dumps(error_body(f"internal error ({exc.__class__.__name__})", "server_error",
                                             code="internal_error")).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a line is logged (not the one at start, which
    a test runner or a daemoniser may have closed since)."""

    hybrid_serve = True

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(level: str) -> None:
    """`hybrid serve --log-level`: hybrid's server log (the request lines at info) to stderr."""
    logger = logging.getLogger("hybrid.serve")
    logger.setLevel(level.upper())
    if not any(getattr(h, "hybrid_serve", False) for h in logger.handlers):
        logger.addHandler(_Stderr())
        logger.propagate = False  # one line each, not again through the root logger
