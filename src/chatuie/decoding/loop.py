"""The constrained decoding loop: a KV cache, the output head over the allowed tokens only.

``transformers``' ``generate`` computes the whole output head at every step and then masks all
but the handful of tokens the grammar allows. Gemma 3's head is 262,144 x 640, over half of a
decode step; here each step multiplies the hidden states by the rows of the allowed tokens alone
(the union over the batch), which gives the same scores for those tokens. Rows that reach EOS
leave the batch (and the KV cache) at once, instead of being padded until the longest answer
ends; the cache grows in place (:mod:`chatuie.decoding.kv_cache`), not by a copy per step. The
tokens every prompt of a batch begins with (a dataset's system prompt, task and schema) are
prefilled once; their KV cache is reused by every row and by the next batch with the same prefix
(:class:`PrefixCache`).

Greedy answers equal ``generate``'s with the same processor (the argmax over the same scores; a
tie goes to the lower token id in both). Sampling draws from the same distribution (temperature,
top-k, top-p over the allowed tokens) with other random numbers.

Only models whose logits are ``lm_head(hidden)`` (with Gemma's optional final soft-capping) take
this path; :func:`supports_allowed_head` says which, and the caller falls back to ``generate``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

# Causal LMs whose forward is ``logits = lm_head(decoder(...).last_hidden_state)`` plus, where
# the config sets it, ``final_logit_softcapping`` (read from their modeling code).
_PLAIN_HEAD_TYPES = frozenset(
    {"llama", "gemma", "gemma2", "gemma3_text", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}
)


def _base_model(model: Any) -> Any:
    """The ``transformers`` model under a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_allowed_head(model: Any) -> bool:
    """Whether :func:`decode` can run ``model`` (else use ``generate``)."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return (
        getattr(config, "model_type", None) in _PLAIN_HEAD_TYPES
        and isinstance(head, torch.nn.Linear)
        and head.bias is None
        and type(head) is torch.nn.Linear  # a LoRA / quantised head computes more than weight rows
        and callable(getattr(base, "get_decoder", None))
    )


class _Head:
    """Scores of chosen token ids: ``hidden @ W[ids].T`` (soft-capped as the model does)."""

    def __init__(self, base: Any) -> None:
        self.weight = base.get_output_embeddings().weight
        self.vocab = self.weight.shape[0]
        self.softcap = getattr(base.config, "final_logit_softcapping", None)
        # Past this share of the vocabulary, gathering rows costs more than the full product.
        self.full_above = self.vocab // 4

    def __call__(self, hidden: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        weight = self.weight if ids is None else self.weight.index_select(0, ids)
        scores = (hidden.to(weight.dtype) @ weight.T).float()
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return scores


def _allowed_scores(
    head: _Head, hidden: torch.Tensor, choices: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(scores, their columns' token ids or ``None`` for the whole vocabulary, the mask of each
    row's allowed columns): the head over the union of the rows' allowed tokens, or over every
    token where that union is too large for gathering its rows to pay."""
    ids = torch.cat(choices).unique()  # sorted: ties go to the lower id, as in a full argmax
    if len(ids) > head.full_above:
        scores = head(hidden, None)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for row, row_ids in enumerate(choices):
            keep[row, row_ids] = True
        return scores, None, keep
    scores = head(hidden, ids)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row, row_ids in enumerate(choices):
        keep[row, torch.searchsorted(ids, row_ids)] = True
    return scores, ids, keep


def _select_top(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``transformers``' top-k then top-p filters, on already temperature-scaled scores."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


class Sampler:
    """Greedy (``do_sample=False``) or sampling with temperature, top-k and top-p."""

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return scores.argmax(dim=-1)
        scores = _select_top(scores / self.temperature, self.top_k, self.top_p)
        return torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1)


