"""Continuous batching: a finished row's place in the batch goes to the next prompt.

:func:`chatuie.decoding.loop.decode` runs one batch until its longest answer ends; rows that end
leave, so the batch thins out while the longest answers are written (on a test split about 7
of 16 rows were still writing, on average over the steps). :func:`decode_continuous` takes the
whole job instead: whenever ``refill`` places are free, the next prompts join as a group. The
group is prefilled on its own (its shared beginning from the prefix cache) while the running
rows take their step, and the two caches are stacked into one, as a left-padded batch of all
those rows would hold them (:func:`chatuie.decoding.kv_cache.stack_rows`).

Each row is decoded as in :func:`~chatuie.decoding.loop.decode` (the head over its allowed
tokens, greedy or sampled); only the company it keeps changes, which moves scores by rounding
alone (in float32 the answers are those of one batch; in bfloat16 a near-tie can go the other
way, as with any other batching).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from chatuie.decoding.loop import PrefixCache, Sampler, _base_model, _Head, pick, prefill, step


class RowRules(Protocol):
    """The constraint, row by row (``IEConstraintProcessor`` in its per-row use)."""

    def row_allowed(self, index: int, generated: int, device: torch.device, vocab: int) -> torch.Tensor:
        """Token ids prompt ``index`` may take next, having written ``generated`` tokens."""
        ...

    def advance_row(self, index: int, token: int) -> None:
        """Prompt ``index`` wrote ``token``."""
        ...


AnswerAdjust = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def _answer_matrix(answers: list[list[int]], rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """The rows' answers so far, right-padded with -1 (a token id nothing has)."""
    width = max(len(answers[i]) for i in rows)
    matrix = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, i in enumerate(rows):
        matrix[r, : len(answers[i])] = torch.tensor(answers[i], dtype=torch.long)
    return matrix.to(device)


def _left_padded(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode_continuous(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    sampler: Sampler,
    rules: RowRules | None = None,
    adjust: AnswerAdjust | None = None,
    refill: int | None = None,
    prefix_cache: PrefixCache | None = None,
    on_finished: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Each prompt's answer token ids (its EOS last, when it wrote one), at most ``batch_size``
    rows decoding at a time.

    ``prompts``: token ids, unpadded, admitted in this order (longest first keeps the stacked
    cache narrow). ``rules``: the constraint (``None``: free decoding over the whole head).
    ``adjust(scores, ids, answers)`` may change the scores of the columns' token ids (``None``:
    the whole vocabulary) given the rows' answers so far (right-padded with -1): a repetition
    penalty. ``refill``: how many places must be free before new prompts join (default a quarter
    of the batch: each joining costs a copy of the running rows' cache). ``on_finished(n)``: ``n``
    more prompts are done.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    base = _base_model(model)
    decoder = base.get_decoder()
    head = _Head(base)
    device = next(model.parameters()).device
    eos = set(eos_ids)
    refill = max(1, batch_size // 4) if refill is None else max(1, min(refill, batch_size))
    store = prefix_cache if prefix_cache is not None else PrefixCache()
    waiting = deque(range(len(prompts)))
    answers: list[list[int]] = [[] for _ in prompts]
    rows: list[int] = []  # the prompt each batch row decodes, in cache order
    cache: Any = None
    mask = position = tokens = torch.empty(0, dtype=torch.long)
    while waiting or rows:
        hidden = None
        if rows:  # the running rows take their step
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            hidden = step(decoder, tokens, mask, position, cache)
            position = position + 1
        if waiting and batch_size - len(rows) >= min(refill, len(waiting)):
            group = [waiting.popleft() for _ in range(min(batch_size - len(rows), len(waiting)))]
            group_prompts = [prompts[i] for i in group]
            ids, group_mask = _left_padded(group_prompts, pad_id, device)
            group_cache, group_hidden, group_position = prefill(
                decoder, base.config, ids, group_mask, store.prefix_length(group_prompts), store
            )
            if rows:
                from chatuie.decoding.kv_cache import stack_rows

                mask = stack_rows(cache, mask, group_cache, group_mask)
                assert hidden is not None
                hidden = torch.cat([hidden, group_hidden])
                position = torch.cat([position, group_position])
            else:
                cache, mask, hidden, position = group_cache, group_mask, group_hidden, group_position
            rows = rows + group
        assert hidden is not None
        choices = None
        if rules is not None:
            choices = [rules.row_allowed(i, len(answers[i]), device, head.vocab) for i in rows]
        answers_so_far = () if adjust is None else (_answer_matrix(answers, rows, device),)
        tokens = pick(head, hidden, choices, sampler, adjust, answers_so_far)
        going = []
        for r, (index, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            answers[index].append(token)
            if rules is not None:
                rules.advance_row(index, token)
            if token not in eos and len(answers[index]) < max_new_tokens:
                going.append(r)
        if len(going) < len(rows):
            if on_finished is not None:
                on_finished(len(rows) - len(going))
            if going:
                kept = torch.tensor(going, device=device)
                cache.batch_select_indices(kept)
                tokens, mask, position = tokens[kept], mask[kept], position[kept]
            else:
                cache = None
            rows = [rows[r] for r in going]
    return answers
