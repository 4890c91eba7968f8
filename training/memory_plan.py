"""Peak-memory estimate for fine-tuning, made before any weight is loaded.

The estimate adds, in bytes:
  runtime     the Python + torch + transformers process before the model
  weights     fp32 (4 B/param); QLoRA: NF4 linear weights at 0.5 B/param plus
              double-quantised constants, other weights (embeddings, norms) in the
              compute dtype, plus bitsandbytes' CPU dequantisation workspace
  trainable   gradients + AdamW moments (full: 12 B/param) or the LoRA matrices with
              theirs (16 B/param)
  activations per token: with gradient checkpointing each layer's input plus one
              layer's activations (~10 x hidden + 5 x intermediate floats), without it
              every layer's; plus the input of every LoRA-wrapped projection (PEFT
              keeps it for the adapter's backward)
  logits      per scored token: with `scored_tokens` (SFT's loss on the completion only,
              tuning/completion_loss.py) 3 x vocab fp32 floats for the completion's
              positions (logits, log-softmax, their gradient); else 5 x vocab for every
              position (TRL's loss with its entropy/accuracy metrics)
  precision   bf16 (autocast) stores activations in 3 bytes a value on average on a CPU
              (bf16 matmul outputs, fp32 norms and sums), 2 on CUDA; weights and the
              trainable terms stay fp32 (mixed precision keeps them so)
On CPU, bitsandbytes' 4-bit path keeps fp32 dequantised copies for backward, so the
per-token terms of QLoRA are 1.5x LoRA's: on this CPU QLoRA uses *more* memory than
LoRA for a 135M model, and its only saving is the weights. The constants (runtime,
workspace, 5x logits, 1.5x) were fitted on SmolLM2-135M with TRL's SFTTrainer on this
stack; benchmarks/memory_plan.py compares estimate and measured peak.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

GiB = 1024 ** 3
RUNTIME_BYTES = {"cpu": int(0.68 * GiB), "cuda": int(0.6 * GiB)}
QLORA_CPU_WORKSPACE = int(0.14 * GiB)
QLORA_CPU_TOKEN_FACTOR = 1.5
LOGIT_COPIES = 5
COMPLETION_LOGIT_COPIES = 3
LORA_IN_DIMS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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


def _dims(shape: ModelShape) -> dict[str, tuple[int, int]]:
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_hidden
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _targets(targets) -> list[str]:
    return list(LORA_IN_DIMS) if targets == "all-linear" else list(targets)


def lora_params(shape: ModelShape, r: int, targets: list[str] | str) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    dims = _dims(shape)
    return shape.layers * sum(r * sum(dims[n]) for n in _targets(targets) if n in dims)


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
             lora_r: int = 8, lora_targets: list[str] | str = ("q_proj", "v_proj"), device: str = "cpu",
             precision: str | None = None, scored_tokens: int | None = None) -> Estimate:
    """Peak bytes for one training configuration.

    Args:
        shape: ModelShape of the base model.
        strategy: full | lora | qlora.
        seq_len: tokens per sequence (the padded max length); batch: sequences per micro-batch.
        checkpointing: gradient checkpointing on.
        lora_r, lora_targets: LoRA rank and target modules.
        device: "cpu" or "cuda" (compute dtype and runtime overhead).
        precision: "fp32" or "bf16" (autocast); None = bf16 on CUDA, fp32 on CPU.
        scored_tokens: positions per sequence the loss projects onto the vocabulary (the longest
            completion); None = every position.

    Returns:
        Estimate with one field per term.
    """
    compute_bytes = 2 if device == "cuda" else 4
    linear = shape.params - shape.embed_params
    if strategy == "qlora":
        weights = int(linear * (0.5 + 0.127 / 8)) + shape.embed_params * compute_bytes
        weights += QLORA_CPU_WORKSPACE if device == "cpu" else 0
    else:
        weights = 4 * shape.params
    trainable_params = shape.params if strategy == "full" else lora_params(shape, lora_r, lora_targets)
    # Full: the weights are counted above; add fp32 gradients + 2 AdamW moments (12 B/param).
    # LoRA/QLoRA: the adapter's own fp32 weights too (16 B/param).
    trainable = 12 * trainable_params if strategy == "full" else 16 * trainable_params
    tokens = seq_len * batch
    precision = precision or ("bf16" if device == "cuda" else "fp32")
    # autocast on a CPU keeps norms, residual sums and softmax in fp32 beside the bf16 matmul outputs:
    # 3 bytes a value on average centred the errors on SmolLM2 (benchmarks/memory_plan.py --precision bf16)
    act_bytes = 4 if precision == "fp32" else 2 if device == "cuda" else 3
    per_layer = tokens * (10 * shape.hidden + 5 * shape.intermediate) * act_bytes
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * act_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    if strategy != "full":
        dims = _dims(shape)
        activations += shape.layers * tokens * sum(dims[n][0] for n in _targets(lora_targets) if n in dims) * act_bytes
    # the loss is computed in fp32
    logits = LOGIT_COPIES * tokens * shape.vocab * 4 if scored_tokens is None else \
        COMPLETION_LOGIT_COPIES * min(scored_tokens, seq_len) * batch * shape.vocab * 4
    if strategy == "qlora" and device == "cpu":
        activations, logits = int(activations * QLORA_CPU_TOKEN_FACTOR), int(logits * QLORA_CPU_TOKEN_FACTOR)
    return Estimate(strategy=strategy, runtime=RUNTIME_BYTES[device], weights=weights, trainable=trainable,
                    activations=int(activations), logits=logits)


def available_bytes(device: str) -> int:
    """Free memory now for this process: its GPU's free memory (LOCAL_RANK's under a launcher), or
    MemAvailable from /proc/meminfo shared by the processes a launcher started on this host
    (LOCAL_WORLD_SIZE): the plan is per rank."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))[0])
    share = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // share
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def plan(shape: ModelShape, requested: Literal["auto", "full", "lora", "qlora"], seq_len: int, batch: int,
         checkpointing: bool, lora_r: int, lora_targets, device: str, available: int | None = None,
         headroom: float = 0.9, precision: str | None = None, scored_tokens: int | None = None) -> dict:
    """Estimate every strategy, pick one, or explain what to change.

    `seq_len` is the longest padded sequence a micro-batch can hold: training pads each batch to
    its longest example, so callers pass min(max_length, longest example).

    `auto` tries QLoRA then LoRA on CUDA, LoRA then QLoRA on CPU (there 4-bit saves only
    the weights, costs more per token, and runs slower); full fine-tuning only when asked for.
    When no strategy fits `batch` sequences at once, the micro-batch is split: the largest
    divisor of `batch` that fits, with gradient accumulation multiplied by `batch / micro-batch`,
    so an optimizer step still sees the same sequences (the update is the same up to numerics).

    Returns:
        {"device", "precision", "available", "budget", "estimates": {strategy: {term: bytes, "total"}} (at the
         micro-batch chosen), "chosen", "fits", "seq_len", "batch" (micro-batch to run),
         "requested_batch", "accum_factor" (multiply gradient accumulation by it)}.
    """
    available = available_bytes(device) if available is None else available
    budget = int(available * headroom)
    precision = precision or ("bf16" if device == "cuda" else "fp32")
    order = {"auto": ["qlora", "lora"] if device == "cuda" else ["lora", "qlora"]}.get(requested, [requested])
    for micro in [b for b in range(batch, 0, -1) if batch % b == 0]:
        ests = {s: estimate(shape, s, seq_len, micro, checkpointing, lora_r, lora_targets, device, precision,
                            scored_tokens)
                for s in ("full", "lora", "qlora")}
        chosen = next((s for s in order if ests[s].total <= budget), None)
        if chosen:
            break
    # (when nothing fits, the loop ends at one sequence: the estimates say what that needs)
    return {"device": device, "precision": precision, "available": available, "budget": budget,
            "estimates": {s: {**asdict(e), "total": e.total} for s, e in ests.items()},
            "requested": requested, "chosen": chosen, "fits": chosen is not None, "order": order,
            "seq_len": seq_len, "batch": micro, "requested_batch": batch, "accum_factor": batch // micro}


def describe(p: dict) -> str:
    """A small printed table of the plan."""
    lines = [f"memory plan ({p['device']} {p.get('precision', 'fp32')}, {p['available'] / GiB:.1f} GiB available, budget {p['budget'] / GiB:.1f} GiB, "
             f"{p.get('batch', '?')} x {p.get('seq_len', '?')} tokens):"]
    if p.get("accum_factor", 1) > 1:
        lines.append(f"  {p['requested_batch']} sequences at once do not fit: micro-batch {p['batch']}, gradient "
                     f"accumulation x{p['accum_factor']} (same sequences per optimizer step)")
    lines.append("  strategy   weights  trainable  activations  logits   total")
    for s, e in p["estimates"].items():
        mark = " <- chosen" if s == p["chosen"] else ""
        lines.append(f"  {s:<8} {e['weights'] / GiB:8.2f} {e['trainable'] / GiB:10.2f} {e['activations'] / GiB:12.2f} "
                     f"{e['logits'] / GiB:7.2f} {e['total'] / GiB:7.2f} GiB{mark}")
    return "\n".join(lines)
