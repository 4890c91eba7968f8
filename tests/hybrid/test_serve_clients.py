"""The seams a client hits on `hybrid serve` (issue 34): what `content` says, the citations in
`annotations`, the raw option, /v1/completions and /v1/embeddings, OpenAI-shaped errors,
refused options, the request log, and the three clients RAG apps use (the `openai` client,
LangChain's `ChatOpenAI`, LlamaIndex's `OpenAILike` with its default settings) on a real uvicorn
on loopback.

The server runs the tiny random model; its generate is scripted (`scripted`) so answers are
known: it quotes the first passage it is given, so the citation is verified by the real pipeline.
"""

import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx2 as httpx
import numpy as np
import pytest

from hybrid.serve import build
from hybrid.serve_answers import chunk_url, plain_content
from tests.hybrid.test_serve import (  # noqa: F401 - env and server_log are fixtures
    KEYS, QUESTION, Running, config, env, free_port, server_log)
from tuning.prompting import ABSTAIN, abstain_answer, parse_answer

DEGENERATE = "##Answer: ##begin_quote## ##end_quote## ##Answer: 3:1\n##Reason: ##P-2025-0147. ##end_quote## 3:1"


def script(user_text: str) -> str:
    """The completion a well-trained adapter writes: the first passage's first sentence quoted, then the answer."""
    if "ABSTAIN-ME" in user_text:
        return abstain_answer()
    if "DEGENERATE" in user_text:
        return DEGENERATE
    first = re.search(r"\[1\][^\n]*\n(.+?\.)", user_text, re.S).group(1).strip()
    return f"##Reason: ##begin_quote## {first} ##end_quote## ##Answer: 14 months"


def scripted(pipe) -> None:
    """Replace the model's generation by `script`, tokens streamed word by word; the rest of the
    pipeline (parsing, quote verification, abstention) is the real one."""

    def generate(messages_batch, adapter=None, on_token=None, **decoding):
        out = []
        for msgs in messages_batch:
            text = script(msgs[-1]["content"])
            for piece in re.findall(r"\S+\s*", text) if on_token else ():
                on_token(piece)
            out.append((text, len(text.split())))
        return out

    pipe.generate = generate


@pytest.fixture(scope="module")
def served(env):
    app, engine = build(config(env))
    scripted(engine.pipe)
    running = Running(app)
    yield running, engine
    running.stop()
    engine.stop(timeout_s=5)


