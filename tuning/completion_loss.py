"""The SFT loss with the LM head run only where a label counts (the completion's tokens).

RAFT examples are long prompts (the question and its documents) and short completions: with
TRL's loss every prompt position is also projected onto the vocabulary (151,936 entries for Qwen
2.5), and on a CPU TRL's fused head scores every position (it keeps only the labelled ones on
Triton devices). Here the backbone runs once (under bf16 autocast where the run is bf16), then only
the labelled positions' hidden states are projected, in fp32 (the loss's precision: bf16 logits
would round a logit of 20 by up to 0.06), and the cross-entropy is summed over them.

The loss is the same as the full computation (`model(**batch).loss`, tests/tuning/test_completion_loss.py)
and is normalised like TRL's: by `num_items_in_batch` (the labelled tokens of the whole optimizer
step, so gradient accumulation averages over tokens), else by this batch's labelled tokens.

    add_completion_head(model)
    loss = completion_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from trl import SFTTrainer


def supported(model) -> bool:
    """Whether the model's logits are a plain projection of its last hidden state (no soft-capping or
    scaling, which `completion_loss` does not apply); others keep TRL's loss."""
    cfg = _causal_lm(model).config.get_text_config()
    return all(getattr(cfg, name, None) in (None, 1.0) for name in
               ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def _causal_lm(model):
    """The Hugging Face causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def add_completion_head(model) -> None:
    """Give the causal LM inside `model` a second forward: `model(..., labels=labels, completion_only=True)`
    returns (loss, labelled tokens, of them the top-1 token) with the LM head on the labelled positions
    only. Without `completion_only` the forward is the one it had (generation is unchanged).

    A flag on the model's own forward, not a call into its modules, so a wrapper (PEFT, DDP) runs
    as it does for any forward: DDP's gradient synchronisation needs its forward to run.
    """
    lm = _causal_lm(model)
    previous = lm.forward

    @functools.wraps(type(lm).forward)  # generate checks its kwargs against this signature
    def forward(self, *args, completion_only=False, labels=None, num_items_in_batch=None, **kwargs):
        if not completion_only:
            extra = {k: v for k, v in (("labels", labels), ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous(*args, **kwargs, **extra)
        return _scored(self, labels, num_items_in_batch, *args, **kwargs)

    lm.forward = types.MethodType(forward, lm)


def completion_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens, the LM head applied to those positions only
    (`add_completion_head(model)` first).

    Args:
        model: a causal LM, or a PEFT model around one (LoRA layers run inside the backbone).
        inputs: `input_ids`, `attention_mask`, `labels` (-100 where no loss counts), as TRL's
            collator makes them.
        num_items_in_batch: labelled tokens the loss is divided by (the optimizer step's); None =
            this batch's.
    """
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
    return model(**forward, labels=inputs["labels"], num_items_in_batch=num_items_in_batch, completion_only=True)[0]


def _scored(lm, labels, num_items_in_batch, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, labelled tokens, of them the model's top-1 token) for one batch."""
    hidden = lm.base_model(*args, **kwargs, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    mask = targets != -100
    head = lm.get_output_embeddings()
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden[mask].float(), head.weight.float(),
                          None if head.bias is None else head.bias.float())
        total = F.cross_entropy(logits, targets[mask], reduction="sum")
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
    return loss, mask.sum(), (logits.detach().argmax(-1) == targets[mask]).sum()


class CompletionSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with `completion_loss` (TRL's own loss for models it does not support). It logs
    what TRL's loss logs that it can know (tokens seen, token accuracy; not the entropy, which needs
    every position's full distribution)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.completion_head = supported(self.model)
        if self.completion_head:
            add_completion_head(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.completion_head:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        forward = {k: v for k, v in inputs.items() if k not in ("labels", "use_cache")}
        loss, labelled, right = model(**forward, labels=inputs["labels"], num_items_in_batch=num_items_in_batch,
                                      completion_only=True)
        # as TRL's: num_items_in_batch counts every rank's tokens, and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        mode = "train" if self.model.training else "eval"
        counts = self.accelerator.gather_for_metrics(torch.stack([labelled, right]).view(1, 2)).view(-1, 2).sum(0)
        self._metrics[mode]["mean_token_accuracy"].append(float(counts[1] / counts[0]) if counts[0] else 0.0)
        if mode == "train":
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss
