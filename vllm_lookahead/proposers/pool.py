"""Request-level n-gram pools over the compiled pool op (``ops.ngram_pool_*``)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch

from vllm_lookahead.ops import PoolState, ngram_pool_insert, ngram_pool_lookup


class NgramPool:
    """Per-request n-gram pools plus an optional pool shared by all requests.

    Requests are addressed by any hashable id; each open request owns one
    slot of a preallocated table, so memory is fixed at construction
    (``nbytes``). Every batched method takes one call per engine step.
    """

    def __init__(
        self,
        max_requests: int,
        vocab_size: int,
        ngram: int = 4,
        key_len: int = 1,
        capacity: int = 8,
        buckets: int = 1024,
        ways: int = 4,
        shared: bool = False,
        device: torch.device | str = "cpu",
    ):
        if ngram < key_len + 1:
            raise ValueError(f"ngram must be >= key_len + 1, got ngram={ngram}")
        if key_len < 1 or capacity < 1 or max_requests < 1 or vocab_size < 1:
            raise ValueError("key_len, capacity, max_requests, vocab_size must be >= 1")
        if ways < 1 or buckets < ways or buckets % ways:
            raise ValueError(f"buckets ({buckets}) must be a multiple of ways ({ways})")
        self.vocab_size = vocab_size
        self.ngram = ngram
        self.key_len = key_len
        self.cont_len = ngram - key_len
        self.max_requests = max_requests
        self.shared_slot = max_requests if shared else -1
        self.state = PoolState.allocate(
            max_requests + int(shared), buckets, ways, key_len, capacity,
            self.cont_len, device,
        )
        self._slots: dict[Hashable, int] = {}
        self._free = list(range(max_requests - 1, -1, -1))

    @property
    def device(self) -> torch.device:
        return self.state.keys.device

    def nbytes(self) -> int:
        return self.state.nbytes()

    def __contains__(self, request: Hashable) -> bool:
        return request in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def open(self, request: Hashable) -> None:
        if request in self._slots:
            raise ValueError(f"request {request!r} already has a pool")
        if not self._free:
            raise RuntimeError(f"all {self.max_requests} request pools are in use")
        self._slots[request] = self._free.pop()

    def erase(self, request: Hashable) -> None:
        slot = self._slots.pop(request, None)
        if slot is None:
            raise KeyError(f"unknown request {request!r}")
        self.state.reset_slot(slot)
        self._free.append(slot)

    def slots_of(self, requests: Sequence[Hashable]) -> torch.Tensor:
        try:
            slots = [self._slots[r] for r in requests]
        except KeyError as e:
            raise KeyError(f"unknown request {e.args[0]!r}") from None
        return torch.tensor(slots, dtype=torch.int32, device=self.device)

    def insert_spans(
        self,
        requests: Sequence[Hashable],
        tokens: torch.Tensor | np.ndarray,
        rows: Sequence[int] | np.ndarray,
        starts: Sequence[int] | np.ndarray,
        ends: Sequence[int] | np.ndarray,
    ) -> None:
        """Add all n-grams of ``tokens[rows[i], starts[i]:ends[i]]`` to request i."""
        slots = self.slots_of(requests)
        if self.device.type != "cpu" and len(set(slots.tolist())) != len(slots):
            raise ValueError("each request may appear once per insert on CUDA")
        tokens = torch.as_tensor(tokens, device=self.device).contiguous()
        if tokens.dtype != torch.int32:
            raise ValueError(f"tokens must be int32, got {tokens.dtype}")
        as_i32 = lambda x: torch.as_tensor(np.asarray(x, np.int32), device=self.device)
        rows_t, starts_t, ends_t = as_i32(rows), as_i32(starts), as_i32(ends)
        if self.device.type != "cpu":
            self._check_spans(tokens, rows_t, starts_t, ends_t)
        ngram_pool_insert(
            self.state, slots, tokens, rows_t, starts_t, ends_t,
            self.vocab_size, self.shared_slot,
        )

    def insert_ngrams(self, requests: Sequence[Hashable], ngrams: torch.Tensor) -> None:
        """Add given n-grams: ``ngrams`` int32 [len(requests), ngram]."""
        if ngrams.dim() != 2 or ngrams.shape[1] != self.ngram:
            raise ValueError(f"ngrams must be [n, {self.ngram}], got {tuple(ngrams.shape)}")
        n = len(requests)
        self.insert_spans(requests, ngrams, np.arange(n), np.zeros(n), np.full(n, self.ngram))

    def lookup(
        self, requests: Sequence[Hashable], query: torch.Tensor, max_guesses: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``max_guesses`` continuations for each request's key.

        query: int32 [len(requests), key_len]. Returns (out [n, G, ngram -
        key_len], counts [n]); see :func:`ngram_pool_lookup`.
        """
        slots = self.slots_of(requests)
        return ngram_pool_lookup(
            self.state, slots, query.to(self.device, torch.int32), max_guesses,
            self.shared_slot,
        )

    def _check_spans(self, tokens, rows, starts, ends) -> None:
        if bool(((starts < 0) | (ends <= starts) | (ends > tokens.shape[1])).any()):
            raise ValueError("span is empty or outside the token rows")
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        mask = (pos >= starts[:, None]) & (pos < ends[:, None])
        picked = tokens[rows.long()][mask]
        if bool(((picked < 0) | (picked >= self.vocab_size)).any()):
            raise ValueError(f"token id outside the vocabulary [0, {self.vocab_size})")


