"""Token-tree verification inside vLLM's model runner (greedy, CPU backend).

A proposer that returns, next to each request's draft tokens, the parent of
every draft node (``tree_parents``) turns the next verification step into a
tree step. vLLM schedules the flat node list as ordinary draft tokens, so
its scheduler, paged KV slots and rollback are unchanged; the runtime only
changes four things for the rows of those nodes:

1. positions: node i sits at ``root position + depth(i)`` (its KV still goes
   to the slot of its flat index, computed by vLLM before positions change);
2. attention: vLLM's backend runs as usual, then every node's row is
   recomputed by ``ops.tree_attention`` over the KV prefix plus exactly its
   ancestors;
3. acceptance: the deepest node whose path matches the target's argmax
   (``ops.tree_accept_greedy``), emitted as a linear accepted run, so vLLM's
   bookkeeping (``num_computed_tokens`` rollback, stop checks) is unchanged;
4. KV compaction: the accepted path's KV moves to the slots of positions
   p+1..p+a (``ops.tree_kv_compact``), so the cache is a plain sequence again.

All vLLM-internal access goes through ``vllm_lookahead.patches``; this
module works on the objects those patches hand it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_lookahead import ops

PLACEHOLDER_TOKEN_ID = -1


@dataclass
class TreeStep:
    """Tree nodes of one engine step, flat over the requests that have one."""

    batch_rows: torch.Tensor  # int64 [T]: runner batch row of each tree request
    node_rows: torch.Tensor  # int64 [N]: token index of each node in the step
    parents: torch.Tensor  # int32 [N], request-local
    cu_nodes: torch.Tensor  # int32 [T + 1]
    masks: torch.Tensor  # int64 [N, words]
    prefix_lens: torch.Tensor  # int32 [T]: KV prefix incl. the root token
    node_slots: torch.Tensor  # int64 [N]: KV slot written for each node
    kv_caches: list[torch.Tensor]


_current: TreeStep | None = None


def current() -> TreeStep | None:
    return _current


def depths_of(parents: list[int]) -> list[int]:
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return depth


def begin_step(
    req_ids: list[str],
    drafts: dict[str, list[int]],
    tree_parents: dict[str, list[int]],
    num_computed: np.ndarray,
    query_start: np.ndarray,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_caches: list[torch.Tensor],
) -> None:
    """Set up the step after vLLM prepared its inputs; rewrite node positions.

    Requests whose drafts are a chain (no parents given) stay linear.
    """
    global _current
    _current = None
    rows, node_rows, parents, sizes, prefix = [], [], [], [], []
    for b, req_id in enumerate(req_ids):
        n = len(drafts.get(req_id, ()))
        tree = tree_parents.get(req_id)
        if not n or tree is None:
            continue
        # The scheduler may have trimmed the draft: a prefix of a flat,
        # parent-first node list is still a tree.
        local = list(tree[:n])
        root_row = int(query_start[b])
        node_idx = np.arange(root_row + 1, root_row + 1 + n)
        root_pos = int(num_computed[b])
        positions[torch.from_numpy(node_idx)] = torch.tensor(
            [root_pos + d for d in depths_of(local)], dtype=positions.dtype)
        rows.append(b)
        node_rows.append(node_idx)
        parents += local
        sizes.append(n)
        prefix.append(root_pos + 1)
    if not rows:
        return
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(sizes).cumsum(0)
    node_rows_t = torch.from_numpy(np.concatenate(node_rows))
    parents_t = torch.tensor(parents, dtype=torch.int32)
    _current = TreeStep(
        batch_rows=torch.tensor(rows, dtype=torch.int64),
        node_rows=node_rows_t,
        parents=parents_t,
        cu_nodes=cu,
        masks=ops.tree_ancestor_masks(parents_t, cu),
        prefix_lens=torch.tensor(prefix, dtype=torch.int32),
        node_slots=slot_mapping[node_rows_t].to(torch.int64).cpu(),
        kv_caches=kv_caches,
    )


def attend(step: TreeStep, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           kv_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
           output: torch.Tensor) -> None:
    """Overwrite the attention output of the tree nodes' rows."""
    key_cache, value_cache = ops.cpu_backend_cache_views(kv_cache)
    rows = step.node_rows
    # The CPU backend's block layout depends on its kernel (ISA, dtype): make
    # sure the cache holds this step's keys where the views say, rather than
    # attend over a misread cache.
    block_size, slots = key_cache.shape[1], step.node_slots
    if not torch.equal(key_cache[slots // block_size, slots % block_size], key[rows]):
        raise NotImplementedError(
            "tree speculation: the KV cache layout of this CPU attention kernel "
            f"({kv_cache.dtype}) is not supported; use float32")
    result = ops.tree_attention(
        query[rows].contiguous(), key[rows].contiguous(), value[rows].contiguous(),
        key_cache, value_cache, block_table[step.batch_rows].contiguous(),
        step.prefix_lens, step.cu_nodes, step.masks, scale,
    )
    output.view(output.shape[0], -1)[rows] = result.reshape(len(rows), -1).to(output.dtype)


def accept_and_compact(step: TreeStep | None, tokens_by_row: list[list[int]],
                       num_draft: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Greedy acceptance for the whole batch (chains for requests without a
    tree, all of them when ``step`` is None), then KV compaction of the tree
    requests. Returns vLLM's sampled token ids [batch, max_draft + 1], -1
    padded."""
    batch = len(num_draft)
    argmax = logits.argmax(dim=-1).to(torch.int32).cpu()
    tree_of_row = {} if step is None else {
        int(b): i for i, b in enumerate(step.batch_rows.tolist())}
    parents, cu, root, node = [], [0], [], []
    row = 0
    for b in range(batch):
        n = num_draft[b]
        root.append(int(argmax[row]))
        node += argmax[row + 1: row + 1 + n].tolist()
        if b in tree_of_row:
            t = tree_of_row[b]
            lo, hi = int(step.cu_nodes[t]), int(step.cu_nodes[t + 1])
            parents += step.parents[lo:hi].tolist()
        else:
            parents += list(range(-1, n - 1))
        cu.append(cu[-1] + n)
        row += n + 1
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    flat_tokens = [t for tokens in tokens_by_row for t in tokens]
    max_draft = max(num_draft, default=0)
    path, accepted, bonus = ops.tree_accept_greedy(
        i32(parents), i32(flat_tokens), i32(root), i32(node), i32(cu), max_draft)
    out = torch.full((batch, max_draft + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    src, dst = [], []
    for b in range(batch):
        a = int(accepted[b])
        picked = path[b, :a].tolist()
        out[b, :a] = i32([tokens_by_row[b][i] for i in picked]) if a else out[b, :0]
        out[b, a] = bonus[b]
        if b in tree_of_row and a:
            t = tree_of_row[b]
            lo = int(step.cu_nodes[t])
            src += [int(step.node_slots[lo + i]) for i in picked]
            dst += [int(step.node_slots[lo + k]) for k in range(a)]
    moves = [(s, d) for s, d in zip(src, dst) if s != d]
    if moves:
        views = [ops.cpu_backend_cache_views(c) for c in step.kv_caches]
        ops.tree_kv_compact([k for k, _ in views], [v for _, v in views],
                            torch.tensor([s for s, _ in moves]),
                            torch.tensor([d for _, d in moves]))
    return out.to(logits.device)


def raw_argmax_is_greedy(sampling_metadata: Any) -> bool:
    """Whether the greedy token is the argmax of the raw logits: no
    penalties, bad words or allowed-token masks (logits processors that
    vLLM's sampler would apply first)."""
    return bool(sampling_metadata.no_penalties
                and not sampling_metadata.bad_words_token_ids
                and sampling_metadata.allowed_token_ids_mask is None)


def end_step() -> None:
    global _current
    _current = None


def kv_cache_list(kv_caches: Any) -> list[torch.Tensor]:
    """The runner's per-layer KV caches as a flat list of tensors."""
    if isinstance(kv_caches, dict):
        return list(kv_caches.values())
    return list(kv_caches)
