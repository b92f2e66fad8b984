"""The SFT loss on answer tokens only, with the output head in the weights' own dtype.

Why: TRL 1.12's ``chunked_nll`` (its default) already skips prompt positions, but each chunk casts the
whole output head to float32 (``h.float() @ w.float().t()``) and recomputes it under gradient
checkpointing. On Gemma 3 270M that head is a 262,144 x 640 matrix (63 % of the model's parameters):
on 2 CPU cores it took ~3/4 of a training step (bench/train.py). Here each chunk of answer tokens
goes through the head once, in bfloat16 where the base is bfloat16 (AMX), as transformers' own
forward does, and its gradient is formed in the same pass (softmax - one-hot, Liger-kernel's
"fused linear cross-entropy" on the CPU); only the log-sum-exp and softmax are float32.

The patched forward returns the fields TRL's ``compute_loss`` reads for ``loss_type="chunked_nll"``
(``num_valid_tokens``, ``num_correct_tokens``, ``entropy_sum``), so the trainer's logged token
accuracy and entropy stay as they were. Without labels the original forward runs (generation,
evaluation). Memory: one chunk's logits at a time (~1 GB at 256 tokens x 262,144), not a batch's.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class AnswerLossOutput(CausalLMOutputWithPast):
    """What TRL's ``compute_loss`` reads after a ``chunked_nll`` forward (sums over this batch)."""

    num_correct_tokens: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    num_valid_tokens: torch.Tensor | None = None


CHUNK_TOKENS = 256  # answer tokens per pass over the head: ~16 bytes x vocabulary each at the peak


class _HeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, summed, in chunks of
    tokens, with the gradients computed in the same pass (the logits are never kept for backward).

    Forward returns (loss sum, correct argmax count, entropy sum), float32. Each chunk: logits in
    the weight's dtype, then float32 for the log-sum-exp and the softmax; d loss / d logits =
    softmax - one-hot, cast back to the weight's dtype for the two matmuls that carry it to
    ``hidden`` (and to ``weight`` and ``bias`` when they train).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap):
        needs_weight, needs_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = hidden.new_zeros((), dtype=torch.float32)
        entropy = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], CHUNK_TOKENS):
            h = hidden[start : start + CHUNK_TOKENS]
            t = targets[start : start + CHUNK_TOKENS]
            logits = F.linear(h, weight, bias).float()
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            correct += (logits.argmax(dim=-1) == t).sum()
            grad_logits = torch.exp(logits - lse[:, None])  # softmax
            entropy += (lse - torch.linalg.vecdot(grad_logits, logits)).sum()
            grad_logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if softcap is not None:
                grad_logits *= 1.0 - (logits / softcap) ** 2
            del logits
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[start : start + CHUNK_TOKENS] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h.to(weight.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss, correct, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct, _grad_entropy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        return (
            (grad_hidden * grad_loss).to(hidden_dtype),
            None if grad_weight is None else (grad_weight * grad_loss).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_loss).to(bias_dtype),
            None,
            None,
        )


def answer_token_loss(
    hidden_states: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    final_logit_softcapping: float | None = None,
) -> AnswerLossOutput:
    """Next-token cross-entropy over the positions whose target is not ``-100``.

    ``labels`` are aligned with the inputs (shifted here); ``shift_labels`` are already aligned with
    ``hidden_states``. The loss is the sum over valid tokens divided by ``num_items_in_batch`` when
    the trainer passes it (gradient accumulation), else by this batch's valid-token count. A plain
    ``nn.Linear`` head goes through the chunked pass above; any other head module (peft's
    trainable-token wrapper for added tokens) is called as it is, its logits kept for backward.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("answer_token_loss needs labels or shift_labels")
        hidden_states, shift_labels = hidden_states[..., :-1, :], labels[..., 1:]
    targets = shift_labels.reshape(-1)
    valid = targets != -100
    hidden = hidden_states.reshape(-1, hidden_states.size(-1))[valid]
    targets = targets[valid]
    if type(head) is torch.nn.Linear:
        loss_sum, correct, entropy = _HeadCrossEntropy.apply(
            hidden.to(head.weight.dtype), head.weight, head.bias, targets, final_logit_softcapping
        )
    else:
        logits = head(hidden).float()
        if final_logit_softcapping is not None:
            logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
        log_p = F.log_softmax(logits, dim=-1)
        loss_sum = F.nll_loss(log_p, targets, reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == targets).sum().float()
            entropy = -(log_p.exp() * log_p).sum()
    count = valid.sum()
    if num_items_in_batch is None:
        loss = loss_sum / count.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        loss = loss_sum / num_items_in_batch
    return AnswerLossOutput(
        loss=loss, logits=None, num_correct_tokens=correct, entropy_sum=entropy, num_valid_tokens=count
    )


def patch_answer_loss(model: torch.nn.Module) -> None:
    """Give a causal LM (for peft: the inner model) a ``forward`` that, with labels, runs the decoder
    and :func:`answer_token_loss` instead of the full-sequence head (an instance attribute: deleting
    it restores the class's forward)."""
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    original_forward = model.forward
    head = model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ):
        if labels is None and shift_labels is None:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        kwargs.pop("use_cache", None)
        kwargs.pop("logits_to_keep", None)
        hidden = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).last_hidden_state
        return answer_token_loss(
            hidden,
            head,
            labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            final_logit_softcapping=softcap,
        )

    # The original signature, so the Trainer still sees that the model takes loss kwargs.
    forward.__signature__ = inspect.signature(original_forward.__func__)
    model.forward = types.MethodType(forward, model)
