"""Typed wrappers over the compiled ops, and their pure-Python references.

The references (``reference_*``) implement exactly the semantics of the
kernels in ``csrc/`` on the same tensors; tests compare the two on random
inputs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_lookahead import _C  # noqa: F401  (registers torch.ops.vllm_lookahead)
from vllm_lookahead.proposers.jacobi import JacobiWindow, fit_tree, tree_layout

_ops = torch.ops.vllm_lookahead


@dataclass
class PoolState:
    """Tensors of an n-gram pool (layout documented in csrc/ngram_pool.h).

    keys    int32 [S, B, K]     keys[s, b, 0] == -1: empty bucket
    entries int32 [S, B, C, L]  continuations, most recent first
    sizes   int32 [S, B]
    stamps  int64 [S, B]        per-slot insertion clock of the last insert
    clock   int64 [S]
    """

    keys: torch.Tensor
    entries: torch.Tensor
    sizes: torch.Tensor
    stamps: torch.Tensor
    clock: torch.Tensor
    ways: int

    @classmethod
    def allocate(
        cls,
        num_slots: int,
        buckets: int,
        ways: int,
        key_len: int,
        capacity: int,
        cont_len: int,
        device: torch.device | str = "cpu",
    ) -> PoolState:
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        return cls(
            keys=torch.full((num_slots, buckets, key_len), -1, **i32),
            entries=torch.full((num_slots, buckets, capacity, cont_len), -1, **i32),
            sizes=torch.zeros((num_slots, buckets), **i32),
            stamps=torch.zeros((num_slots, buckets), **i64),
            clock=torch.zeros((num_slots,), **i64),
            ways=ways,
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.entries, self.sizes, self.stamps, self.clock)

    def clone(self) -> PoolState:
        return PoolState(*(t.clone() for t in self.tensors()), ways=self.ways)

    def reset_slot(self, slot: int) -> None:
        self.keys[slot].fill_(-1)
        self.entries[slot].fill_(-1)
        self.sizes[slot].zero_()
        self.stamps[slot].zero_()
        self.clock[slot] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def ngram_pool_insert(
    state: PoolState,
    slots: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    vocab_size: int,
    shared_slot: int = -1,
) -> None:
    """Insert every n-gram of ``tokens[rows[i], starts[i]:ends[i]]`` into slot
    ``slots[i]`` (and into ``shared_slot`` when >= 0), in row order.

    slots, rows, starts, ends: int32 [n]; tokens: int32 [R, T].
    """
    _ops.ngram_pool_insert(
        *state.tensors(), state.ways, slots, tokens, rows, starts, ends,
        vocab_size, shared_slot,
    )


def ngram_pool_lookup(
    state: PoolState,
    slots: torch.Tensor,
    query: torch.Tensor,
    max_guesses: int,
    shared_slot: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_guesses`` continuations of each query key.

    slots: int32 [n]; query: int32 [n, K]. Returns ``(out, counts)``: out int32
    [n, max_guesses, L] (unused rows -1), counts int32 [n]. The slot's own
    continuations come first (most recent first), then the shared slot's,
    without duplicates.
    """
    return _ops.ngram_pool_lookup(
        *state.tensors(), state.ways, slots, query, max_guesses, shared_slot
    )


# --------------------------------------------------------------------------
# Pure-Python references (mirror csrc/ngram_pool.h).


