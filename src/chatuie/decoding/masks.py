"""Allowed-token sets of grammar states: id lists, span walks and their cached tensors."""

from __future__ import annotations

import torch

# A grammar state: (structure node, sub-state, roles used in the current arguments object). The
# sub-state is a key-trie node in key slots and
# ``sam_state << 3 | pending_utf8_bytes << 1 | in_escape`` in span slots.
State = tuple[int, int, int]


def _id_tensor(ids: list[int], device: torch.device, vocab: int) -> torch.Tensor:
    if ids and max(ids) >= vocab:  # tokenizer larger than the model's vocabulary
        ids = [i for i in ids if i < vocab]
    return torch.tensor(ids, dtype=torch.long, device=device)


class _SpanWalk:
    """Tokens that stay inside a span from one span sub-state (shared by every span slot and
    every used-keys mask), and the trie nodes at which the span may close."""

    __slots__ = ("ids", "subs", "closing", "_tensors")

    def __init__(self, ids: list[int], subs: list[int], closing: list[int]) -> None:
        self.ids = ids
        self.subs = subs
        self.closing = closing
        self._tensors: dict[tuple[torch.device, int], torch.Tensor] = {}

    def tensor(self, device: torch.device, vocab: int) -> torch.Tensor:
        key = (device, vocab)
        cached = self._tensors.get(key)
        if cached is None:
            cached = self._tensors[key] = _id_tensor(self.ids, device, vocab)
        return cached


class _Allowed:
    """The tokens allowed in one state, with the state each leads to (built on demand)."""

    __slots__ = ("_ids", "_states", "_span", "ranked_needs", "ranked_ids", "_tensors")

    def __init__(
        self,
        ids: list[int] | None,
        states: list[State] | None,
        span: tuple[State, _SpanWalk, list[int], list[State]] | None = None,
    ) -> None:
        self._ids = ids
        self._states = states
        # Span states: (state, inside-span walk, ids crossing the closing quote, their states);
        # the inside part is shared, so the lists of this state are only built when asked for.
        self._span = span
        # For the budget: the tokens sorted by what completing needs after them (lazy).
        self.ranked_needs: list[int] | None = None
        self.ranked_ids: list[int] = []
        self._tensors: dict[tuple[int, torch.device, int], torch.Tensor] = {}

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            assert self._span is not None
            _, inside, crossing_ids, _ = self._span
            self._ids = inside.ids + crossing_ids
        return self._ids

    @property
    def states(self) -> list[State]:
        if self._states is None:
            assert self._span is not None
            (node, _, used), inside, _, crossing_states = self._span
            self._states = [(node, sub, used) for sub in inside.subs]
            self._states += crossing_states
        return self._states

    def __bool__(self) -> bool:
        if self._span is not None:
            return bool(self._span[1].ids or self._span[2])
        return bool(self._ids)

    def tensor(self, device: torch.device, vocab: int, cut: int = -1) -> torch.Tensor:
        """All the tokens (``cut < 0``), or the ``cut`` cheapest to complete after."""
        key = (cut, device, vocab)
        cached = self._tensors.get(key)
        if cached is None:
            if cut >= 0:
                cached = _id_tensor(self.ranked_ids[:cut], device, vocab)
            elif self._span is not None:
                _, inside, crossing_ids, _ = self._span
                cached = torch.cat([inside.tensor(device, vocab), _id_tensor(crossing_ids, device, vocab)])
            else:
                cached = _id_tensor(self.ids, device, vocab)
            self._tensors[key] = cached
        return cached
