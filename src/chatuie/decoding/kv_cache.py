"""A KV cache whose layers grow in place: a decode step writes its slot into a buffer.

``transformers``' ``DynamicCache`` appends each step's keys and values with ``torch.cat``, which
copies every layer's whole cache at every step: at batch 16 on Gemma 3 (18 layers, ~200 cached
tokens) that was 39 % of a constrained decode's time on a 2-core CPU, more than the decoder's
matmuls of the step (``bench/results/engines_avx2.json``, docs/experiments.md "Decoding speed").
Here each layer keeps a buffer with room for more tokens; the cached keys and values are views
of it, so a step copies one slot per layer. The tensors an attention layer receives hold the same
numbers as ``DynamicCache``'s (tested against it, sliding windows and dropped rows included).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

# Slots added past what a step needs when a buffer is (re)made: at least this many, or half the
# cached length; a 160-token answer regrows a layer's buffer twice.
MIN_HEADROOM = 128


class _InPlace:
    """The buffer logic of both layer kinds. ``self.keys`` / ``self.values`` stay the cached
    tokens (as ``DynamicLayer`` has them): views ``[start:end]`` of the buffers while this class
    manages them; anything that replaces them (a crop, a reorder, a caller writing rows) is
    adopted into a new buffer at the next update."""

    keys: Any
    values: Any
    window: int | None = None  # a sliding layer's window: it keeps the last ``window - 1`` tokens

    def _reset_buffers(self) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._view: torch.Tensor | None = None
        self._start = self._end = 0

    def _adopt(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """New buffers holding the cached tokens, with room for ``key_states`` and more."""
        cached_keys = self.keys if self.keys.dim() == 4 else key_states[:, :, :0]
        cached_values = self.values if self.values.dim() == 4 else value_states[:, :, :0]
        live, new = cached_keys.shape[-2], key_states.shape[-2]
        capacity = live + new + max(MIN_HEADROOM, live // 2)
        batch, heads, _, key_dim = key_states.shape
        self._key_buffer = key_states.new_empty((batch, heads, capacity, key_dim))
        self._value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        self._key_buffer[:, :, :live] = cached_keys
        self._value_buffer[:, :, :live] = cached_values
        self._start, self._end = 0, live

    def _append(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens; returns what attention reads (the cached tokens, then the new)."""
        new = key_states.shape[-2]
        if (
            self._key_buffer is None
            or self.keys is not self._view
            or self._end + new > self._key_buffer.shape[-2]
        ):
            self._adopt(key_states, value_states)
        assert self._key_buffer is not None and self._value_buffer is not None
        end = self._end + new
        self._key_buffer[:, :, self._end : end] = key_states
        self._value_buffer[:, :, self._end : end] = value_states
        seen_keys = self._key_buffer[:, :, self._start : end]
        seen_values = self._value_buffer[:, :, self._start : end]
        self._end = end
        if self.window is not None:
            self._start = max(self._start, end - (self.window - 1))
        self.keys = self._key_buffer[:, :, self._start : end]
        self.values = self._value_buffer[:, :, self._start : end]
        self._view = self.keys
        return seen_keys, seen_values

    # Both overrides reach the library layer's own method through the concrete class's MRO.
    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        self._reset_buffers()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0 and not self._select_rows(indices):  # type: ignore[attr-defined]
            super().batch_select_indices(indices)  # type: ignore[misc]

    def _select_rows(self, indices: torch.Tensor) -> bool:
        """Keep the buffer rows ``indices`` (with their room); ``False`` if no buffer is current."""
        if self._key_buffer is None or self.keys is not self._view:
            return False
        assert self._value_buffer is not None
        self._key_buffer = self._key_buffer.index_select(0, indices)
        self._value_buffer = self._value_buffer.index_select(0, indices)
        self.keys = self._key_buffer[:, :, self._start : self._end]
        self.values = self._value_buffer[:, :, self._start : self._end]
        self._view = self.keys
        return True


