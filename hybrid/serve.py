"""`hybrid serve`: an OpenAI-compatible server (FastAPI + uvicorn) over the index, the base model and its adapters.

    hybrid serve --index runs/index --adapter raft=runs/raft --keys keys.yaml --port 8000

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    r = client.chat.completions.create(model="raft", messages=[{"role": "user", "content": "How long ...?"}])
    r.choices[0].message.content, r.model_extra["hybrid"]["citations"]

Routes (hybrid/serve_routes.py): GET /health, GET /metrics (Prometheus text), GET /v1/models,
POST /v1/chat/completions and /v1/completions (stream or not), POST /v1/embeddings, POST /v1/search.
`content` is the answer in plain words with its verified quotes as numbered sources (or the
abstention sentence); the citations are also the message's `annotations` (url_citation), and
hybrid's extension object `hybrid` holds answer, abstained, citations, passages and, with --judge,
support (hybrid/serve_answers.py). A request's `content_format: "raw"` gets the model's completion
as written. A key (keys.yaml, hybrid/serve_keys.py) decides the groups its retrieval reads with and
the adapters it may use; every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`
and every request one log line (hybrid/serve_http.py). The engine (hybrid/serve_engine.py) owns the model.
"""

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.errors import InputError, quoted
from training.precision import Precision, option
from hybrid.pipeline import Pipeline
from hybrid.pipeline_settings import BASE_MODEL_DEFAULT_HELP, PipelineSettings, parse_adapters
from hybrid.serve_engine import AdapterPool, Engine, RemoteGenerator
from hybrid.serve_http import Metrics, configure_logging
from hybrid.serve_keys import KeyRing, load_keys
from hybrid.serve_requests import parse_chat  # noqa: F401 - part of this module's API (tests, scripts)
from hybrid.serve_routes import base_id, create_app
from training import run_record
from tuning.generation import BASE_MODEL_HELP, DEFAULT_GENERATOR

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        "help": f"Generator: {BASE_MODEL_HELP}.", "default_help": BASE_MODEL_DEFAULT_HELP})
    keys: str | None = field(default=None, metadata={
        "help": "keys.yaml: [{name, sha256, groups, adapters?}]. Without it: loopback only, public documents "
                "and public adapters."})
    judge: str | None = field(default=None, metadata={
        "help": "Groundedness judge dir: a 'support' score in every answer, and the gate (abstain when no passage answers)."})
    probe: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "Answerability probe (hybrid tune probe) of the base model: its rule decides "
                                  "whether the base model's answers are served (adapters' answers are not probed)."})
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
    log_level: Literal["debug", "info", "warning", "error"] = field(default="info", metadata={
        "help": "Server log: info logs one line per request (method, route, status, latency, key name; never the "
                "key or any text); warning: failures only."})
    precision: Precision = option()

    def problems(self) -> list[str]:
        out = []
        if self.keys is None and self.host not in LOOPBACK:
            out.append(f"--host {self.host}: without --keys anyone who reaches it is served; bind to 127.0.0.1 or "
                       f"pass --keys keys.yaml")
        if self.backend == "openai" and self.probe:
            out.append("--probe reads the reader's hidden states: it needs --backend local (the weights here)")
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

    def pipeline_settings(self, groups: list[str], base_model: str | None) -> PipelineSettings:
        """The served pipeline: the base alone (adapters go on at first use, the judge is loaded for
        every key's groups), holding what any key may read (`groups`)."""
        return PipelineSettings(index=self.index, base_model=base_model, k=self.k,
                                max_new_tokens=self.max_new_tokens, require_support=self.require_support,
                                groups=groups, mode=self.mode, rerank=self.rerank, precision=self.precision)


# --- building the served pipeline ----------------------------------------------------------------
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
        from tuning.generation import GeneratorInfo
        from retrieval.retriever import Retriever

        name = cfg.base_model or next((run_record.read(p, f"--adapter {n}={p}")["base_model"]["name"]
                                       for n, p in cfg.adapters.items()), DEFAULT_GENERATOR)
        pipe = Pipeline(Retriever.load(cfg.index, reranker=cfg.rerank, precision=cfg.precision), None, None,
                        GeneratorInfo(name=name, path="", fingerprint=""), [], k=cfg.k,
                        max_new_tokens=cfg.max_new_tokens, require_support=cfg.require_support,
                        judge=judge, groups=groups,
                        remote=RemoteGenerator(cfg.backend_url, os.environ.get("HYBRID_BACKEND_KEY")))
        pipe.mode = cfg.mode
    else:
        base = cfg.base_model or next((run_record.read_adapter(n, p, groups)["base_model"]["name"]
                                       for n, p in cfg.adapters.items()), None)
        pipe = Pipeline.load(cfg.pipeline_settings(groups, base))
        pipe.judge = judge
        if cfg.probe:  # like the judge, it decides for every key: only what all keys read
            from tuning.probe import Probe

            try:
                Probe.load(cfg.probe, groups=shared, label=f"--probe {cfg.probe}")
            except InputError as exc:
                raise InputError(f"{exc} (the probe serves every key: train it within the groups all keys in "
                                 f"--keys share: {', '.join(shared) or 'public only'})") from None
            pipe.set_probe(cfg.probe)
    for name, path in cfg.adapters.items():  # refuse a bad --adapter now, not at its first request
        run_record.check_base(name, path, run_record.read_adapter(name, path, groups), pipe.info)
    return pipe, AdapterPool(pipe, cfg.adapters, cfg.adapter_dir, cfg.max_adapters)


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

    configure_logging(cfg.log_level)
    sock = listen(cfg)
    try:
        app, engine = build(cfg)
    except BaseException:
        sock.close()
        raise
    log(f"serving {base_id(engine.pipe)} with {len(cfg.adapters)} adapter(s) on http://{cfg.host}:{cfg.port}/v1 "
        f"({'keys from ' + cfg.keys if cfg.keys else 'no keys: public documents only'})")
    # uvicorn's own lines stay at warning: the request lines are hybrid's (no access log, no path text)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error" if cfg.log_level == "error" else "warning",
                                           access_log=False, timeout_graceful_shutdown=cfg.drain_seconds))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(timeout_s=cfg.drain_seconds)
        sock.close()
