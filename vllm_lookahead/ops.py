"""Typed wrappers over the compiled ops (``torch.ops.vllm_lookahead``),
with a fake (meta) kernel per op so that they compose with torch.compile.

Their pure-Python references are in ``vllm_lookahead.reference``; tests
compare the two on random inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_lookahead import _C  # noqa: F401  (registers torch.ops.vllm_lookahead)

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
    any strides (CUDA: contiguous head dim), e.g. a layer's vLLM cache
    through ``tree.backends.KVLayoutAdapter.cache_views``;
    block_table int32 [batch, max_blocks]; prefix_lens int32 [batch];
    cu_nodes int32 [batch + 1]; masks from :func:`tree_ancestor_masks`.
    Returns [nodes, heads, D] in query's dtype (accumulated in float32).
    """
    return _ops.tree_attention(query, tree_key, tree_value, key_cache, value_cache,
                               block_table, prefix_lens, cu_nodes, masks, scale)


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
    recycled: torch.Tensor | None = None,
    recycled_parents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lookahead decoding's token trees of a whole batch in one call (CPU,
    all int32). Per request b: its Jacobi window ``grids[b]`` [N-1, W] with
    ``filled[b]`` levels, up to ``columns[b]`` window columns, its recycled
    tree ``recycled[b]`` [T] (from :func:`recycle_tree`, -1: absent; shaped
    by the template's ``recycled_parents`` [T]) and pool candidates
    ``candidates[b]`` [G, cont_len] of which the first ``candidate_lens[b,
    r]`` tokens are offered (0: none). The recycled nodes present come first
    under ``caps[b]`` nodes, columns and candidates are fitted under the rest
    (``jacobi.fit_tree``), then all are laid out as in ``jacobi.tree_layout``
    (window, then one trie of recycled nodes and candidates; a candidate
    keeps its rank r for its class). Returns tokens, parents and classes,
    each [batch, (N-1) * W + T + G * cont_len] and valid up to
    ``num_nodes[b]``, then ``num_nodes`` and the window columns used."""
    if recycled is None:
        recycled = grids.new_full((grids.shape[0], 0), -1)
        recycled_parents = grids.new_zeros((0,))
    return _ops.lookahead_tree_layout(grids, filled, columns, candidates, candidate_lens,
                                      recycled, recycled_parents, caps, max_ranks)


# --------------------------------------------------------------------------
# Token recycling (semantics in csrc/recycle.h).


def recycle_update(table: torch.Tensor, tokens: torch.Tensor, topk: torch.Tensor) -> None:
    """``table[tokens[i]] = topk[i, :K]`` for every row in order (a later row
    of the same token wins). table int32 [V, K]; tokens int32 [n] in [0, V);
    topk int32 [n, >= K]: the target's top-k next tokens after each input
    row. CPU and CUDA (on CUDA, tokens outside the vocabulary are skipped
    instead of raising: no host sync)."""
    _ops.recycle_update(table, tokens, topk)


def recycle_tree(table: torch.Tensor, roots: torch.Tensor, parents: torch.Tensor,
                 ranks: torch.Tensor) -> torch.Tensor:
    """int32 [batch, T]: each request's recycled draft tree. Template node j
    (``parents[j]``: -1 for a child of the root, parents before children;
    ``ranks[j]``: < 0 disables the node and its subtree) reads ``table[token
    of its parent, ranks[j]]``, starting from ``roots[b]``; -1 where the path
    is unknown. CPU and CUDA."""
    return _ops.recycle_tree(table, roots, parents, ranks)


# --------------------------------------------------------------------------
# Fake kernels: output shapes and dtypes from the inputs alone.


@torch.library.register_fake("vllm_lookahead::ngram_pool_insert")
def _ngram_pool_insert_fake(keys, entries, sizes, stamps, clock, ways, slots, tokens, rows,
                            starts, ends, vocab_size, shared_slot) -> None:
    return None


@torch.library.register_fake("vllm_lookahead::ngram_pool_lookup")
def _ngram_pool_lookup_fake(keys, entries, sizes, stamps, clock, ways, slots, query,
                            max_guesses, shared_slot):
    n = query.shape[0]
    out = entries.new_empty((n, max_guesses, entries.shape[3]))
    return out, entries.new_empty((n,))


@torch.library.register_fake("vllm_lookahead::lookahead_tree_layout")
def _lookahead_tree_layout_fake(grids, filled, columns, candidates, candidate_lens, recycled,
                                recycled_parents, caps, max_ranks):
    batch = grids.shape[0]
    width = (grids.shape[1] * grids.shape[2] + recycled_parents.shape[0]
             + candidates.shape[1] * candidates.shape[2])
    nodes = [grids.new_empty((batch, width)) for _ in range(3)]
    return (*nodes, grids.new_empty((batch,)), grids.new_empty((batch,)))


@torch.library.register_fake("vllm_lookahead::recycle_update")
def _recycle_update_fake(table, tokens, topk) -> None:
    return None


@torch.library.register_fake("vllm_lookahead::recycle_tree")
def _recycle_tree_fake(table, roots, parents, ranks):
    return roots.new_empty((roots.shape[0], parents.shape[0]))


@torch.library.register_fake("vllm_lookahead::tree_ancestor_masks")
def _tree_ancestor_masks_fake(parents, cu_nodes, words):
    return parents.new_empty((parents.shape[0], words), dtype=torch.int64)


@torch.library.register_fake("vllm_lookahead::tree_attention")
def _tree_attention_fake(query, tree_key, tree_value, key_cache, value_cache, block_table,
                         prefix_lens, cu_nodes, masks, scale):
    return torch.empty_like(query)


@torch.library.register_fake("vllm_lookahead::tree_kv_compact")
def _tree_kv_compact_fake(key_caches, value_caches, src_slots, dst_slots) -> None:
    return None


@torch.library.register_fake("vllm_lookahead::tree_accept_greedy")
def _tree_accept_greedy_fake(parents, tokens, root_argmax, node_argmax, cu_nodes, max_depth):
    batch = cu_nodes.shape[0] - 1
    return (parents.new_empty((batch, max_depth)), parents.new_empty((batch,)),
            parents.new_empty((batch,)))
