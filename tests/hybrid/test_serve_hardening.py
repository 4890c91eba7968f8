"""`hybrid serve` under hostile input: one request never takes the service from the others.

A real `hybrid serve` process on loopback (tiny model) takes poisoned requests, then answers a
normal one and stops on SIGTERM within a bound; in-process tests break generation, retrieval and
adapters on purpose and check that only the request concerned fails.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hybrid.serve import ServeConfig, build, create_app, listen
from hybrid.serve_engine import AdapterPool, Engine, Job, ServeError, isolated
from tests.hybrid.test_serve import KEYS, QUESTION, Running, config, env, free_port, random_adapter  # noqa: F401
from training import run_record

ROOT = Path(__file__).resolve().parents[2]


def ask(url, body, key=KEYS["pub"], timeout=30, route="/v1/chat/completions"):
    """POST `body` as JSON with escapes (json.dumps), so lone surrogates and NaN go out as a client may send them."""
    return httpx.post(url + route, content=json.dumps(body).encode(), timeout=timeout,
                      headers={"Authorization": f"Bearer {key}", "content-type": "application/json"} if key else
                      {"content-type": "application/json"})


def question(**kw):
    return {"model": kw.pop("model", "a"), "messages": [{"role": "user", "content": kw.pop("q", QUESTION)}], **kw}


def damaged_adapters(env, root: Path) -> Path:
    """An --adapter-dir with one good adapter, one whose run record is cut short, one of another base,
    and a sound one whose name has a '.' (PEFT cannot load it under that name)."""
    d = root / "adapter_dir"
    random_adapter(env["base"], d / "good", 5)
    random_adapter(env["base"], d / "good.v2", 8)
    (random_adapter(env["base"], d / "torn", 6) / run_record.RUN_FILE).write_text('{"workflow": "sft", "base_mo')
    other = random_adapter(env["base"], d / "other", 7)
    rec = json.loads((other / run_record.RUN_FILE).read_text())
    rec["base_model"] = {"name": "someone-else", "fingerprint": "0" * 64}
    (other / run_record.RUN_FILE).write_text(json.dumps(rec))
    return d


# --- a real server process --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def process(env, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_process")
    adapter_dir = damaged_adapters(env, root)
    port = free_port()
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "hybrid.cli", "serve", "--index", str(env["index"]),
                             "--base-model", str(env["base"]), "--adapter-dir", str(adapter_dir), "--port", str(port),
                             "-k", "3", "--max-new-tokens", "8", "--drain-seconds", "5"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.3)
    assert proc.poll() is None, (root / "server.log").read_text()
    yield {"proc": proc, "url": url, "log": root / "server.log", "port": port}
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_poisoned_requests_are_refused_alone_then_the_server_answers_and_stops_on_sigterm(process, env):
    url, base = process["url"], env["base"].name
    poisoned = [  # (body or raw bytes, status): each is the caller's own 4xx, in OpenAI's error shape
        (question(model=base, stream=True, temperature=1e-300), 400),
        (question(model=base, temperature=1e-300), 400),
        (question(model=base, q="How long \ud800 does it last?"), 400),
        (question(model=base, q="x", stream=True, temperature=float("nan")), 400),
        ({**question(), "model": "m" * 300}, 404),
        ({**question(), "model": "m" * 5000}, 404),
        ({**question(), "model": "a\ud800"}, 400),
        (b"[" * 100_000, 400),
        ({"query": "battery \udfff"}, 400),
    ]
    for body, status in poisoned:
        if isinstance(body, bytes):
            r = httpx.post(url + "/v1/chat/completions", content=body, timeout=30)
        elif "query" in body:
            r = ask(url, body, key=None, route="/v1/search")
        else:
            r = ask(url, body, key=None)
        assert r.status_code == status, (body if not isinstance(body, bytes) else "nested", r.text[:300])
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert len(r.text) < 1000  # a 5,000-character model name is not echoed back whole
    # unknown routes answer in the same shape
    r = httpx.get(url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # then normal requests, streamed and not, are answered; the server is healthy
    r = ask(url, question(model=base), key=None)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    with httpx.stream("POST", url + "/v1/chat/completions", json=question(model=base, stream=True, temperature=0.7),
                      timeout=30) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"finish_reason"' in lines[-2]
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    # the damaged adapters of --adapter-dir were reported and are never served; the good one is
    models = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
    assert models == [base, "good"]
    for name in ("torn", "other", "good.v2"):
        assert ask(url, question(model=name), key=None).status_code == 404
    assert ask(url, question(model="good"), key=None).status_code == 200
    # SIGTERM: the process drains and ends within a bound, with no traceback in its log
    t0 = time.time()
    process["proc"].send_signal(signal.SIGTERM)
    process["proc"].wait(timeout=20)
    assert time.time() - t0 < 20
    text = process["log"].read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "torn" in text and "other" in text and "not served" in text  # reported when found
    # --log-level info (the default): one line per request, naming no text it carried
    assert re.search(r"INFO POST /v1/chat/completions 200 \d+\.\dms key=anonymous", text)
    assert re.search(r"INFO GET \(other\) 404 \d+\.\dms key=-", text) and "nothing" not in text
    assert "battery" not in text and "m" * 300 not in text


def test_a_port_out_of_range_or_in_use_is_one_line_before_the_model_loads(tmp_path):
    import socket

    from typer.testing import CliRunner

    from hybrid.cli import app as cli

    runner = CliRunner()
    missing_model = str(tmp_path / "no-such-model")  # never reached: the port is checked first
    res = runner.invoke(cli, ["serve", "--index", str(tmp_path), "--base-model", missing_model, "--port", "70000"])
    assert res.exit_code == 2 and "--port 70000" in res.stderr and "Traceback" not in res.output, res.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = runner.invoke(cli, ["serve", "--index", str(tmp_path), "--base-model", missing_model,
                                  "--port", str(port)])
    assert res.exit_code == 2 and f"--port {port}" in res.stderr and "in use" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


# --- in process: failures inside the engine -----------------------------------------------------------
@pytest.fixture()
def served(env):
    app, engine = build(config(env, stall_seconds=0.5))
    running = Running(app)
    yield running, engine
    running.stop()
    engine.stop(timeout_s=5)


def test_a_failure_inside_streamed_generation_ends_that_stream_with_an_error_and_the_engine_serves_on(
        served, monkeypatch):
    running, engine = served
    model = engine.pipe.model
    real = type(model).generate

    def broken(self, *args, **kwargs):
        if kwargs.get("streamer") is not None:  # what a sampler failing on one request's settings does
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", broken)
    # raw content streams token by token, so the failure comes after the stream has begun
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=question(stream=True, content_format="raw"),
                      headers={"Authorization": f"Bearer {KEYS['pub']}"}, timeout=20) as s:
        events = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert any('"error"' in e and "internal_error" in e for e in events) and events[-1] == "data: [DONE]"
    r = ask(running.url, question())  # the engine was not wedged by it
    assert r.status_code == 200
    assert engine.stalled(0.5) is None
    assert httpx.get(running.url + "/health", timeout=5).json()["status"] == "ok"


def test_one_failing_request_in_a_batch_fails_alone(env, monkeypatch):
    app, engine = build(config(env, batch_window_ms=1000))
    real, calls = engine.pipe.answer_batch, []

    def answer_batch(questions, *args, **kwargs):
        calls.append(len(questions))
        if any("POISON" in q for q in questions):
            raise RuntimeError("this row cannot be generated")
        return real(questions, *args, **kwargs)

    monkeypatch.setattr(engine.pipe, "answer_batch", answer_batch)
    running = Running(app)
    try:
        with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as ex:
            futures = [ex.submit(ask, running.url, question(model=m, q=q))
                       for m, q in (("a", QUESTION), ("b", QUESTION + " POISON"), (env["base"].name, QUESTION),
                                    ("a", "Who approves travel?"))]
            codes = [f.result().status_code for f in futures]
        assert codes == [200, 500, 200, 200]
        assert max(calls) > 1  # they were batched together, and the poisoned one failed alone
    finally:
        running.stop()
        engine.stop(timeout_s=5)


def test_isolated_retries_each_job_alone_and_sends_each_error_once():
    sent = {i: [] for i in range(3)}
    jobs = [Job(kind="search", question=q, groups=[], emit=sent[i].append) for i, q in enumerate(["ok", "bad", "ok"])]

    def work(js):
        if any(j.question == "bad" for j in js):
            raise ValueError("boom")
        return [j.question.upper() for j in js]

    assert [(j.question, r) for j, r in isolated(jobs, work)] == [("ok", "OK"), ("ok", "OK")]
    assert sent[0] == [] and sent[2] == [] and len(sent[1]) == 1 and sent[1][0][1].status == 500
    jobs[1].fail(ServeError(400, "again"))  # a job ends once
    assert len(sent[1]) == 1


def poll(get, done, seconds: float = 10.0):
    """`get()` until `done(result)` or `seconds` pass (a loaded machine schedules threads late); the last result."""
    deadline = time.monotonic() + seconds
    while not done(result := get()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return result


def test_health_reports_a_batch_that_makes_no_progress(env, monkeypatch):
    app, engine = build(config(env, stall_seconds=0.3))
    gate = threading.Event()
    monkeypatch.setattr(engine.pipe, "answer_batch", lambda *a, **k: gate.wait(30) and [])
    from fastapi.testclient import TestClient

    client = TestClient(app)
    engine.submit(Job(kind="chat", question=QUESTION, groups=[], emit=lambda e: None))
    r = poll(lambda: client.get("/health"), lambda r: r.status_code == 503)
    assert r.status_code == 503 and r.json()["status"] == "stalled"
    gate.set()
    assert poll(lambda: client.get("/health"), lambda r: r.status_code == 200).status_code == 200
    engine.stop(timeout_s=5)
    assert engine.stalled(1) == "the engine thread has stopped"


def test_stop_never_blocks_on_a_full_queue_and_answers_what_waited_with_503(env):
    from hybrid.serve import load_served
    from hybrid.serve_keys import load_keys

    cfg = config(env)
    pipe, pool = load_served(cfg, load_keys(cfg.keys))
    engine = Engine(pipe, pool, max_queue=1)  # never started: the queue stays full
    got = []
    engine.submit(Job(kind="search", question="q", groups=[], emit=got.append))
    stopping = threading.Thread(target=engine.stop, kwargs={"timeout_s": 1}, daemon=True)
    stopping.start()
    stopping.join(timeout=5)
    assert not stopping.is_alive() and got[0][1].status == 503
    with pytest.raises(ServeError) as refused:
        engine.submit(Job(kind="search", question="q", groups=[], emit=got.append))
    assert refused.value.status == 503


def test_adapters_in_adapter_dir_are_checked_when_found_and_when_they_change(env, tmp_path):
    d = damaged_adapters(env, tmp_path)
    app, engine = build(config(env, adapters={}, adapter_dir=str(d)))
    pool = engine.pool
    try:
        assert pool.names() == ["good"] and pool.path("torn") is None and pool.path("other") is None
        assert "contains '.'" in pool.checked["good.v2"][1]
        (d / "torn" / run_record.RUN_FILE).write_text((d / "good" / run_record.RUN_FILE).read_text())
        assert pool.names() == ["good", "torn"]  # repaired on disk: found again at the next scan
        for name in ("x" * 300, "x" * 5000, "a\ud800", "../good", "", "\x00"):
            assert pool.path(name) is None
    finally:
        engine.stop(timeout_s=5)


# --- any chat body: a 200 or a 4xx in OpenAI's shape, never a 500 -------------------------------------
SURROGATE = st.sampled_from(["\ud800", "\udfff", "\udc80"])
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", QUESTION]),
                 st.builds(lambda a, s, b: a + s + b, st.text(max_size=10), SURROGATE, st.text(max_size=10)))
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
                                 "content": st.one_of(TEXT, JSON)})
QUESTION_TURN = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1, max_size=2))})
# mostly well-formed bodies, so that generation is reached, with any field broken or out of range
BODY = st.one_of(JSON, st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["a", "b", "hr", "zzz", "tiny_llm0"]), TEXT, JSON),
     "messages": st.one_of(st.builds(lambda h, q: h + [q], st.lists(MESSAGE, max_size=2), QUESTION_TURN), JSON)},
    optional={"temperature": st.one_of(st.floats(0, 2), st.floats(0, 1e-3), JSON),
              "max_tokens": st.one_of(st.integers(-3, 600), JSON), "k": st.one_of(st.integers(-1, 60), JSON),
              "stream": st.one_of(st.booleans(), JSON), "n": JSON}))


@pytest.fixture(scope="module")
def client(env):
    from fastapi.testclient import TestClient

    app, engine = build(config(env, max_tokens_limit=12, batch_window_ms=0))
    yield TestClient(app)
    engine.stop(timeout_s=5)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(body=BODY)
def test_no_chat_body_reaches_a_500(client, body):
    r = client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                    headers={"Authorization": f"Bearer {KEYS['hr']}"})
    assert r.status_code in (200, 400, 403, 404), (body, r.text[:300])
    if r.status_code != 200 and "text/event-stream" not in r.headers.get("content-type", ""):
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
