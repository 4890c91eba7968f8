"""What a request to `hybrid serve` may say: the chat body validated field by field (ServeError 400
naming the field), text that every later step can encode, and the response's extension object.

Everything here runs before a request is queued, so what the engine receives is what the sampler,
the tokenizer and the index accept: one caller's bad input is that caller's 4xx, never the engine's
failure (hybrid/serve_engine.py).

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(max_new_tokens=96, max_tokens_limit=512, k=5)
    >>> parse_chat({"model": "raft", "messages": [{"role": "user", "content": "Who approves travel?"}]}, cfg)["question"]
    'Who approves travel?'
"""

from __future__ import annotations

from hybrid.serve_engine import ServeError
from retrieval.errors import lone_surrogate
from tuning.prompting import ABSTAIN

ROLES = ("system", "developer", "user", "assistant")


def error_response(exc: ServeError):
    """`exc` in OpenAI's error shape, `{"error": {"message", "type", "code"}}`."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse({"error": {"message": exc.message, "type": exc.kind, "code": exc.code}},
                        status_code=exc.status, headers=headers)


def unicode_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode; JSON's escapes can spell a lone surrogate ("\\ud800"), which no
    tokenizer, index or log can encode: a 400 for this request, before it reaches the engine."""
    if lone_surrogate(text):
        raise ServeError(400, f"{where}: holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid "
                              f"Unicode text", code="invalid_text")
    return text


def _text(content, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(content, str):
        return unicode_text(content, where)
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return unicode_text("".join(p["text"] for p in content), where)
    raise ServeError(400, f"{where}: must be a string or a list of text parts", code="invalid_content")


# Below this a sampled temperature overflows the sampler's logits/temperature (1e-300 is 0 in float32): 0 is greedy.
MIN_TEMPERATURE = 0.01


def parse_chat(body, cfg) -> dict:
    """The chat request's fields, validated against `cfg` (a ServeConfig: max_new_tokens, max_tokens_limit,
    k); ServeError(400) naming the field otherwise."""
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    model, messages = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model:
        raise ServeError(400, "'model' is required: an adapter name or the base model's (GET /v1/models)")
    unicode_text(model, "'model'")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list of {role, content}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ServeError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}")
        turns.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise ServeError(400, "the last message must be a non-empty user message: the question")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = cfg.max_new_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise ServeError(400, f"'max_tokens' must be an integer in [1, {cfg.max_tokens_limit}]")
    temperature = 0.0 if body.get("temperature") is None else body["temperature"]
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ServeError(400, "'temperature' must be a number in [0, 2]")
    if 0 < temperature < MIN_TEMPERATURE:
        raise ServeError(400, f"'temperature' {temperature:g} is too small to sample with; use 0 for greedy "
                              f"decoding or a value in [{MIN_TEMPERATURE}, 2]")
    k = body.get("k", cfg.k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
        raise ServeError(400, "'k' must be an integer in [1, 50]")
    if body.get("n", 1) != 1:
        raise ServeError(400, "'n' must be 1")
    if not isinstance(body.get("stream", False), bool):
        raise ServeError(400, "'stream' must be true or false")
    # hybrid's system prompt is the one the adapters were trained with: a client's system turns are dropped
    history = [t for t in turns[:-1] if t["role"] in ("user", "assistant")]
    return {"model": model, "question": turns[-1]["content"], "history": history, "max_tokens": max_tokens,
            "temperature": float(temperature), "k": k, "stream": bool(body.get("stream", False))}


def hybrid_fields(a) -> dict:
    """The completion's extension object (a None answer: nothing visible to this caller, so it abstained)."""
    if a is None:
        return {"answer": ABSTAIN, "abstained": True, "citations": [], "passages": [], "support": None,
                "gated": False, "calibrated_abstain": False, "calibrated_answer": False}
    return {"answer": a.answer, "abstained": a.abstained, "citations": a.citations, "passages": a.passages,
            "support": a.support, "gated": a.gated, "calibrated_abstain": a.calibrated_abstain,
            "calibrated_answer": a.calibrated_answer}