def chat(client, question=QUESTION, model="a", **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def expected(ext: dict) -> str:
    """The plain content the `hybrid` object's answer renders to."""
    return plain_content(SimpleNamespace(answer=ext["answer"], abstained=ext["abstained"],
                                         citations=ext["citations"], raw=""))


def post(running, path, body, key=KEYS["pub"], method="POST"):
    return httpx.request(method, running.url + path, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"} if key else {})


# --- content, annotations, raw ----------------------------------------------------------------------
def test_content_is_the_answer_with_numbered_sources_and_the_annotations_carry_them(served):
    running, _ = served
    r = chat(running.client(KEYS["pub"]))
    msg, ext = r.choices[0].message, r.model_extra["hybrid"]
    cite = ext["citations"][0]
    assert cite["verified"] and ext["answer"] == "14 months" and not ext["abstained"]
    assert msg.content == f"14 months [1]\n\nSources:\n[1] {cite['doc_id']}: \"{cite['quote']}\""
    assert "##" not in msg.content
    note = msg.annotations[0]
    assert len(msg.annotations) == 1 and note.type == "url_citation"
    assert msg.content[note.url_citation.start_index:note.url_citation.end_index] == "[1]"
    assert note.url_citation.url == chunk_url(cite["doc_id"], cite["chunk_id"])
    titles = {"buoys/kestrel": "Kestrel buoy", "buoys/osprey": "Osprey buoy", "office": "Office guide",
              "support": "Support"}
    assert note.url_citation.title == titles[cite["doc_id"]]


def test_an_abstention_is_one_plain_sentence_without_annotations(served):
    running, _ = served
    r = chat(running.client(KEYS["pub"]), "ABSTAIN-ME: how long does the battery last?")
    assert r.choices[0].message.content == ABSTAIN and r.choices[0].message.annotations == []
    assert r.model_extra["hybrid"]["abstained"]


@pytest.mark.skipif(not parse_answer(DEGENERATE).abstained,
                    reason="needs tuning/prompting.py's malformed-template check (issue 34, the parser's part)")
def test_a_completion_that_repeats_the_template_is_served_as_the_abstention(served):
    running, _ = served
    r = chat(running.client(KEYS["pub"]), "DEGENERATE: how long does the battery last?")
    assert r.choices[0].message.content == ABSTAIN and r.model_extra["hybrid"]["abstained"]


def test_the_raw_completion_is_there_on_request(served):
    running, _ = served
    r = chat(running.client(KEYS["pub"]), extra_body={"content_format": "raw"})
    assert r.choices[0].message.content.startswith("##Reason: ##begin_quote## ")
    assert r.choices[0].message.content.endswith("##Answer: 14 months") and r.choices[0].message.annotations == []
    bad = post(running, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": QUESTION}],
                                                 "content_format": "html"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "content_format"


def streamed(client, **kw) -> tuple[str, list]:
    text, notes = "", []
    for c in chat(client, stream=True, **kw):
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
            notes += (c.choices[0].delta.model_extra or {}).get("annotations") or []
    return text, notes


def test_a_stream_ends_with_the_same_content_as_the_whole_answer(served):
    running, _ = served
    client = running.client(KEYS["pub"])
    whole = chat(client).choices[0].message
    text, notes = streamed(client)
    assert text == whole.content and notes == [n.model_dump() for n in whole.annotations]
    raw = chat(client, extra_body={"content_format": "raw"}).choices[0].message.content
    assert streamed(client, extra_body={"content_format": "raw"})[0] == raw
    assert streamed(client, question="ABSTAIN-ME?")[0] == ABSTAIN


# --- /v1/completions, /v1/embeddings ------------------------------------------------------------------
def test_completions_answer_a_prompt_through_the_same_pipeline(served):
    running, _ = served
    client = running.client(KEYS["pub"])
    want = chat(client).choices[0].message.content
    r = client.completions.create(model="a", prompt=QUESTION)
    assert r.object == "text_completion" and r.choices[0].text == want and r.usage.completion_tokens > 0
    assert r.model_extra["hybrid"]["citations"][0]["verified"]
    pieces = [c.choices[0].text for c in client.completions.create(model="a", prompt=QUESTION, stream=True)
              if c.choices]
    assert "".join(pieces) == want
    two = post(running, "/v1/completions", {"model": "a", "prompt": [QUESTION, QUESTION]})
    assert two.status_code == 400 and two.json()["error"]["param"] == "prompt"


def test_embeddings_are_the_index_embedders_for_the_callers_text(served, tiny_embedder):
    running, engine = served
    client = running.client(KEYS["pub"])
    name = Path(engine.pipe.retriever.embedder.name).name  # a local embedder: its directory's name
    one = client.embeddings.create(model=name, input="battery life")  # the client asks for base64
    many = client.embeddings.create(model=name, input=["battery life", "office hours"])
    want = tiny_embedder.encode(["battery life", "office hours"])
    assert np.allclose(one.data[0].embedding, want[0], atol=1e-4)
    assert np.allclose([d.embedding for d in many.data], want, atol=1e-4) and [d.index for d in many.data] == [0, 1]
    assert many.usage.prompt_tokens == many.usage.total_tokens > one.usage.prompt_tokens > 0
    floats = post(running, "/v1/embeddings", {"model": name, "input": "battery life", "encoding_format": "float"})
    assert np.allclose(floats.json()["data"][0]["embedding"], want[0], atol=1e-4)
    for body, status, param in (({"model": "text-embedding-3-small", "input": "x"}, 404, "model"),
                                ({"model": name, "input": [[101, 2023]]}, 400, "input"),
                                ({"model": name, "input": "x", "dimensions": 8}, 400, "dimensions")):
        r = post(running, "/v1/embeddings", body)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert name in post(running, "/v1/embeddings", {"model": "other", "input": "x"}).json()["error"]["message"]
    assert post(running, "/v1/embeddings", {"model": name, "input": "x"}, key=None).status_code == 401


def test_a_tuned_embedder_embeds_only_for_keys_holding_its_groups():
    from hybrid.serve_engine import Engine, Job

    emb = SimpleNamespace(path="/x/hr-embedder", max_seq_length=8,
                          tokenizer=lambda texts, add_special_tokens: {"input_ids": [[1, 2]] * len(texts)},
                          encode=lambda texts: np.zeros((len(texts), 4), dtype=np.float32))
    pipe = SimpleNamespace(remote=None, retriever=SimpleNamespace(embedder=emb, _embedder_scope=["hr"]))
    got = []
    Engine(pipe, None).process([Job(kind="embed", question="", groups=[], inputs=["x"], emit=got.append),
                                Job(kind="embed", question="", groups=["hr"], inputs=["x"], emit=got.append)])
    assert got[0][0] == "error" and got[0][1].status == 403 and "lacks hr" in got[0][1].message
    assert got[1][0] == "done" and got[1][1]["vectors"].shape == (1, 4)


# --- errors and refusals ------------------------------------------------------------------------------
def shaped(r, status: int, code=None, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert code is None or err["code"] == code
    assert param is None or err["param"] == param
    return err


def test_every_error_is_in_openais_shape(served, env):
    running, _ = served
    ok = {"model": "a", "messages": [{"role": "user", "content": QUESTION}]}
    assert "/v1/completions" in shaped(post(running, "/v1/nope", ok), 404, "not_found")["message"]
    shaped(post(running, "/v1/chat/completions", None, method="GET"), 405, "method_not_allowed")
    shaped(post(running, "/v1/chat/completions", ok, key="wrong"), 401, "invalid_api_key")
    shaped(post(running, "/v1/chat/completions", {"model": "a"}), 400, param="messages")

    from fastapi.testclient import TestClient
    from pydantic import BaseModel

    app, engine = build(config(env))
    try:
        class Typed(BaseModel):
            n: int

        @app.post("/typed")  # FastAPI validates a typed body: its 422 comes back as our 400
        async def typed(body: Typed):
            return body

        @app.get("/boom")
        async def boom():
            raise RuntimeError("a passage's SECRET text")

        client = TestClient(app, raise_server_exceptions=False)
        assert shaped(client.post("/typed", json={"n": "x"}), 400, "invalid_request")["param"] == "n"
        assert "SECRET" not in shaped(client.get("/boom"), 500, "internal_error")["message"]
    finally:
        engine.stop(timeout_s=5)


@pytest.mark.parametrize("extra, param", [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                                          ({"functions": [{"name": "f"}]}, "functions"),
                                          ({"tool_choice": "auto"}, "tool_choice"),
                                          ({"stop": ["\n"]}, "stop"),
                                          ({"response_format": {"type": "json_object"}}, "response_format")])
def test_options_hybrid_cannot_honour_are_refused_by_name(served, extra, param):
    running, _ = served
    r = post(running, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": QUESTION}],
                                               **extra})
    assert param in shaped(r, 400, "unsupported_parameter", param)["message"]


def test_no_tools_asked_for_is_served(served):
    running, _ = served
    r = post(running, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": QUESTION}],
                                               "tool_choice": "none", "tools": [], "stop": None, "top_p": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route, field", [("/v1/chat/completions", "max_tokens"),
                                          ("/v1/chat/completions", "max_completion_tokens"),
                                          ("/v1/completions", "max_tokens")])
def test_max_tokens_over_the_cap_is_refused_naming_the_cap(served, route, field):
    running, _ = served
    body = {"model": "a", field: 513, **({"prompt": QUESTION} if route == "/v1/completions" else
                                         {"messages": [{"role": "user", "content": QUESTION}]})}
    err = shaped(post(running, route, body), 400, "max_tokens_over_limit", field)
    assert "513" in err["message"] and "512" in err["message"] and "--max-tokens-limit" in err["message"]
    assert post(running, route, {**body, field: 512}).status_code == 200


# --- the request log ------------------------------------------------------------------------------------
def test_one_log_line_per_request_naming_the_key_never_the_key_or_text(served, caplog):
    running, _ = served
    with caplog.at_level(logging.INFO, logger="hybrid.serve"):
        answer = post(running, "/v1/chat/completions", {"model": "a", "messages": [
            {"role": "user", "content": "ZEBRA-7 how long does the battery last?"}]}).json()
        post(running, "/v1/models", None, key=KEYS["hr"], method="GET")
        post(running, "/v1/models", None, key="my-wrong-secret", method="GET")
        post(running, "/v1/SECRET-PATH", {})
        deadline = time.monotonic() + 10  # a line is logged once its response is sent: a client may read first
        while len([r for r in caplog.records if r.name == "hybrid.serve"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "hybrid.serve"]
    assert re.fullmatch(r"POST /v1/chat/completions 200 \d+\.\dms key=pub", lines[0]), lines
    assert re.fullmatch(r"GET /v1/models 200 \d+\.\dms key=hr", lines[1])
    assert re.fullmatch(r"GET /v1/models 401 \d+\.\dms key=-", lines[2])
    assert re.fullmatch(r"POST \(other\) 404 \d+\.\dms key=-", lines[3]) and len(lines) == 4
    text = "\n".join(lines)
    quote = answer["hybrid"]["citations"][0]["quote"]
    for secret in (KEYS["pub"], KEYS["hr"], "my-wrong-secret", "ZEBRA", "SECRET-PATH", quote, "14 months"):
        assert secret not in text


def test_serve_help_names_health_and_metrics_and_log_level_is_a_choice(env, monkeypatch, server_log):
    import uvicorn
    from typer.testing import CliRunner

    from hybrid.cli import app as cli

    runner = CliRunner()
    out = runner.invoke(cli, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "/health" in out and "/metrics" in out and "--log-level" in out
    args = ["serve", "--index", str(env["index"]), "--base-model", str(env["base"]), "--port", str(free_port())]
    res = runner.invoke(cli, [*args, "--log-level", "loud"])
    assert res.exit_code == 2 and "loud" in res.output
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: None)
    res = runner.invoke(cli, [*args, "--log-level", "warning"])
    assert res.exit_code == 0, res.output
    assert server_log.level == logging.WARNING


# --- the clients RAG apps use ------------------------------------------------------------------------------
def test_langchain_chat_openai_gets_the_plain_answer(served):
    from langchain_openai import ChatOpenAI

    running, _ = served
    want = expected(chat(running.client(KEYS["pub"])).model_extra["hybrid"])
    assert want.startswith("14 months [1]\n\nSources:\n[1] ")
    llm = ChatOpenAI(base_url=running.url + "/v1", api_key=KEYS["pub"], model="a", max_retries=0, timeout=60)
    assert llm.invoke(QUESTION).content == want
    assert "".join(c.content for c in llm.stream(QUESTION)) == want


def test_llamaindex_openai_like_with_default_settings_gets_the_plain_answer(served):
    from llama_index.llms.openai_like import OpenAILike

    running, _ = served
    want = expected(chat(running.client(KEYS["pub"])).model_extra["hybrid"])
    assert want.startswith("14 months [1]\n\nSources:\n[1] ")
    llm = OpenAILike(api_base=running.url + "/v1", api_key=KEYS["pub"], model="a", max_retries=0, timeout=60)
    assert not llm.metadata.is_chat_model  # the default: it calls /v1/completions
    assert llm.complete(QUESTION).text == want
    assert "".join(r.delta or "" for r in llm.stream_complete(QUESTION)) == want
    metrics = post(running, "/metrics", None, method="GET").text
    assert 'hybrid_requests_total{code="200",route="/v1/completions"}' in metrics


def test_the_openai_client_gets_the_plain_answer_and_reads_the_citations(served):
    running, _ = served
    r = chat(running.client(KEYS["pub"]))
    notes = [n.url_citation for n in r.choices[0].message.annotations]
    cites = r.model_extra["hybrid"]["citations"]
    assert r.choices[0].message.content.startswith("14 months [1]")
    assert [n.url for n in notes] == [chunk_url(c["doc_id"], c["chunk_id"]) for c in cites if c["verified"]]
    assert json.loads(r.model_dump_json())["choices"][0]["message"]["annotations"][0]["type"] == "url_citation"
