"""The compact decoder's KV cache: one lane per running sequence, so sequences join and leave at any step
(loraplex.runtime.decoder writes and reads it; the server assigns the lanes)."""

from __future__ import annotations

import torch

from ..errors import ConfigError


class KVCache:
    """Keys and values per layer, one lane per running sequence: k[l], v[l]: (lanes, n_kv, capacity, hd).

    Lane b holds its sequence's positions 0..len-1 (rotary already applied to keys). Storage grows by
    doubling (lanes up to `max_lanes`, positions up to `max_len`); positions past a lane's length hold junk
    that attention masks out and later writes overwrite.
    """

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, *, max_lanes: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.shape = (n_kv, head_dim)
        self.max_lanes, self.max_len = max_lanes, max_len
        self.dtype, self.device = dtype, device
        self.k = [torch.empty(0, n_kv, 0, head_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.empty_like(t) for t in self.k]

    @property
    def lanes(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def clear_lane(self, lane: int) -> None:
        """Zero every position of `lane` (junk past a lane's length must stay finite: attention gives it weight
        0, and 0 * NaN is NaN)."""
        for t in self.k + self.v:
            if lane < t.shape[0]:
                t[lane].zero_()

    def reserve(self, lanes: int, length: int) -> None:
        """Make room for `lanes` lanes of `length` positions (keeps the contents)."""
        if lanes > self.max_lanes or length > self.max_len:
            raise ConfigError(f"KV cache holds at most {self.max_lanes} lanes x {self.max_len} positions, "
                              f"asked for {lanes} x {length}")
        if lanes <= self.lanes and length <= self.capacity:
            return
        new_lanes = min(self.max_lanes, max(lanes, 2 * self.lanes, 1))
        new_len = min(self.max_len, max(length, 2 * self.capacity, 16))
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                t = torch.zeros(new_lanes, *self.shape[:1], new_len, self.shape[1], dtype=self.dtype,
                                device=self.device)  # (lanes, n_kv, cap, hd)
                t[: old.shape[0], :, : old.shape[2]] = old
                store[i] = t
