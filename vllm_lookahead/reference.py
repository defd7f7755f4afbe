"""Pure-Python/torch references of the compiled ops in ``vllm_lookahead.ops``.

Each implements exactly the semantics of its kernel in ``csrc/`` on the same
tensors (``reference.X`` mirrors ``ops.X``); tests compare the two on random
inputs, and the tree runtime's start-up self-check compares
:func:`tree_attention` with the attention backend's adapter on the live cache.
The lookahead tree layout's reference is ``proposers.jacobi.reference_tree_layouts``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vllm_lookahead.ops import PoolState


# --------------------------------------------------------------------------
# n-gram pool (mirrors csrc/ngram_pool.h).


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


def ngram_pool_lookup(
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
# Token trees (mirror csrc/tree.h).


def tree_ancestor_masks(parents: torch.Tensor, cu_nodes: torch.Tensor, words: int) -> torch.Tensor:
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


def tree_attention(query, tree_key, tree_value, key_cache, value_cache, block_table,
                   prefix_lens, cu_nodes, masks, scale, accumulate: torch.dtype | None = None):
    """Dense masked softmax attention in float64; the result in query's
    dtype, or in ``accumulate`` where given."""
    out = torch.empty_like(query, dtype=accumulate or query.dtype)
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
        out[lo:hi] = torch.einsum("hnk,khd->nhd", scores.softmax(-1), values).to(out.dtype)
    return out


def tree_kv_compact(key_caches, value_caches, src_slots, dst_slots) -> None:
    for cache in [*key_caches, *value_caches]:
        bs = cache.shape[1]
        staged = cache[src_slots // bs, src_slots % bs].clone()
        cache[dst_slots // bs, dst_slots % bs] = staged


def tree_accept_greedy(parents, tokens, root_argmax, node_argmax, cu_nodes, max_depth):
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


def recycle_update(table: torch.Tensor, tokens: torch.Tensor, topk: torch.Tensor) -> None:
    """Reference of ``ops.recycle_update``."""
    for token, row in zip(tokens.tolist(), topk[:, :table.shape[1]].tolist()):
        if not 0 <= token < table.shape[0]:
            raise ValueError(f"token {token} outside the vocabulary")
        table[token] = torch.tensor(row, dtype=table.dtype)


def recycle_tree(table: torch.Tensor, roots: torch.Tensor, parents: torch.Tensor,
                 ranks: torch.Tensor) -> torch.Tensor:
    """Reference of ``ops.recycle_tree``."""
    vocab, k = table.shape
    out = torch.full((len(roots), len(parents)), -1, dtype=torch.int32)
    for b, root in enumerate(roots.tolist()):
        for j, (parent, rank) in enumerate(zip(parents.tolist(), ranks.tolist())):
            source = root if parent < 0 else int(out[b, parent])
            if 0 <= source < vocab and 0 <= rank < k:
                out[b, j] = table[source, rank]
    return out
