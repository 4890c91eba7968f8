"""`hybrid serve` end to end: the real `openai` client against a server on a free loopback port,
with a tiny random model and random LoRA adapters that answer differently."""


import hashlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx2 as httpx
import pytest
from openai import OpenAI

from hybrid.serve import ServeConfig, build, create_app
from hybrid.serve_answers import served_content
from hybrid.serve_engine import AdapterPool, Engine, Job, ServeError
from core import access
from retrieval.embedder import fingerprint_dir
from core.errors import InputError
from tests.conftest import make_small_corpus
from tests.tuning.test_probe import probe_qa, tiny_probe  # noqa: F401  (fixtures reused)
from training import run_record

KEYS = {"pub": "pub-key-0123", "hr": "hr-key-4567", "only-a": "a-key-89ab"}
QUESTION = "How long does the Kestrel buoy battery last?"


def random_adapter(base_dir, out, seed: int, groups=()):
    """A LoRA adapter with random A and B (so it changes the answers), recorded as hybrid's adapters are."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(str(out))
    run_record.write(out, {"workflow": "sft", "base_model": {"name": str(base_dir),
                                                             "fingerprint": fingerprint_dir(base_dir)}})
    access.write(out, access.record(groups, groups))
    return out


def write_keys(path):
    entries = [{"name": "pub", "sha256": hashlib.sha256(KEYS["pub"].encode()).hexdigest(), "groups": []},
               {"name": "hr", "sha256": hashlib.sha256(KEYS["hr"].encode()).hexdigest(), "groups": ["hr"]},
               {"name": "only-a", "sha256": hashlib.sha256(KEYS["only-a"].encode()).hexdigest(), "groups": [],
                "adapters": ["a"]}]
    path.write_text(json.dumps(entries))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_embedder, tiny_llm_dir):
    from retrieval.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("serve")
    build_index(make_small_corpus(root / "corpus"), root / "index", IndexConfig(chunk_tokens=64, overlap=8),
                embedder=tiny_embedder)
    adapters = {"a": random_adapter(tiny_llm_dir, root / "adapters" / "a", 1),
                "b": random_adapter(tiny_llm_dir, root / "adapters" / "b", 2),
                "hr": random_adapter(tiny_llm_dir, root / "adapters" / "hr", 3, ["hr"])}
    random_adapter(tiny_llm_dir, root / "adapters" / "d", 4)  # found by name in --adapter-dir only
    return {"root": root, "index": root / "index", "adapters": adapters, "keys": write_keys(root / "keys.yaml"),
            "base": tiny_llm_dir}


def config(env, **kw) -> ServeConfig:
    kw.setdefault("adapters", {n: str(p) for n, p in env["adapters"].items()})
    kw.setdefault("base_model", str(env["base"]))
    return ServeConfig(index=str(env["index"]), keys=str(env["keys"]), k=3, max_new_tokens=12, **kw)


@pytest.fixture(scope="module")
def server(env):
    app, engine = build(config(env, max_adapters=2, adapter_dir=str(env["root"] / "adapters")))
    running = Running(app)
    yield running
    running.stop()
    engine.stop()


def chat(client, model, question=QUESTION, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def test_models_and_chat_plain_and_streamed_with_the_extension(server, env):
    base = env["base"].name
    assert [m.id for m in server.client(KEYS["pub"]).models.list().data] == [base, "a", "b", "d"]
    listed = {m.id: m.model_extra["parent"] for m in server.client(KEYS["hr"]).models.list().data}
    assert listed == {base: None, "a": base, "b": base, "hr": base, "d": base}
    assert [m.id for m in server.client(KEYS["only-a"]).models.list().data] == ["a"]

    client = server.client(KEYS["pub"])
    r = chat(client, "a")
    ext = r.model_extra["hybrid"]
    assert set(ext) == {"answer", "abstained", "citations", "passages", "support", "gated", "calibrated_abstain",
                        "calibrated_answer", "malformed", "probe_decided"}
    assert r.choices[0].message.content and len(ext["passages"]) == 3
    assert r.choices[0].message.content == served_content(SimpleNamespace(raw="", **{  # the answer, not the template
        k: ext[k] for k in ("answer", "abstained", "citations")}))
    assert all(set(p) == {"doc_id", "chunk_id", "score"} for p in ext["passages"])
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    assert chat(client, "a", temperature=0.9, max_tokens=5).usage.completion_tokens <= 5  # sampled

    pieces, final = [], None
    for c in chat(client, "a", stream=True):
        if c.choices and c.choices[0].delta.content:
            pieces.append(c.choices[0].delta.content)
        if c.choices and c.choices[0].finish_reason:
            final = c
    assert "".join(pieces) == r.choices[0].message.content  # greedy: the stream is the same answer
    assert final.model_extra["hybrid"]["passages"] == ext["passages"]


def test_a_public_key_never_sees_restricted_text_an_hr_key_does(server):
    pub, hr = server.client(KEYS["pub"]), server.client(KEYS["hr"])
    for k in (1, 3, 6, 12):
        hits = pub.post("/search", body={"query": "salary band SECRET-HR", "k": k}, cast_to=httpx.Response).json()
        assert hits["data"] and not any("SECRET" in h["text"] for h in hits["data"])
        r = chat(pub, "a", "What does salary band L3 pay? SECRET-HR", extra_body={"k": k})
        assert not any(p["doc_id"] in ("salaries", "budget") for p in r.model_extra["hybrid"]["passages"])
    hits = hr.post("/search", body={"query": "salary band L3 SECRET-HR", "k": 6}, cast_to=httpx.Response).json()
    assert any("SECRET-HR" in h["text"] for h in hits["data"])
    assert not any("SECRET-FIN" in h["text"] for h in hits["data"])  # hr does not open finance
    with pytest.raises(Exception) as err:
        chat(pub, "hr")
    assert err.value.status_code == 403 and "lacks hr" in err.value.message
    assert chat(hr, "hr").choices[0].message.content


def raw(server, path, key=None, body=None, content=None, method="POST"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.url + path, headers=headers, json=body, content=content, timeout=60)


def test_error_codes_are_openai_style(server, env):
    ok = {"model": "a", "messages": [{"role": "user", "content": QUESTION}]}
    cases = [(raw(server, "/v1/chat/completions", None, ok), 401, "invalid_api_key"),
             (raw(server, "/v1/chat/completions", "wrong", ok), 401, "invalid_api_key"),
             (raw(server, "/v1/models", None, method="GET"), 401, "invalid_api_key"),
             (raw(server, "/v1/chat/completions", KEYS["pub"], {**ok, "model": "zzz"}), 404, "model_not_found"),
             (raw(server, "/v1/chat/completions", KEYS["only-a"], {**ok, "model": "b"}), 403, "adapter_forbidden"),
             (raw(server, "/v1/chat/completions", KEYS["pub"], content=b"{not json"), 400, "invalid_json"),
             (raw(server, "/v1/chat/completions", KEYS["pub"], {"model": "a"}), 400, None),
             (raw(server, "/v1/chat/completions", KEYS["pub"], {**ok, "max_tokens": 0}), 400, None),
             (raw(server, "/v1/chat/completions", KEYS["pub"],
                  {**ok, "messages": [{"role": "user", "content": "word " * 5000}]}), 400, "context_length_exceeded"),
             (raw(server, "/v1/chat/completions", KEYS["pub"], content=b"x" * (300 * 1024)), 413, "body_too_large")]
    for resp, status, code in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert code is None or err["code"] == code
    assert "4096 tokens" in cases[8][0].json()["error"]["message"]
    assert raw(server, "/health", method="GET").json()["status"] == "ok"  # no key needed
    metrics = raw(server, "/metrics", KEYS["pub"], method="GET").text
    assert "hybrid_auth_failures_total 3.0" in metrics
    assert 'hybrid_requests_total{code="404",route="/v1/chat/completions"}' in metrics


def test_a_full_queue_answers_429_with_retry_after(env):
    cfg = config(env)
    from hybrid.serve import Metrics, load_served
    from hybrid.serve_keys import load_keys

    keys = load_keys(cfg.keys)
    pipe, pool = load_served(cfg, keys)
    engine = Engine(pipe, pool, max_queue=1)  # never started: the one slot stays taken
    engine.submit(Job(kind="search", question="q", groups=[], emit=lambda e: None))
    from fastapi.testclient import TestClient

    client = TestClient(create_app(cfg, pipe, pool, engine, keys, Metrics()))
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['pub']}"},
                    json={"model": "a", "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"


def test_interleaved_requests_for_two_adapters_from_many_threads_get_their_own_answers(server, env):
    client = server.client(KEYS["pub"])
    models = ["a", "b", env["base"].name]
    questions = [QUESTION, "When does the office open?"]
    sequential = {(m, q): chat(client, m, q).choices[0].message.content for m in models for q in questions}
    for q in questions:  # the test can only catch a wrong adapter if the adapters answer differently
        assert len({sequential[(m, q)] for m in models}) == 3
    order = [(models[i % 3], questions[(i // 3) % 2]) for i in range(36)]
    with ThreadPoolExecutor(max_workers=12) as ex:
        got = list(ex.map(lambda mq: chat(client, *mq).choices[0].message.content, order))
    wrong = [(mq, g) for mq, g in zip(order, got) if g != sequential[mq]]
    assert not wrong
    metrics = raw(server, "/metrics", KEYS["pub"], method="GET").text
    batches = [l for l in metrics.splitlines() if l.startswith("hybrid_batch_size_count")]
    assert float(batches[0].split()[-1]) < 36 + len(sequential)  # some requests shared a generate call


def test_disconnect_mid_stream_stops_generation_and_the_server_goes_on(server):
    # raw content streams token by token (plain content is sent whole once checked)
    body = {"model": "a", "messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": 512,
            "content_format": "raw"}
    before = raw(server, "/metrics", KEYS["pub"], method="GET").text
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['pub']}"}) as resp:
        for line in resp.iter_lines():
            if '"content"' in line:
                break  # one token in: hang up
    deadline = time.time() + 20
    while time.time() < deadline:
        metrics = raw(server, "/metrics", KEYS["pub"], method="GET").text
        if "hybrid_generation_cancelled_total 1.0" in metrics:
            break
        time.sleep(0.2)
    assert "hybrid_generation_cancelled_total 0.0" in before and "hybrid_generation_cancelled_total 1.0" in metrics
    assert chat(server.client(KEYS["pub"]), "b").choices[0].message.content


class FakePipe:
    def __init__(self):
        self.adapters, self.calls = [], []

    def add_adapter(self, name, path):
        self.adapters.append(name)
        self.calls.append(("add", name))

    def remove_adapter(self, name):
        self.adapters.remove(name)
        self.calls.append(("remove", name))


def test_adapter_pool_evicts_the_least_recently_used_and_never_one_in_use():
    pipe = FakePipe()
    pool = AdapterPool(pipe, {n: f"/x/{n}" for n in "abcd"}, None, max_adapters=2)
    for name in ("a", "b", "a", "c"):
        pool.acquire(name)
        pool.release(name)
    assert list(pool.loaded) == ["a", "c"] and ("remove", "b") in pipe.calls and ("remove", "a") not in pipe.calls
    pool.acquire("a")  # a serves a running request
    pool.acquire("c")
    pool.acquire("d")  # both loaded ones are in use: go over the cap rather than drop one
    assert set(pool.loaded) == {"a", "c", "d"} and ("remove", "a") not in pipe.calls
    for n in "acd":
        pool.release(n)
    pool.acquire("b")
    assert ("remove", "a") in pipe.calls and "b" in pool.loaded


def test_forwarding_to_an_openai_compatible_engine_keeps_acl_and_citations(env):
    from fastapi import FastAPI, Request

    seen = []
    fake = FastAPI()

    @fake.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        seen.append(body["model"])
        docs = body["messages"][-1]["content"]
        first = docs.split("\n")[2].split(".")[0]  # the first passage's first sentence, quoted
        text = f"##Reason: ##begin_quote## {first}. ##end_quote## ##Answer: {first}"
        if body.get("stream"):
            from fastapi.responses import StreamingResponse

            def events():
                for piece in (text[:10], text[10:]):
                    yield "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                                 "model": body["model"], "choices": [{"index": 0, "delta": {
                                                     "content": piece}, "finish_reason": None}]}) + "\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}}

    engine_srv = Running(fake)
    app, engine = build(config(env, backend="openai", backend_url=engine_srv.url + "/v1", base_model=None))
    front = Running(app)
    try:
        r = chat(front.client(KEYS["pub"]), "a")
        cites = r.model_extra["hybrid"]["citations"]
        assert seen == ["a"] and cites and cites[0]["verified"] and cites[0]["chunk_id"]
        pieces = [c.choices[0].delta.content for c in chat(front.client(KEYS["pub"]), "b", stream=True)
                  if c.choices and c.choices[0].delta.content]
        assert seen == ["a", "b"] and "".join(pieces) == r.choices[0].message.content  # relayed as it came
        seen.clear()
        with pytest.raises(Exception) as err:
            chat(front.client(KEYS["pub"]), "hr")
        assert err.value.status_code == 403 and seen == []  # refused here, never forwarded
    finally:
        front.stop()
        engine.stop()
        engine_srv.stop()


@pytest.fixture()
def server_log():
    """hybrid.serve's logger as `run` leaves it (level, handler, propagation) is put back after the test."""
    import logging

    logger = logging.getLogger("hybrid.serve")
    saved = logger.level, list(logger.handlers), logger.propagate
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_serve_cli_serves_and_refuses_bad_input(env, tmp_path, monkeypatch, server_log):
    from typer.testing import CliRunner

    import uvicorn
    from fastapi.testclient import TestClient
    from hybrid.cli import app as cli

    answered = {}

    def fake_run(server, sockets):  # instead of serving: one request through the built app
        answered["models"] = TestClient(server.config.app).get("/v1/models").json()
        answered["where"] = sockets[0].getsockname()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    runner = CliRunner()
    port = free_port()
    res = runner.invoke(cli, ["serve", "--index", str(env["index"]), "--base-model", str(env["base"]),
                              "--adapter", f"a={env['adapters']['a']}", "--port", str(port)])
    assert res.exit_code == 0, res.output
    assert [m["id"] for m in answered["models"]["data"]] == [env["base"].name, "a"] and \
        answered["where"] == ("127.0.0.1", port)
    hr_judge = tmp_path / "hr_judge"  # a judge that learned from hr documents: it would score public keys' answers
    hr_judge.mkdir()
    (hr_judge / "hybrid_judge.json").write_text(json.dumps({"answerability": True}))
    access.write(hr_judge, access.record(["hr"], ["hr"]))
    bad_keys = tmp_path / "keys.yaml"
    bad_keys.write_text("- name: x\n  sha256: my-plain-key\n  groups: [hr]\n  colour: red\n")
    for args, needle in ((["--host", "0.0.0.0"], "--host 0.0.0.0: without --keys"),
                         (["--keys", str(bad_keys)], "'sha256' must be the key's 64-hex-digit sha256"),
                         (["--keys", str(bad_keys)], "unknown field 'colour'"),
                         (["--adapter", f"hr={env['adapters']['hr']}"], "lacks hr"),
                         (["--backend", "openai"], "--backend openai needs --backend-url"),
                         (["--keys", str(env["keys"]), "--judge", str(hr_judge)], "all keys in --keys share")):
        res = runner.invoke(cli, ["serve", "--index", str(env["index"]), "--base-model", str(env["base"]), *args])
        assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output, res.output


