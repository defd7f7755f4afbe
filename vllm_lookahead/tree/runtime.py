"""Token-tree verification inside vLLM's model runner (CPU backend).

A drafter that declares ``tree_parents`` (a dict: request id -> parent of
each draft node it returned, -1 for a child of the last accepted token,
parents before children) hands its verification steps to this runtime. vLLM
schedules the flat node list as ordinary draft tokens, so its scheduler,
paged KV slots and rollback are unchanged; the runtime changes four things
for the rows of a step:

1. positions: node i sits at ``root position + depth(i)`` (its KV still goes
   to the slot of its flat index, computed by vLLM before positions change);
2. attention: vLLM's backend runs as usual, then every tree node's row is
   recomputed by ``ops.tree_attention`` over the KV prefix plus exactly its
   ancestors;
3. acceptance: one target token per node (argmax, or a position-keyed sample:
   ``tree.sampling``), then the deepest node whose path matches them
   (``ops.tree_accept_greedy``), emitted as a linear accepted run, so vLLM's
   bookkeeping (``num_computed_tokens`` rollback, stop checks) is unchanged;
   requests whose drafts are a chain are verified by the same rule;
4. KV compaction: the accepted path's KV moves to the slots of positions
   p+1..p+a (``ops.tree_kv_compact``), so the cache is a plain sequence again.

After acceptance the drafter's ``observe_verification`` (if defined) gets
the target's argmax at every node, which the lookahead branch feeds on, and
the accepted path of every request (request-local node indices).

All vLLM-internal access goes through ``vllm_lookahead.patches``; this
module works on the objects those patches hand it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_lookahead import ops
from vllm_lookahead.tree import sampling

PLACEHOLDER_TOKEN_ID = -1
# vLLM treats temperatures below this as greedy (vllm.sampling_params).
SAMPLING_EPS = 1e-5


@dataclass
class BatchSampling:
    """Per batch row: how its target tokens are drawn."""

    greedy: torch.Tensor  # bool [B]
    temperature: torch.Tensor  # float32 [B] (1 for greedy rows)
    top_k: torch.Tensor | None  # int64 [B], 0 = off
    top_p: torch.Tensor | None  # float32 [B], 1 = off
    seeds: np.ndarray  # uint64 [B]


@dataclass
class TreeStep:
    """One verification step handled by the runtime."""

    req_ids: list[str]
    root_positions: np.ndarray  # int64 [B]: position of each row's root token
    sampling: BatchSampling
    drafter: Any
    # Tree requests only (T of them, N nodes in all):
    batch_rows: np.ndarray  # int64 [T]: batch row of each tree request
    parents: np.ndarray  # int32 [N], request-local
    depths: np.ndarray  # int64 [N]
    cu_nodes: torch.Tensor  # int32 [T + 1]
    masks: torch.Tensor  # int64 [N, words]
    node_rows: torch.Tensor  # int64 [N]: token index of each node in the step
    node_slots: np.ndarray  # int64 [N]: KV slot written for each node
    kv_caches: list[torch.Tensor]
    prefix_lens: torch.Tensor | None = None  # int32 [T], set by the first layer
    tree_block_table: torch.Tensor | None = None  # [T, max_blocks]

    @property
    def has_trees(self) -> bool:
        return len(self.batch_rows) > 0


_current: TreeStep | None = None
# Seeds drawn for unseeded sampled requests, kept while they run.
_seeds: dict[str, int] = {}


def check_supported(vllm_config: Any) -> None:
    """Fail at engine start, with what to change, where the runtime cannot
    verify trees (instead of failing a running step)."""
    model = vllm_config.model_config
    device = vllm_config.device_config.device_type
    if device != "cpu":
        raise NotImplementedError(
            f"tree speculation runs on vLLM's CPU backend only so far (this engine: "
            f"{device}); use additional_config lookahead mode \"linear\"")
    if model.dtype != torch.float32:
        raise NotImplementedError(
            f"tree speculation on the CPU backend needs dtype float32 (got "
            f"{model.dtype}): vLLM's bf16/fp16 CPU kernels use a KV cache layout the "
            "runtime does not read; pass dtype='float32' or use lookahead mode \"linear\"")
    if model.get_sliding_window() is not None:
        raise NotImplementedError(
            "tree speculation does not support sliding-window attention models; "
            "use lookahead mode \"linear\"")


def current() -> TreeStep | None:
    return _current


def end_step() -> None:
    global _current
    _current = None


def tree_eligible(params: Any) -> bool:
    """Whether a request's target tokens are exactly what ``tree.sampling``
    draws: no penalties, biases, masks, minimum lengths, logprobs or
    structured output (those go through vLLM's own verification)."""
    return (params.presence_penalty == 0 and params.frequency_penalty == 0
            and params.repetition_penalty == 1 and params.min_p == 0
            and not params.logit_bias and params.allowed_token_ids is None
            and not params.bad_words and params.min_tokens == 0
            and params.logprobs is None and not params.logprob_token_ids
            and params.structured_outputs is None
            and params.thinking_token_budget is None)


def batch_sampling(req_ids: list[str], params: list[Any]) -> BatchSampling:
    """Sampling settings of the batch rows; forgets seeds of requests that
    left the batch."""
    present = set(req_ids)
    for req_id in [r for r in _seeds if r not in present]:
        del _seeds[req_id]
    greedy = [p.temperature < SAMPLING_EPS for p in params]
    seeds = []
    for req_id, p, g in zip(req_ids, params, greedy):
        if p.seed is not None:
            seeds.append(p.seed)
        elif g:
            seeds.append(0)
        else:
            seeds.append(_seeds.setdefault(req_id, random.getrandbits(64)))
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    return BatchSampling(
        greedy=torch.tensor(greedy, dtype=torch.bool),
        temperature=torch.tensor([1.0 if g else p.temperature
                                  for p, g in zip(params, greedy)], dtype=torch.float32),
        top_k=torch.tensor(top_k, dtype=torch.int64) if any(top_k) else None,
        top_p=torch.tensor(top_p, dtype=torch.float32) if min(top_p, default=1) < 1 else None,
        seeds=np.array([s & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64),
    )


def _depths(masks: torch.Tensor) -> np.ndarray:
    """Depth of every node (1 for a child of the root): the number of its
    ancestors including itself, i.e. the popcount of its mask."""
    bits = np.bitwise_count(masks.numpy().view(np.uint64))
    return bits.sum(axis=1).astype(np.int64)


def begin_step(
    req_ids: list[str],
    drafts: dict[str, list[int]],
    tree_parents: dict[str, list[int]],
    sampling_rows: BatchSampling,
    drafter: Any,
    num_computed: np.ndarray,
    query_start: np.ndarray,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_caches: list[torch.Tensor],
) -> None:
    """Set up the step after vLLM prepared its inputs; rewrite the positions
    of tree nodes. Requests whose drafts are a chain (no parents given) stay
    linear."""
    global _current
    rows, node_rows, parents, sizes = [], [], [], []
    for b, req_id in enumerate(req_ids):
        n = len(drafts.get(req_id, ()))
        tree = tree_parents.get(req_id)
        if not n or tree is None:
            continue
        # The scheduler may have trimmed the draft: a prefix of a flat,
        # parent-first node list is still a tree.
        rows.append(b)
        node_rows.append(np.arange(query_start[b] + 1, query_start[b] + 1 + n))
        parents.append(np.asarray(tree[:n], dtype=np.int32))
        sizes.append(n)
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(sizes, dtype=torch.int32).cumsum(0)
    parents_np = np.concatenate(parents) if parents else np.zeros(0, np.int32)
    masks = ops.tree_ancestor_masks(torch.from_numpy(parents_np), cu)
    depths = _depths(masks)
    root_positions = np.asarray(num_computed, dtype=np.int64).copy()
    node_rows_t = torch.from_numpy(
        np.concatenate(node_rows) if node_rows else np.zeros(0, np.int64))
    if rows:
        node_root = np.repeat(root_positions[rows], sizes)
        positions[node_rows_t] = torch.from_numpy(node_root + depths).to(positions.dtype)
    _current = TreeStep(
        req_ids=list(req_ids),
        root_positions=root_positions,
        sampling=sampling_rows,
        drafter=drafter,
        batch_rows=np.asarray(rows, dtype=np.int64),
        parents=parents_np,
        depths=depths,
        cu_nodes=cu,
        masks=masks,
        node_rows=node_rows_t,
        node_slots=slot_mapping[node_rows_t].to(torch.int64).cpu().numpy(),
        kv_caches=kv_caches,
    )


def chain_step(batch: int) -> TreeStep:
    """A step of ``batch`` greedy requests whose drafts are all chains."""
    masks = torch.zeros(0, 1, dtype=torch.int64)
    return TreeStep(
        req_ids=[], root_positions=np.zeros(batch, np.int64),
        sampling=BatchSampling(greedy=torch.ones(batch, dtype=torch.bool),
                               temperature=torch.ones(batch), top_k=None, top_p=None,
                               seeds=np.zeros(batch, np.uint64)),
        drafter=None, batch_rows=np.zeros(0, np.int64), parents=np.zeros(0, np.int32),
        depths=np.zeros(0, np.int64), cu_nodes=torch.zeros(1, dtype=torch.int32),
        masks=masks, node_rows=torch.zeros(0, dtype=torch.int64),
        node_slots=np.zeros(0, np.int64), kv_caches=[])


def attend(step: TreeStep, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           kv_cache: torch.Tensor, block_table: torch.Tensor, scale: float,
           output: torch.Tensor) -> None:
    """Overwrite the attention output of the tree nodes' rows."""
    if not step.has_trees:
        return
    key_cache, value_cache = ops.cpu_backend_cache_views(kv_cache)
    rows = step.node_rows
    if step.prefix_lens is None:
        # The CPU backend's block layout depends on its kernel (ISA, dtype):
        # make sure the cache holds this step's keys where the views say,
        # rather than attend over a misread cache (once per step: every
        # layer has the same layout).
        block_size = key_cache.shape[1]
        slots = torch.from_numpy(step.node_slots)
        if not torch.equal(key_cache[slots // block_size, slots % block_size], key[rows]):
            raise NotImplementedError(
                "tree speculation: the KV cache layout of this CPU attention kernel "
                f"({kv_cache.dtype}) is not supported; use float32")
        step.prefix_lens = torch.from_numpy(
            step.root_positions[step.batch_rows] + 1).to(torch.int32)
        step.tree_block_table = block_table[torch.from_numpy(step.batch_rows)].contiguous()
    result = ops.tree_attention(
        query[rows], key[rows], value[rows], key_cache, value_cache,
        step.tree_block_table, step.prefix_lens, step.cu_nodes, step.masks, scale,
    )
    output.view(output.shape[0], -1)[rows] = result.view(len(rows), -1).to(output.dtype)


def _target_tokens(step: TreeStep, logits: torch.Tensor, row_batch: np.ndarray,
                   row_depth: np.ndarray, argmax: torch.Tensor) -> torch.Tensor:
    """Target token of every logits row: the argmax for greedy requests, the
    position-keyed sample (``tree.sampling``) for the others."""
    s = step.sampling
    greedy = s.greedy[torch.from_numpy(row_batch)]
    if bool(greedy.all()):
        return argmax
    index = torch.from_numpy(row_batch)
    predicted = step.root_positions[row_batch] + row_depth + 1
    sampled = torch.nonzero(~greedy).flatten()
    tokens = argmax.clone()
    tokens[sampled] = sampling.sample_rows(
        logits[sampled.to(logits.device)],
        s.temperature[index][sampled],
        None if s.top_k is None else s.top_k[index][sampled],
        None if s.top_p is None else s.top_p[index][sampled],
        sampling.position_uniforms(s.seeds[row_batch][sampled.numpy()],
                                   predicted[sampled.numpy()]),
    )
    return tokens


def accept_and_compact(step: TreeStep, draft_tokens: torch.Tensor, num_draft: list[int],
                       logits: torch.Tensor) -> torch.Tensor:
    """Verify every request of the step (tree or chain), compact the KV of
    accepted tree paths and tell the drafter what the target predicted.
    ``draft_tokens`` is vLLM's flat draft list, ``logits`` its [sum(n + 1), V]
    rows (root row, then the nodes, per request). Returns vLLM's sampled
    token ids [batch, max_draft + 1], -1 padded."""
    batch = len(num_draft)
    num_draft_np = np.asarray(num_draft, dtype=np.int64)
    cu_draft = np.zeros(batch + 1, dtype=np.int64)
    cu_draft[1:] = np.cumsum(num_draft_np)
    total = int(cu_draft[-1])
    # Request-local parents and depths of every node: a chain unless the
    # request has a tree.
    node_batch = np.repeat(np.arange(batch), num_draft_np)
    local = np.arange(total) - cu_draft[node_batch]
    parents = (local - 1).astype(np.int32)
    depths = local + 1
    cu_tree = step.cu_nodes.numpy()
    for t, b in enumerate(step.batch_rows):
        lo, hi = cu_draft[b], cu_draft[b + 1]
        parents[lo:hi] = step.parents[cu_tree[t]:cu_tree[t + 1]]
        depths[lo:hi] = step.depths[cu_tree[t]:cu_tree[t + 1]]

    # Logits rows: per request its root row, then one row per node.
    row_batch = np.repeat(np.arange(batch), num_draft_np + 1)
    is_root = np.zeros(total + batch, dtype=bool)
    is_root[cu_draft[:-1] + np.arange(batch)] = True
    row_depth = np.zeros(total + batch, dtype=np.int64)
    row_depth[~is_root] = depths
    argmax = logits.argmax(dim=-1).to(torch.int32).cpu()
    targets = _target_tokens(step, logits, row_batch, row_depth, argmax)
    root_mask = torch.from_numpy(is_root)

    i32 = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32))
    tokens = draft_tokens.to(torch.int32).cpu().contiguous()
    max_draft = int(num_draft_np.max(initial=0))
    path, accepted, bonus = ops.tree_accept_greedy(
        i32(parents), tokens, targets[root_mask], targets[~root_mask],
        i32(cu_draft), max_draft)

    out = torch.full((batch, max_draft + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    accepted_np = accepted.numpy().astype(np.int64)
    path_np = path.numpy().astype(np.int64)
    taken = path_np >= 0
    flat_path = np.where(taken, path_np + cu_draft[:-1, None], 0)
    out[:, :max_draft] = torch.where(torch.from_numpy(taken), tokens[flat_path],
                                     PLACEHOLDER_TOKEN_ID)
    out[torch.arange(batch), accepted] = bonus
    _compact(step, cu_draft, path_np, accepted_np)
    observe = getattr(step.drafter, "observe_verification", None)
    if observe is not None:
        cu_rows = cu_draft + np.arange(batch + 1)
        observe(step.req_ids, argmax.numpy(), cu_rows, accepted_np, path_np)
    return out.to(logits.device)


def _compact(step: TreeStep, cu_draft: np.ndarray, path: np.ndarray,
             accepted: np.ndarray) -> None:
    """Move the KV of each accepted tree path to the slots of positions
    p+1..p+a (chains are in place already)."""
    if not step.has_trees:
        return
    src, dst = [], []
    cu_tree = step.cu_nodes.numpy()
    for t, b in enumerate(step.batch_rows):
        a = accepted[b]
        slots = step.node_slots[cu_tree[t]:cu_tree[t + 1]]
        src.append(slots[path[b, :a]])
        dst.append(slots[:a])
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    moved = src_all != dst_all
    if moved.any():
        views = [ops.cpu_backend_cache_views(c) for c in step.kv_caches]
        ops.tree_kv_compact([k for k, _ in views], [v for _, v in views],
                            torch.from_numpy(src_all[moved]),
                            torch.from_numpy(dst_all[moved]))


def raw_argmax_is_greedy(sampling_metadata: Any) -> bool:
    """Whether the greedy token is the argmax of the raw logits: no
    penalties, bad words or allowed-token masks (logits processors that
    vLLM's sampler would apply first)."""
    return bool(sampling_metadata.no_penalties
                and not sampling_metadata.bad_words_token_ids
                and sampling_metadata.allowed_token_ids_mask is None)


def kv_cache_list(kv_caches: Any) -> list[torch.Tensor]:
    """The runner's per-layer KV caches as a flat list of tensors."""
    if isinstance(kv_caches, dict):
        return list(kv_caches.values())
    return list(kv_caches)
