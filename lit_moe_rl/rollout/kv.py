"""A KV cache layer that grows by doubling, so a long generation does not copy its cache every step.

transformers' ``DynamicLayer`` concatenates each step's keys and values onto the cache: step ``t``
copies all ``t`` cached positions, so ``L`` tokens copy ``L^2 / 2`` positions (at 8k tokens, 4k
positions per token). :class:`GrowingLayer` writes each step's positions into a buffer with spare
room and doubles the buffer when it is full: about 3 positions copied per token, whatever the
length. Attention reads the filled part as a view. Only for layers that are exactly
``DynamicLayer`` (sliding-window layers keep their own rule). :meth:`GrowingLayer.reserve` sizes the
buffers ahead (the decode loop reserves its first new tokens' room after the prefill): nothing is
copied until they fill, but for rows leaving the batch.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["GrowingLayer", "use_growing_layers"]


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` whose keys/values live in buffers that double when full."""

    copied_positions = 0
    """Cached positions written so far (new ones and those moved into a larger buffer), over all rows."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        need = length + key_states.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            capacity = max(need, 2 * (0 if self._k is None else self._k.shape[-2]), 16)
            self._grow(key_states, value_states, length, capacity)
        self._k[..., length:need, :] = key_states
        self._v[..., length:need, :] = value_states
        self.copied_positions += key_states.shape[0] * key_states.shape[-2]
        self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]
        return self.keys, self.values

    def reserve(self, capacity: int) -> None:
        """Buffers for ``capacity`` positions (at least those cached), the cached ones moved in; after the
        first :meth:`update` (the prompt's)."""
        length = self.get_seq_length()
        if self._k is None or capacity > self._k.shape[-2]:
            self._grow(self.keys, self.values, length, max(capacity, length))
            self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, capacity: int) -> None:
        k = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if length:
            k[..., :length, :], v[..., :length, :] = self.keys, self.values
            self.copied_positions += self.keys.shape[0] * length
        self._k, self._v = k, v

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._k, self._v = self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` in buffers of the same room (no regrowing after rows leave); only the
        filled positions are copied."""
        if self._k is None:
            return super().batch_select_indices(indices)
        length = self.get_seq_length()
        k = self._k.new_empty((len(indices), *self._k.shape[1:]))
        v = self._v.new_empty((len(indices), *self._v.shape[1:]))
        k[..., :length, :], v[..., :length, :] = self.keys[indices], self.values[indices]
        self._k, self._v = k, v
        self.keys, self.values = k[..., :length, :], v[..., :length, :]


def use_growing_layers(cache) -> None:
    """Swap every plain ``DynamicLayer`` of a fresh ``DynamicCache`` for a :class:`GrowingLayer`."""
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