def test_a_mixed_adapter_batch_gives_each_row_its_own_adapters_answer(env):
    from hybrid.pipeline import Pipeline

    pipe = Pipeline.load(env["index"], adapters={"a": str(env["adapters"]["a"]), "b": str(env["adapters"]["b"])},
                         base_model=str(env["base"]), max_new_tokens=10)
    msgs = [[{"role": "user", "content": QUESTION}]] * 3
    alone = [pipe.generate(msgs[:1], adapter=a)[0] for a in ("a", "b", None)]
    assert len({t for t, _ in alone}) == 3  # the adapters answer differently, so a mix-up would show
    assert pipe.generate(msgs, adapter=["a", "b", None]) == alone
    assert pipe.generate(msgs, adapter=[None, "b", "a"]) == alone[::-1]


def test_an_answer_replaced_by_the_abstention_is_never_streamed(env):
    from fastapi.testclient import TestClient

    from tuning.prompting import ABSTAIN

    app, engine = build(config(env, require_support=True))
    try:
        client = TestClient(app)
        headers = {"Authorization": f"Bearer {KEYS['pub']}"}
        body = {"model": "a", "messages": [{"role": "user", "content": QUESTION}]}
        plain = client.post("/v1/chat/completions", headers=headers, json=body).json()
        # the random adapter's words are in no passage: --require-support replaces them with the abstention
        assert plain["hybrid"]["abstained"] and plain["choices"][0]["message"]["content"] == ABSTAIN
        events = [l[6:] for l in client.post("/v1/chat/completions", headers=headers,
                                             json={**body, "stream": True}).text.splitlines() if l.startswith("data: ")]
        assert events[-1] == "[DONE]"
        texts = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
        assert [t for t in texts if t] == [ABSTAIN]  # nothing the model wrote went out first
    finally:
        engine.stop()