class InPlaceLayer(_InPlace, DynamicLayer):
    """A full-attention layer of the cache (``DynamicLayer`` without the per-step copy)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reset_buffers()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append(key_states, value_states)


class InPlaceSlidingWindowLayer(_InPlace, DynamicSlidingWindowLayer):
    """A sliding-window layer (``DynamicSlidingWindowLayer`` without the per-step copy)."""

    def __init__(self, sliding_window: int, **kwargs: Any) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.window = sliding_window
        self._reset_buffers()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.record_past:  # speculative decoding's rollback: the library's own way
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        return self._append(key_states, value_states)


def in_place_cache(config: Any) -> DynamicCache:
    """``DynamicCache(config=config)`` with its full and sliding-window layers growing in place
    (other layer kinds, e.g. linear attention, are kept as the library makes them)."""
    cache = DynamicCache(config=config)
    layers = []
    for layer in cache.layers:
        if type(layer) is DynamicSlidingWindowLayer:
            layers.append(InPlaceSlidingWindowLayer(sliding_window=layer.sliding_window))
        elif type(layer) is DynamicLayer:
            layers.append(InPlaceLayer())
        else:
            layers.append(layer)
    cache.layers = layers
    return cache


def stack_rows(
    running: DynamicCache, running_mask: torch.Tensor, joining: DynamicCache, joining_mask: torch.Tensor
) -> torch.Tensor:
    """Put ``joining``'s rows under ``running``'s, in ``running`` (changed in place); returns the
    attention mask of the stacked rows.

    Both caches hold left-padded rows (``*_mask``: 1 on a row's tokens, which end at the last
    slot). The stacked cache is what one left-padded batch of all the rows would hold: every
    row's tokens right-aligned in as many slots as the longest row has tokens (slots that are
    padding in every row are dropped), a sliding-window layer keeping its last ``window - 1``.
    Only the in-place layers of :func:`in_place_cache` can be stacked.
    """
    width = int(max(running_mask.sum(dim=1).max(), joining_mask.sum(dim=1).max()))
    for layer, other in zip(running.layers, joining.layers, strict=True):
        if not isinstance(layer, _InPlace) or not isinstance(other, _InPlace):
            raise TypeError(f"cannot stack rows of a {type(layer).__name__} cache layer")
        slots = width if layer.window is None else min(width, layer.window - 1)
        capacity = slots + MIN_HEADROOM
        rows = layer.keys.shape[0] + other.keys.shape[0]
        key_buffer = layer.keys.new_zeros((rows, layer.keys.shape[1], capacity, layer.keys.shape[-1]))
        value_buffer = layer.values.new_zeros((rows, layer.values.shape[1], capacity, layer.values.shape[-1]))
        first = 0
        for source in (layer, other):
            keys, values = source.keys, source.values
            count, kept = keys.shape[0], min(slots, keys.shape[-2])
            key_buffer[first : first + count, :, slots - kept : slots] = keys[:, :, keys.shape[-2] - kept :]
            value_buffer[first : first + count, :, slots - kept : slots] = values[
                :, :, values.shape[-2] - kept :
            ]
            first += count
        layer._key_buffer, layer._value_buffer = key_buffer, value_buffer
        layer._start, layer._end = 0, slots
        layer.keys, layer.values = key_buffer[:, :, :slots], value_buffer[:, :, :slots]
        layer._view = layer.keys
        if layer.window is not None:
            layer.cumulative_length = width  # type: ignore[attr-defined]
    mask = running_mask.new_zeros((running_mask.shape[0] + joining_mask.shape[0], width))
    first = 0
    for source in (running_mask, joining_mask):
        kept = min(width, source.shape[1])
        mask[first : first + source.shape[0], width - kept :] = source[:, source.shape[1] - kept :]
        first += source.shape[0]
    return mask