class PrefixCache:
    """The KV cache of the last shared prompt prefix, kept across batches (one decoding job)."""

    def __init__(self) -> None:
        self.ids: tuple[int, ...] = ()
        self.cache: Any = None

    def prefix_length(self, prompts: Sequence[Sequence[int]]) -> int:
        """The prefix to share in a batch of ``prompts``: the cached one where every prompt starts
        with it (no second prefill), else what they all share (:func:`shared_prefix_length`)."""
        length = shared_prefix_length(prompts)
        cached = len(self.ids)
        if 0 < cached <= min(len(p) for p in prompts) - 1 and all(
            tuple(p[:cached]) == self.ids for p in prompts
        ):
            return cached
        return length

    def for_rows(self, decoder: Any, config: Any, prefix: torch.Tensor, pads: list[int]) -> Any:
        """A cache of ``len(prefix)`` slots per row: row ``r`` holds ``pads[r]`` empty (masked)
        slots, then the first ``len(prefix) - pads[r]`` prefix tokens' keys and values: the
        slots a left-padded batch gives them, so the window of a sliding-attention layer covers
        the same tokens as when the whole prompt is prefilled."""
        from chatuie.decoding.kv_cache import in_place_cache

        key = tuple(prefix.tolist())
        if key != self.ids:
            self.cache = in_place_cache(config)
            decoder(
                input_ids=prefix[None],
                attention_mask=torch.ones_like(prefix)[None],
                position_ids=torch.arange(len(prefix), device=prefix.device)[None],
                past_key_values=self.cache,
                use_cache=True,
            )
            self.ids = key
        cache = copy.deepcopy(self.cache)
        length = len(prefix)
        for layer in cache.layers:
            keys = layer.keys.new_zeros((len(pads), *layer.keys.shape[1:]))
            values = layer.values.new_zeros((len(pads), *layer.values.shape[1:]))
            for row, pad in enumerate(pads):
                if pad < length:
                    keys[row, :, pad:] = layer.keys[0, :, : length - pad]
                    values[row, :, pad:] = layer.values[0, :, : length - pad]
            layer.keys, layer.values = keys, values
        return cache


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares (at most the shortest prompt's length - 1:
    the last prompt position of each row gives its first answer token's scores)."""
    shortest = min(len(p) for p in prompts)
    first = prompts[0]
    length = 0
    while length < shortest - 1 and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def prefill(
    decoder: Any,
    config: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    prefix_length: int = 0,
    prefix_cache: PrefixCache | None = None,
) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Run left-padded prompts through the decoder: (their KV cache, the last position's hidden
    states, the position of each row's next token). The first ``prefix_length`` tokens every row
    shares come from ``prefix_cache`` (computed there once)."""
    from chatuie.decoding.kv_cache import in_place_cache

    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    window = getattr(config, "sliding_window", None)
    if window:  # a sliding layer's cache keeps ``window - 1`` slots: the prefix must fit there
        prefix_length = min(prefix_length, window - 1)
    if prefix_length > 0:
        store = prefix_cache if prefix_cache is not None else PrefixCache()
        pads = (mask == 0).sum(dim=1).tolist()
        longest = pads.index(min(pads))  # a row whose first tokens are the prefix itself
        prefix = input_ids[longest, pads[longest] : pads[longest] + prefix_length]
        cache = store.for_rows(decoder, config, prefix, pads)
        step_input, position = input_ids[:, prefix_length:], positions[:, prefix_length:]
    else:
        cache = in_place_cache(config)
        step_input, position = input_ids, positions
    hidden = decoder(
        input_ids=step_input,
        attention_mask=mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    if cache.get_seq_length() == 0:
        raise RuntimeError(
            "the model kept no KV cache (gradient checkpointing in training mode drops it): "
            "decode with the model in eval mode, or with gradient checkpointing off"
        )
    return cache, hidden, position[:, -1:] + 1


def step(
    decoder: Any, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any
) -> torch.Tensor:
    """Feed each row its last chosen token (``mask`` already covers it); the hidden states that
    score the next one."""
    return decoder(
        input_ids=tokens[:, None],
        attention_mask=mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]


def pick(
    head: _Head,
    hidden: torch.Tensor,
    choices: list[torch.Tensor] | None,
    sampler: Sampler,
    adjust: Callable[..., torch.Tensor] | None = None,
    adjust_args: tuple = (),
) -> torch.Tensor:
    """Each row's next token: the head over the rows' allowed tokens (``choices``; ``None``: the
    whole vocabulary), ``adjust(scores, ids, *adjust_args)`` (a penalty), the other tokens
    masked, sampled."""
    if choices is None:
        scores, ids, keep = head(hidden, None), None, None
    else:
        scores, ids, keep = _allowed_scores(head, hidden, choices)
    if adjust is not None:
        scores = adjust(scores, ids, *adjust_args)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    picked = sampler(scores)
    return picked if ids is None else ids[picked]


@torch.inference_mode()  # no autograd bookkeeping at all: a decode step is a few hundred small ops
def decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    allowed: Callable[[torch.Tensor, Sequence[int]], list[torch.Tensor]] | None,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    sampler: Sampler,
    adjust: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    prefix_length: int = 0,
    prefix_cache: PrefixCache | None = None,
) -> torch.Tensor:
    """Decode left-padded prompts; returns the sequences as ``generate`` does (prompt, answer,
    pad after EOS, as long as the longest answer).

    ``allowed(sequences, rows)`` gives, for each row index in ``rows``, the tensor of token ids
    it may take next (``sequences``: every row, all columns so far); ``None``: any token (free
    decoding, the whole head at every step). ``adjust(scores, ids,
    sequences, rows)`` may change the allowed tokens' scores first (a repetition penalty).
    ``prefix_length``: how many leading tokens of every (left-padded) prompt are the same (see
    :func:`shared_prefix_length`); they are prefilled once, through ``prefix_cache`` if given.
    """
    base = _base_model(model)
    decoder = base.get_decoder()
    head = _Head(base)
    device = input_ids.device
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    batch = input_ids.shape[0]
    mask = attention_mask.long()
    cache, hidden, position = prefill(decoder, base.config, input_ids, mask, prefix_length, prefix_cache)
    sequences = input_ids
    active = list(range(batch))  # batch rows still writing, in cache order
    tokens = input_ids[:, :0]  # each step's chosen tokens, fed at the next
    for index in range(max_new_tokens):
        if index:
            hidden = step(decoder, tokens, mask, position, cache)
            position = position + 1
        choices = None if allowed is None else allowed(sequences, active)
        tokens = pick(head, hidden, choices, sampler, adjust, (sequences, active))
        column = torch.full((batch, 1), pad_id, dtype=sequences.dtype, device=device)
        column[active, 0] = tokens
        sequences = torch.cat([sequences, column], dim=1)
        going = ~torch.isin(tokens, eos)
        if not bool(going.all()):
            if not bool(going.any()):
                break
            kept = going.nonzero().flatten()
            cache.batch_select_indices(kept)
            active = [active[i] for i in kept.tolist()]
            tokens, mask, position = tokens[kept], mask[kept], position[kept]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
    return sequences