def _first_bucket_of_set(key: Sequence[int], num_buckets: int, ways: int) -> int:
    h = 2166136261
    for t in key:
        h = ((h ^ (t & 0xFFFFFFFF)) * 16777619) & 0xFFFFFFFF
    return (h % (num_buckets // ways)) * ways


class _RefView:
    def __init__(self, state: PoolState):
        self.keys = state.keys.numpy()
        self.entries = state.entries.numpy()
        self.sizes = state.sizes.numpy()
        self.stamps = state.stamps.numpy()
        self.clock = state.clock.numpy()
        self.ways = state.ways
        self.num_buckets = self.keys.shape[1]
        self.capacity = self.entries.shape[2]

    def find(self, slot: int, key: list[int]) -> int:
        first = _first_bucket_of_set(key, self.num_buckets, self.ways)
        for b in range(first, first + self.ways):
            if self.keys[slot, b, 0] >= 0 and self.keys[slot, b].tolist() == key:
                return b
        return -1

    def insert(self, slot: int, key: list[int], cont: list[int]) -> None:
        b = self.find(slot, key)
        if b < 0:
            first = _first_bucket_of_set(key, self.num_buckets, self.ways)
            ways = range(first, first + self.ways)
            empty = [w for w in ways if self.keys[slot, w, 0] < 0]
            b = empty[0] if empty else min(ways, key=lambda w: self.stamps[slot, w])
            self.keys[slot, b] = key
            self.sizes[slot, b] = 0
        conts = [self.entries[slot, b, j].tolist() for j in range(self.sizes[slot, b])]
        if cont in conts:
            conts.remove(cont)
        conts = [cont] + conts[: self.capacity - 1]
        for j, c in enumerate(conts):
            self.entries[slot, b, j] = c
        self.sizes[slot, b] = len(conts)
        self.clock[slot] += 1
        self.stamps[slot, b] = self.clock[slot]

    def continuations(self, slot: int, key: list[int]) -> list[list[int]]:
        b = self.find(slot, key)
        if b < 0:
            return []
        return [self.entries[slot, b, j].tolist() for j in range(self.sizes[slot, b])]


def reference_ngram_pool_insert(
    state: PoolState,
    slots: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    vocab_size: int,
    shared_slot: int = -1,
) -> None:
    view = _RefView(state)
    key_len = view.keys.shape[2]
    n = key_len + view.entries.shape[3]
    spans = [
        tokens[r, s:e].tolist()
        for r, s, e in zip(rows.tolist(), starts.tolist(), ends.tolist())
    ]
    for span in spans:
        if not span:
            raise ValueError("empty span")
        if min(span) < 0 or max(span) >= vocab_size:
            raise ValueError("token id outside the vocabulary")
    for slot, span in zip(slots.tolist(), spans):
        targets = [slot] + ([shared_slot] if 0 <= shared_slot != slot else [])
        for target in targets:
            for i in range(len(span) - n + 1):
                view.insert(target, span[i : i + key_len], span[i + key_len : i + n])


def reference_ngram_pool_lookup(
    state: PoolState,
    slots: torch.Tensor,
    query: torch.Tensor,
    max_guesses: int,
    shared_slot: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    view = _RefView(state)
    cont_len = view.entries.shape[3]
    out = torch.full((len(slots), max_guesses, cont_len), -1, dtype=torch.int32)
    counts = torch.zeros(len(slots), dtype=torch.int32)
    for i, (slot, key) in enumerate(zip(slots.tolist(), query.tolist())):
        found: list[list[int]] = []
        sources = [slot] + ([shared_slot] if 0 <= shared_slot != slot else [])
        for source in sources:
            for cont in view.continuations(source, key):
                if len(found) < max_guesses and cont not in found:
                    found.append(cont)
        for g, cont in enumerate(found):
            out[i, g] = torch.tensor(cont, dtype=torch.int32)
        counts[i] = len(found)
    return out, counts


# --------------------------------------------------------------------------
# Request-level pool used by the proposers.


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


# --------------------------------------------------------------------------
# Token trees (layout documented in csrc/tree.h).


def tree_mask_words(cu_nodes: torch.Tensor) -> int:
    """64-bit words needed for the ancestor masks of the largest tree."""
    sizes = cu_nodes[1:] - cu_nodes[:-1]
    return max(1, (int(sizes.max()) + 63) // 64) if len(sizes) else 1


def tree_ancestor_masks(
    parents: torch.Tensor, cu_nodes: torch.Tensor, words: int | None = None
) -> torch.Tensor:
    """int64 [nodes, words]: bit m of row i set <=> request-local node m is
    node i or one of its ancestors. parents, cu_nodes: int32."""
    return _ops.tree_ancestor_masks(parents, cu_nodes, words or tree_mask_words(cu_nodes))


def tree_attention(
    query: torch.Tensor,
    tree_key: torch.Tensor,
    tree_value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    cu_nodes: torch.Tensor,
    masks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of tree nodes over their request's paged KV prefix plus
    their ancestors and themselves.

    query [nodes, heads, D]; tree_key/tree_value [nodes, kv_heads, D];
    key_cache/value_cache: [num_blocks, block_size, kv_heads, D] views with
    any strides (CUDA: contiguous head dim), e.g. vLLM's CPU cache through
    :func:`cpu_backend_cache_views`;
    block_table int32 [batch, max_blocks]; prefix_lens int32 [batch];
    cu_nodes int32 [batch + 1]; masks from :func:`tree_ancestor_masks`.
    Returns [nodes, heads, D] in query's dtype (accumulated in float32).
    """
    return _ops.tree_attention(query, tree_key, tree_value, key_cache, value_cache,
                               block_table, prefix_lens, cu_nodes, masks, scale)


def cpu_backend_cache_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views [num_blocks, block_size, kv_heads, head_size] of
    one layer's cache of vLLM's CPU_ATTN backend (fp32 "vec" kernels): a
    tensor [num_blocks, kv_heads, block_size, 2 * head_size] whose every
    (block, head) holds the keys transposed, [head_size, block_size], then
    the values, [block_size, head_size]."""
    num_blocks, kv_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    per_head = kv_cache.reshape(num_blocks, kv_heads, 2, block_size * head_size)
    keys = per_head[:, :, 0].unflatten(-1, (head_size, block_size)).permute(0, 3, 1, 2)
    values = per_head[:, :, 1].unflatten(-1, (block_size, head_size)).permute(0, 2, 1, 3)
    return keys, values


def tree_kv_compact(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """For every cache view [num_blocks, block_size, kv_heads, head_size] (any
    strides, e.g. vLLM's head-major CPU blocks) of every layer, copy slot
    ``src_slots[i]`` to ``dst_slots[i]`` (int64 flat slot ids), reading all
    sources before writing: moves the accepted path's KV into the slots of
    positions p+1..p+a."""
    _ops.tree_kv_compact(list(key_caches), list(value_caches), src_slots, dst_slots)


def tree_accept_greedy(
    parents: torch.Tensor,
    tokens: torch.Tensor,
    root_argmax: torch.Tensor,
    node_argmax: torch.Tensor,
    cu_nodes: torch.Tensor,
    max_depth: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy tree verification, all int32. A node is accepted when its token
    is the target's argmax after its parent (``root_argmax[b]`` for a root
    child) and its parent is accepted; per request the deepest accepted node
    wins (the first in order among equals). Returns (path [batch, max_depth]
    of request-local node indices, -1 padded; accepted count [batch]; bonus
    token [batch]: the target's argmax after the path). CPU only: the result
    steers the scheduler, which runs on the host."""
    return _ops.tree_accept_greedy(parents, tokens, root_argmax, node_argmax,
                                   cu_nodes, max_depth)


def lookahead_tree_layout(
    grids: torch.Tensor,
    filled: torch.Tensor,
    columns: torch.Tensor,
    candidates: torch.Tensor,
    candidate_lens: torch.Tensor,
    caps: torch.Tensor,
    max_ranks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lookahead decoding's token trees of a whole batch in one call (CPU,
    all int32). Per request b: its Jacobi window ``grids[b]`` [N-1, W] with
    ``filled[b]`` levels, up to ``columns[b]`` window columns, and pool
    candidates ``candidates[b]`` [G, cont_len] of which the first
    ``candidate_lens[b, r]`` tokens are offered (0: none). Columns and
    candidates are fitted under ``caps[b]`` nodes (``jacobi.fit_tree``), then
    laid out as in ``jacobi.tree_layout`` (a candidate keeps its rank r for
    its class). Returns tokens, parents and classes, each [batch, (N-1) * W +
    G * cont_len] and valid up to ``num_nodes[b]``, then ``num_nodes`` and the
    window columns used."""
    return _ops.lookahead_tree_layout(grids, filled, columns, candidates, candidate_lens,
                                      caps, max_ranks)


def reference_lookahead_tree_layout(grids, filled, columns, candidates, candidate_lens,
                                    caps, max_ranks):
    """Per request: ``jacobi.fit_tree`` then ``jacobi.tree_layout`` (the
    proposer's former Python loop)."""
    grids, candidates, candidate_lens = grids.numpy(), candidates.numpy(), candidate_lens.numpy()
    batch, levels, width = grids.shape
    cont_len = candidates.shape[2]
    out = np.zeros((3, batch, levels * width + candidates.shape[1] * cont_len), np.int32)
    out[1:] = -1
    num_nodes = np.zeros(batch, np.int32)
    used_columns = np.zeros(batch, np.int32)
    for b in range(batch):
        ranks = np.nonzero(candidate_lens[b])[0].tolist()
        kept = [candidates[b, r, :candidate_lens[b, r]].tolist() for r in ranks]
        cap = int(caps[b])
        w, g = fit_tree(cap, int(columns[b]), len(kept), int(filled[b]), cont_len)
        window = JacobiWindow(levels=grids[b], filled=int(filled[b]))
        tree = tree_layout(window, w, kept[:g], max_ranks, ranks[:g])
        n = min(len(tree[0]), cap)
        for k, x in enumerate(tree):
            out[k, b, :n] = x[:n]
        num_nodes[b], used_columns[b] = n, w
    return (*torch.from_numpy(out), torch.from_numpy(num_nodes), torch.from_numpy(used_columns))


def reference_tree_ancestor_masks(parents: torch.Tensor, cu_nodes: torch.Tensor,
                                  words: int) -> torch.Tensor:
    masks = torch.zeros(len(parents), words, dtype=torch.int64)
    cu = cu_nodes.tolist()
    for b in range(len(cu) - 1):
        bits: list[int] = []
        for i in range(cu[b + 1] - cu[b]):
            p = int(parents[cu[b] + i])
            bits.append((bits[p] if p >= 0 else 0) | (1 << i))
            for w in range(words):
                word = (bits[i] >> (64 * w)) & 0xFFFFFFFFFFFFFFFF
                masks[cu[b] + i, w] = word - (1 << 64) if word >= 1 << 63 else word
    return masks


def reference_tree_attention(query, tree_key, tree_value, key_cache, value_cache,
                             block_table, prefix_lens, cu_nodes, masks, scale):
    """Dense masked softmax attention in float64."""
    out = torch.empty_like(query)
    block_size = key_cache.shape[1]
    group = query.shape[1] // tree_key.shape[1]
    cu = cu_nodes.tolist()
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        if lo == hi:
            continue
        n_prefix = int(prefix_lens[b])
        pos = torch.arange(n_prefix)
        slots = block_table[b, pos // block_size].long() * block_size + pos % block_size
        flat = lambda c: c.reshape(-1, *c.shape[2:])[slots]
        keys = torch.cat([flat(key_cache), tree_key[lo:hi]]).double()
        values = torch.cat([flat(value_cache), tree_value[lo:hi]]).double()
        local = torch.arange(hi - lo)
        words = masks[lo:hi, local // 64]
        ancestor = ((words >> (local % 64)) & 1).bool()
        allowed = torch.cat([torch.ones(hi - lo, n_prefix, dtype=torch.bool), ancestor], 1)
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,khd->hnk", query[lo:hi].double(), keys) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[lo:hi] = torch.einsum("hnk,khd->nhd", scores.softmax(-1), values).to(query.dtype)
    return out


def reference_tree_kv_compact(key_caches, value_caches, src_slots, dst_slots) -> None:
    for cache in [*key_caches, *value_caches]:
        bs = cache.shape[1]
        staged = cache[src_slots // bs, src_slots % bs].clone()
        cache[dst_slots // bs, dst_slots % bs] = staged


def reference_tree_accept_greedy(parents, tokens, root_argmax, node_argmax, cu_nodes,
                                 max_depth):
    cu = cu_nodes.tolist()
    batch = len(cu) - 1
    path = torch.full((batch, max_depth), -1, dtype=torch.int32)
    accepted = torch.zeros(batch, dtype=torch.int32)
    bonus = torch.empty(batch, dtype=torch.int32)
    for b in range(batch):
        depth: list[int] = []
        best, best_depth = -1, 0
        for i in range(cu[b + 1] - cu[b]):
            p = int(parents[cu[b] + i])
            expected = int(root_argmax[b]) if p < 0 else int(node_argmax[cu[b] + p])
            ok = (p < 0 or depth[p] > 0) and int(tokens[cu[b] + i]) == expected
            depth.append((1 if p < 0 else depth[p] + 1) if ok else 0)
            if depth[i] > best_depth:
                best, best_depth = i, depth[i]
        accepted[b] = best_depth
        bonus[b] = int(root_argmax[b]) if best < 0 else int(node_argmax[cu[b] + best])
        node, k = best, best_depth - 1
        while node >= 0:
            path[b, k] = node
            node, k = int(parents[cu[b] + node]), k - 1
    return path, accepted, bonus
