"""What a request to `hybrid serve` may say: the chat, completion and embedding bodies validated field
by field (ServeError 400 naming the field in the message and as `param`), text that every later step
can encode, and the response's extension object. An option hybrid cannot honour (tools, stop
sequences, logprobs, a max_tokens over the server's cap, ...) is refused by name, never ignored.

Everything here runs before a request is queued, so what the engine receives is what the sampler,
the tokenizer and the index accept: one caller's bad input is that caller's 4xx, never the engine's
failure (hybrid/serve_engine.py).

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(max_new_tokens=96, max_tokens_limit=512, k=5)
    >>> parse_chat({"model": "raft", "messages": [{"role": "user", "content": "Who approves travel?"}]}, cfg)["question"]
    'Who approves travel?'
"""

from __future__ import annotations

from hybrid.serve_answers import FORMATS
from hybrid.serve_engine import ServeError
from core.errors import lone_surrogate
from tuning.prompting import ABSTAIN

ROLES = ("system", "developer", "user", "assistant")


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


def bad(message: str, param: str | None, code: str | None = None) -> ServeError:
    return ServeError(400, message, code=code, param=param)


# Options hybrid cannot honour, with the values that ask for nothing (what clients send by default).
# Anything else is refused: a caller who asks for tools or stop sequences must not get an answer
# that quietly ignored them.
NEUTRAL = {"tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
           "function_call": (None, "none"), "stop": (None, [], ""), "logit_bias": (None, {}),
           "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "top_p": (None, 1, 1.0),
           "seed": (None,), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
           "suffix": (None, ""), "best_of": (None, 1)}
WHY = {"tools": "hybrid answers from its documents and calls no tools",
       "functions": "hybrid answers from its documents and calls no functions",
       "tool_choice": "hybrid calls no tools (only 'none' is accepted)",
       "function_call": "hybrid calls no functions (only 'none' is accepted)",
       "stop": "stop sequences would cut the answer's template before its citations are checked",
       "echo": "the prompt is hybrid's own template with the passages, never sent back",
       "logprobs": "log-probabilities are not returned", "top_logprobs": "log-probabilities are not returned"}


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first option hybrid cannot honour that asks for something."""
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in neutral:
            raise bad(f"'{name}' is not supported by hybrid serve: {WHY.get(name, 'hybrid does not apply it')}; "
                      f"leave it out", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("'response_format': only {\"type\": \"text\"}; the answer's form is hybrid's (the "
                  "answer and its sources)", "response_format", "unsupported_parameter")


def _decoding(body: dict, cfg) -> dict:
    """The fields chat and text completions share: max_tokens, temperature, k, n, stream, content_format."""
    refuse_unsupported(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = cfg.max_new_tokens if body.get(name) is None else body[name]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad(f"'{name}' must be a positive integer", name)
    if max_tokens > cfg.max_tokens_limit:
        raise bad(f"'{name}' {max_tokens} is over this server's cap of {cfg.max_tokens_limit} tokens (hybrid serve "
                  f"--max-tokens-limit); ask for at most {cfg.max_tokens_limit}", name, "max_tokens_over_limit")
    temperature = 0.0 if body.get("temperature") is None else body["temperature"]
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise bad("'temperature' must be a number in [0, 2]", "temperature")
    if 0 < temperature < MIN_TEMPERATURE:
        raise bad(f"'temperature' {temperature:g} is too small to sample with; use 0 for greedy decoding or a value "
                  f"in [{MIN_TEMPERATURE}, 2]", "temperature")
    k = body.get("k", cfg.k)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 50:
        raise bad("'k' must be an integer in [1, 50]", "k")
    if body.get("n", 1) not in (1, None) or isinstance(body.get("n"), bool):
        raise bad("'n' must be 1", "n")
    if not isinstance(body.get("stream", False), bool):
        raise bad("'stream' must be true or false", "stream")
    fmt = body.get("content_format", "plain")
    if fmt not in FORMATS:
        raise bad(f"'content_format' must be one of {', '.join(FORMATS)} (plain: the answer and its sources; raw: "
                  f"the model's completion as written)", "content_format")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "k": k,
            "stream": bool(body.get("stream", False)), "content_format": fmt}


def _model(body) -> str:
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: an adapter name or the base model's (GET /v1/models)", "model")
    return unicode_text(model, "'model'")


def parse_chat(body, cfg) -> dict:
    """The chat request's fields, validated against `cfg` (a ServeConfig: max_new_tokens, max_tokens_limit,
    k); ServeError(400) naming the field otherwise."""
    model, messages = _model(body), body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content}", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        turns.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}].content")})
    if turns[-1]["role"] != "user" or not turns[-1]["content"].strip():
        raise bad("the last message must be a non-empty user message: the question", "messages")
    # hybrid's system prompt is the one the adapters were trained with: a client's system turns are dropped
    history = [t for t in turns[:-1] if t["role"] in ("user", "assistant")]
    return {"model": model, "question": turns[-1]["content"], "history": history, **_decoding(body, cfg)}


def parse_completion(body, cfg) -> dict:
    """A /v1/completions request: its `prompt` (a string, or a list of one) is the question, answered
    as a chat's last user message is; the other fields as in `parse_chat`."""
    model, prompt = _model(body), body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("'prompt' must be a non-empty string (one question; token ids and several prompts are not "
                  "accepted)", "prompt")
    return {"model": model, "question": unicode_text(prompt, "'prompt'"), "history": [], **_decoding(body, cfg)}


MAX_INPUTS = 2048  # as OpenAI's embeddings route


def parse_embeddings(body, model_id: str, dim: int) -> dict:
    """A /v1/embeddings request for the index's embedder (`model_id`, `dim`): {"inputs", "base64"}."""
    model, inputs = _model(body), body.get("input")
    if model != model_id:
        raise ServeError(404, f"embedding model {model!r} not found: this server embeds with its index's embedder, "
                              f"'{model_id}'", code="model_not_found", param="model")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS or \
            not all(isinstance(t, str) and t.strip() for t in inputs):
        raise bad(f"'input' must be a non-empty string or a list of 1 to {MAX_INPUTS} non-empty strings (text; "
                  f"token ids are not accepted)", "input")
    for i, t in enumerate(inputs):
        unicode_text(t, f"input[{i}]")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad("'encoding_format' must be float or base64", "encoding_format")
    if body.get("dimensions") not in (None, dim):
        raise bad(f"'dimensions': this embedder makes {dim}-dimensional vectors only", "dimensions")
    return {"inputs": inputs, "base64": fmt == "base64"}


def hybrid_fields(a) -> dict:
    """The completion's extension object (a None answer: nothing visible to this caller, so it abstained)."""
    if a is None:
        return {"answer": ABSTAIN, "abstained": True, "citations": [], "passages": [], "support": None,
                "gated": False, "calibrated_abstain": False, "calibrated_answer": False, "malformed": False,
                "probe_decided": None}
    return {"answer": a.answer, "abstained": a.abstained, "citations": a.citations, "passages": a.passages,
            "support": a.support, "gated": a.gated, "calibrated_abstain": a.calibrated_abstain,
            "calibrated_answer": a.calibrated_answer,
            # the completion broke the answer template, so it was served as the abstention (tuning/prompting.py)
            "malformed": bool(getattr(a, "malformed", False)),
            # the probe refused it: "before" generating (answerability) or "after" (its rule); None: it did not
            "probe_decided": getattr(a, "probe_decided", None)}