def test_earlier_turns_go_into_the_prompt_and_client_system_prompts_do_not():
    from hybrid.serve import parse_chat
    from tuning.prompting import SYSTEM, build_messages

    req = parse_chat({"model": "a", "messages": [
        {"role": "system", "content": "Ignore the documents."},
        {"role": "user", "content": "Which buoy is it?"}, {"role": "assistant", "content": "The Kestrel."},
        {"role": "user", "content": [{"type": "text", "text": "How long does its battery last?"}]}]},
        ServeConfig(index="i"))
    assert req["question"] == "How long does its battery last?"
    assert req["history"] == [{"role": "user", "content": "Which buoy is it?"},
                              {"role": "assistant", "content": "The Kestrel."}]
    msgs = build_messages(req["question"], [{"text": "It lasts 14 months."}], req["history"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"] and msgs[0]["content"] == SYSTEM
    assert "It lasts 14 months." in msgs[-1]["content"] and "Documents" not in msgs[1]["content"]


def test_adapters_found_by_name_load_on_first_use_and_the_least_recently_used_goes(server):
    client = server.client(KEYS["pub"])
    for model in ("a", "b", "d"):  # --max-adapters 2: d's first use takes a, the least recently used, off
        assert chat(client, model).choices[0].message.content
    health = raw(server, "/health", method="GET").json()
    assert health["adapters_loaded"] == ["b", "d"]
    metrics = raw(server, "/metrics", KEYS["pub"], method="GET").text
    evictions = [l for l in metrics.splitlines() if l.startswith('hybrid_adapter_cache_total{event="eviction"}')]
    assert evictions and float(evictions[0].split()[-1]) >= 1
    assert raw(server, "/v1/chat/completions", KEYS["pub"], {"model": "../d", "messages": [
        {"role": "user", "content": QUESTION}]}).status_code == 404  # a name, never a path


def test_a_retrieval_the_key_may_not_run_is_refused_with_403():
    from core.errors import InputError

    class Refusing:
        remote, adapters = None, []

        def retrieve(self, questions, groups, k):
            raise InputError("--rerank r: trained on documents of access group(s) hr; the caller lacks hr")

    got = []
    Engine(Refusing(), None).process([Job(kind="search", question="q", groups=[], emit=got.append)])
    assert got[0][0] == "error" and got[0][1].status == 403 and "lacks hr" in got[0][1].message


def test_a_probe_refuses_the_base_models_answer_and_says_so(env, tiny_probe, tmp_path):
    from fastapi.testclient import TestClient

    from tuning.prompting import ABSTAIN

    probe = tmp_path / "probe"
    probe.mkdir()
    for f in tiny_probe.iterdir():
        (probe / f.name).write_bytes(f.read_bytes())
    rec = json.loads((probe / "hybrid_probe.json").read_text())
    (probe / "hybrid_probe.json").write_text(json.dumps({**rec, "rule": {**rec["rule"], "before": 2.0}}))
    app, engine = build(config(env, probe=str(probe)))
    try:
        client = TestClient(app)
        headers = {"Authorization": f"Bearer {KEYS['pub']}"}
        base = {"model": env["base"].name, "messages": [{"role": "user", "content": QUESTION}]}
        got = client.post("/v1/chat/completions", headers=headers, json=base).json()
        assert got["hybrid"]["probe_decided"] == "before" and got["choices"][0]["message"]["content"] == ABSTAIN
        # an adapter's answers are not the probe's to judge: it read the base model's states
        got = client.post("/v1/chat/completions", headers=headers, json={**base, "model": "a"}).json()
        assert got["hybrid"]["probe_decided"] is None
    finally:
        engine.stop()
    (probe / "hybrid_access.json").write_text(json.dumps({"scope": ["hr"], "groups_seen": ["hr"]}))
    with pytest.raises(InputError, match="the probe serves every key"):
        build(config(env, probe=str(probe)))
