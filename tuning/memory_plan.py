"""Peak-memory estimate for fine-tuning, made before any weight is loaded.

The estimate adds, in bytes:
  runtime     the Python + torch process before the model (measured on this stack)
  weights     fp32 (4 B/param); QLoRA: NF4 linear weights at 0.5 B/param plus
              double-quantised constants, other weights (embeddings, norms) in the
              compute dtype
  trainable   weights + gradients + AdamW moments of the trainable parameters
              (all of them for full fine-tuning; the LoRA A/B matrices otherwise)
  activations what backward keeps per token and layer (LLaMA block: ~10 x hidden +
              5 x intermediate floats); with gradient checkpointing only each layer's
              input plus one layer's activations
  logits      batch x seq x vocab floats, times 3 (logits, log-softmax, gradient):
              with a 49k vocabulary this is often the largest term
and scales the activation terms by a factor fitted on this stack's measurements
(benchmarks/memory_plan.py compares estimate and measured peak).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

GiB = 1024 ** 3
RUNTIME_BYTES = {"cpu": int(0.55 * GiB), "cuda": int(0.6 * GiB)}
ACTIVATION_FACTOR = 1.0
Strategy = Literal["full", "lora", "qlora"]


@dataclass
class ModelShape:
    """What the estimate needs from a model config."""

    params: int
    embed_params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    kv_hidden: int

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", heads) or heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
        mlp = 3 * h * inter
        tied = bool(getattr(cfg, "tie_word_embeddings", True))
        embed = vocab * h * (1 if tied else 2)
        return cls(params=layers * (attn + mlp + 2 * h) + embed + h, embed_params=embed, layers=layers, hidden=h,
                   intermediate=inter, vocab=vocab, tied=tied, kv_hidden=kv * head_dim)


def lora_params(shape: ModelShape, r: int, targets: list[str] | str) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_hidden
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    names = list(dims) if targets == "all-linear" else list(targets)
    return shape.layers * sum(r * sum(dims[n]) for n in names if n in dims)


@dataclass
class Estimate:
    strategy: str
    runtime: int
    weights: int
    trainable: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.trainable + self.activations + self.logits


def estimate(shape: ModelShape, strategy: Strategy, seq_len: int, batch: int, checkpointing: bool,
             lora_r: int = 8, lora_targets: list[str] | str = ("q_proj", "v_proj"), device: str = "cpu") -> Estimate:
    """Peak bytes for one training configuration.

    Args:
        shape: ModelShape of the base model.
        strategy: full | lora | qlora.
        seq_len: tokens per sequence (the padded max length); batch: sequences per micro-batch.
        checkpointing: gradient checkpointing on.
        lora_r, lora_targets: LoRA rank and target modules.
        device: "cpu" or "cuda" (compute dtype and runtime overhead).

    Returns:
        Estimate with one field per term.
    """
    compute_bytes = 2 if device == "cuda" else 4
    linear = shape.params - shape.embed_params
    if strategy == "qlora":
        weights = int(linear * (0.5 + 0.127 / 8)) + shape.embed_params * compute_bytes
    else:
        weights = 4 * shape.params
    trainable_params = shape.params if strategy == "full" else lora_params(shape, lora_r, list(lora_targets)
                                                                          if lora_targets != "all-linear" else lora_targets)
    # Full: the weights are counted above; add fp32 gradients + 2 AdamW moments (12 B/param).
    # LoRA/QLoRA: the adapter's own fp32 weights too (16 B/param).
    trainable = 12 * trainable_params if strategy == "full" else 16 * trainable_params
    tokens = seq_len * batch
    act_bytes = 2 if device == "cuda" else 4
    per_layer = tokens * (10 * shape.hidden + 5 * shape.intermediate) * act_bytes
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * act_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    logits = 3 * tokens * shape.vocab * 4  # the loss is computed in fp32
    return Estimate(strategy=strategy, runtime=RUNTIME_BYTES[device], weights=weights, trainable=trainable,
                    activations=int(activations * ACTIVATION_FACTOR), logits=logits)


def available_bytes(device: str) -> int:
    """Free memory now: CUDA free memory, or MemAvailable from /proc/meminfo."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def plan(shape: ModelShape, requested: Literal["auto", "full", "lora", "qlora"], seq_len: int, batch: int,
         checkpointing: bool, lora_r: int, lora_targets, device: str, available: int | None = None,
         headroom: float = 0.9) -> dict:
    """Estimate every strategy, pick one, or explain what to change.

    `auto` tries QLoRA then LoRA on CUDA, LoRA then QLoRA on CPU (4-bit saves little memory
    there, because embeddings and activations dominate, and runs slower); full fine-tuning
    only when asked for.

    Returns:
        {"device", "available", "budget", "estimates": {strategy: {term: bytes, "total"}}, "chosen", "fits"}.
    """
    available = available_bytes(device) if available is None else available
    budget = int(available * headroom)
    ests = {s: estimate(shape, s, seq_len, batch, checkpointing, lora_r, lora_targets, device)
            for s in ("full", "lora", "qlora")}
    order = {"auto": ["qlora", "lora"] if device == "cuda" else ["lora", "qlora"]}.get(requested, [requested])
    chosen = next((s for s in order if ests[s].total <= budget), None)
    return {"device": device, "available": available, "budget": budget,
            "estimates": {s: {**asdict(e), "total": e.total} for s, e in ests.items()},
            "requested": requested, "chosen": chosen, "fits": chosen is not None, "order": order}


def describe(p: dict) -> str:
    """A small printed table of the plan."""
    lines = [f"memory plan ({p['device']}, {p['available'] / GiB:.1f} GiB available, budget {p['budget'] / GiB:.1f} GiB):",
             "  strategy   weights  trainable  activations  logits   total"]
    for s, e in p["estimates"].items():
        mark = " <- chosen" if s == p["chosen"] else ""
        lines.append(f"  {s:<8} {e['weights'] / GiB:8.2f} {e['trainable'] / GiB:10.2f} {e['activations'] / GiB:12.2f} "
                     f"{e['logits'] / GiB:7.2f} {e['total'] / GiB:7.2f} GiB{mark}")
    return "\n".join(lines)
