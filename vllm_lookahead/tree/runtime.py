"""Token-tree verification inside vLLM's model runner.

One :class:`TreeRuntime` per model runner verifies the drafts of a
:class:`~vllm_lookahead.tree.protocol.TreeDrafter`. vLLM schedules a
request's flat node list as ordinary draft tokens, so its scheduler, paged KV
slots and rollback are unchanged; the runtime changes four things for the
rows of a step:

1. positions: node i sits at ``root position + depth(i)`` (its KV still goes
   to the slot of its flat index, computed by vLLM before positions change);
2. attention: vLLM's backend runs as usual, then every tree node's row is
   recomputed over the KV prefix plus exactly its ancestors, by the adapter
   of the backend's KV-cache layout (``tree.backends``);
3. acceptance: one target token per node (argmax, or a position-keyed sample:
   ``tree.sampling``), then the deepest node whose path matches them
   (``ops.tree_accept_greedy``), emitted as a linear accepted run, so vLLM's
   bookkeeping (``num_computed_tokens`` rollback, stop checks) is unchanged;
   requests whose drafts are a chain are verified by the same rule;
4. KV compaction: the accepted path's KV moves to the slots of positions
   p+1..p+a, so the cache is a plain sequence again.

After acceptance the drafter's ``observe_verification`` gets a
:class:`~vllm_lookahead.tree.protocol.Verification`. On the first tree step
the adapter's attention rows are compared with the torch reference on the
live cache (:meth:`TreeRuntime.attend`); a mismatch stops the engine.

This module never touches vLLM objects: ``vllm_lookahead.vllm`` hands it
tensors and plain values.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vllm_lookahead import ops, reference
from vllm_lookahead.tree import sampling
from vllm_lookahead.tree.backends import KVLayoutAdapter
from vllm_lookahead.tree.protocol import Drafts, Predictions, TreeDrafter, Verification

PLACEHOLDER_TOKEN_ID = -1
# vLLM treats temperatures below this as greedy (vllm.sampling_params).
SAMPLING_EPS = 1e-5
# Self-check tolerance of the adapter's attention rows against the float64
# reference, by dtype (bf16 keeps 8 mantissa bits).
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class TreeRuntimeError(RuntimeError):
    """The runtime cannot verify trees correctly here; raised before any
    wrong token is produced."""


@dataclass
class BatchSampling:
    """Per batch row: how its target tokens are drawn."""

    greedy: torch.Tensor  # bool [B]
    temperature: torch.Tensor  # float32 [B] (1 for greedy rows)
    top_k: torch.Tensor | None  # int64 [B], 0 = off
    top_p: torch.Tensor | None  # float32 [B], 1 = off
    seeds: np.ndarray  # uint64 [B]

    @classmethod
    def all_greedy(cls, batch: int) -> BatchSampling:
        return cls(greedy=torch.ones(batch, dtype=torch.bool), temperature=torch.ones(batch),
                   top_k=None, top_p=None, seeds=np.zeros(batch, np.uint64))


@dataclass
class TreeStep:
    """One verification step handled by the runtime. Tensors the attention
    layers read are on the engine's device, made once per step."""

    req_ids: list[str]
    root_positions: np.ndarray  # int64 [B]: position of each row's root token
    sampling: BatchSampling
    # Tree requests only (T of them, N nodes in all):
    batch_rows: np.ndarray  # int64 [T]: batch row of each tree request
    parents: np.ndarray  # int32 [N], request-local
    depths: np.ndarray  # int64 [N]
    cu_nodes: torch.Tensor  # int32 [T + 1] (device)
    cu_nodes_cpu: np.ndarray  # int64 [T + 1]
    masks: torch.Tensor  # int64 [N, words] (device)
    node_rows: torch.Tensor  # int64 [N]: token index of each node in the step (device)
    node_slots: np.ndarray  # int64 [N]: KV slot written for each node
    prefix_lens: torch.Tensor  # int32 [T] (device)
    block_table: torch.Tensor  # int32 [T, max_blocks] (device)
    kv_caches: list[torch.Tensor]
    adapter: KVLayoutAdapter | None = None  # set by the first attention layer
    # Whose forward this is: the target's verification step, or a draft
    # forward over a guess tree (staged cascade): each is self-checked once.
    model: str = "target"

    @property
    def has_trees(self) -> bool:
        return len(self.batch_rows) > 0

    @classmethod
    def chains(cls, batch: int) -> TreeStep:
        """A step of ``batch`` greedy requests whose drafts are all chains."""
        empty = torch.zeros(0, dtype=torch.int64)
        return cls(
            req_ids=[], root_positions=np.zeros(batch, np.int64),
            sampling=BatchSampling.all_greedy(batch), batch_rows=np.zeros(0, np.int64),
            parents=np.zeros(0, np.int32), depths=np.zeros(0, np.int64),
            cu_nodes=torch.zeros(1, dtype=torch.int32), cu_nodes_cpu=np.zeros(1, np.int64),
            masks=torch.zeros(0, 1, dtype=torch.int64), node_rows=empty,
            node_slots=np.zeros(0, np.int64), prefix_lens=torch.zeros(0, dtype=torch.int32),
            block_table=torch.zeros(0, 1, dtype=torch.int32), kv_caches=[])


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


def _depths(masks: torch.Tensor) -> np.ndarray:
    """Depth of every node (1 for a child of the root): the number of its
    ancestors including itself, i.e. the popcount of its mask."""
    bits = np.bitwise_count(masks.numpy().view(np.uint64))
    return bits.sum(axis=1).astype(np.int64)


def _int32(array: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32))


class TreeRuntime:
    """Verifies one drafter's token trees in one model runner."""

    def __init__(self, drafter: TreeDrafter):
        self.drafter = drafter
        # Parents of the drafts last handed to vLLM, by request.
        self._parents: dict[str, list[int]] = {}
        self._step: TreeStep | None = None
        # Seeds drawn for unseeded sampled requests, kept while they run.
        self._seeds: dict[str, int] = {}
        # The models ("target", "draft") whose tree rows were self-checked.
        self._checked: set[str] = set()
        # Whether the model runner gave every attention layer this runtime.
        self.layers_bound = False

    # ------------------------------------------------------------------
    # Drafts and steps.

    def set_drafts(self, req_ids: Sequence[str], drafts: Drafts) -> list[list[int]]:
        """Remember the trees among ``drafts`` (one per batch row, rows
        named by ``req_ids``); returns the token lists vLLM schedules."""
        self._parents = {r: p for r, p in zip(req_ids, drafts.parents) if p is not None}
        return drafts.tokens

    @property
    def has_pending_trees(self) -> bool:
        return bool(self._parents)

    def discard_drafts(self) -> None:
        """The drafts handed out are verified as chains (by vLLM)."""
        self._parents = {}

    @property
    def current(self) -> TreeStep | None:
        return self._step

    @property
    def self_checked(self) -> bool:
        """Whether the target's tree rows were self-checked."""
        return "target" in self._checked

    @contextlib.contextmanager
    def draft_tree_forward(self, rows: np.ndarray, parents: list[np.ndarray],
                           node_rows: np.ndarray, prefix_lens: np.ndarray,
                           node_slots: torch.Tensor, block_table: torch.Tensor):
        """Tree rows for the attention layers of one draft forward (staged
        cascade, stage 2): per request ``rows[t]`` with a guess tree,
        ``parents[t]`` (request-local, -1: a child of the token at position
        ``prefix_lens[t] - 1``), the forward's token index of each node
        (``node_rows``) and the KV slot it writes (``node_slots``);
        ``block_table`` [T, max_blocks] of those requests. Only between
        target steps (the drafter runs after verification)."""
        if self._step is not None:
            raise TreeRuntimeError("a draft tree forward inside a target tree step")
        sizes = np.asarray([len(p) for p in parents], dtype=np.int64)
        cu = np.zeros(len(sizes) + 1, dtype=np.int64)
        cu[1:] = np.cumsum(sizes)
        parents_np = (np.concatenate(parents).astype(np.int32) if len(parents)
                      else np.zeros(0, np.int32))
        masks = ops.tree_ancestor_masks(torch.from_numpy(parents_np), _int32(cu))
        device = block_table.device
        self._step = TreeStep(
            req_ids=[], root_positions=np.asarray(prefix_lens, np.int64) - 1,
            sampling=BatchSampling.all_greedy(len(rows)),
            batch_rows=np.asarray(rows, dtype=np.int64), parents=parents_np,
            depths=_depths(masks), cu_nodes=_int32(cu).to(device), cu_nodes_cpu=cu,
            masks=masks.to(device),
            node_rows=torch.from_numpy(np.asarray(node_rows, np.int64)).to(device),
            node_slots=node_slots.to(torch.int64).cpu().numpy(),
            prefix_lens=_int32(prefix_lens).to(device),
            block_table=block_table.to(torch.int32).contiguous(), kv_caches=[],
            model="draft")
        try:
            yield self._step
        finally:
            self._step = None

    def end_step(self) -> None:
        self._step = None

    def batch_sampling(self, req_ids: list[str], params: list[Any]) -> BatchSampling:
        """Sampling settings of the batch rows; forgets seeds of requests that
        left the batch."""
        present = set(req_ids)
        for req_id in [r for r in self._seeds if r not in present]:
            del self._seeds[req_id]
        greedy = [p.temperature < SAMPLING_EPS for p in params]
        seeds = []
        for req_id, p, g in zip(req_ids, params, greedy):
            if p.seed is not None:
                seeds.append(p.seed)
            elif g:
                seeds.append(0)
            else:
                seeds.append(self._seeds.setdefault(req_id, random.getrandbits(64)))
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

    def begin_step(
        self,
        req_ids: list[str],
        scheduled_drafts: dict[str, list[int]],
        sampling_rows: BatchSampling,
        num_computed: np.ndarray,
        query_start: np.ndarray,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_table: torch.Tensor,
        kv_caches: list[torch.Tensor],
    ) -> TreeStep:
        """Set up the step after vLLM prepared its inputs and rewrite the
        positions of tree nodes. ``scheduled_drafts``: the draft tokens vLLM
        scheduled per request (the scheduler may have cut a draft: a prefix
        of a parent-first node list is still a tree); ``block_table`` [B,
        max_blocks] of the batch rows. Requests without a tree stay linear."""
        rows, node_rows, parents, sizes = [], [], [], []
        for b, req_id in enumerate(req_ids):
            n = len(scheduled_drafts.get(req_id, ()))
            tree = self._parents.get(req_id)
            if not n or tree is None:
                continue
            rows.append(b)
            node_rows.append(np.arange(query_start[b] + 1, query_start[b] + 1 + n))
            parents.append(np.asarray(tree[:n], dtype=np.int32))
            sizes.append(n)
        self._parents = {}
        cu = np.zeros(len(sizes) + 1, dtype=np.int64)
        cu[1:] = np.cumsum(sizes)
        parents_np = np.concatenate(parents) if parents else np.zeros(0, np.int32)
        masks = ops.tree_ancestor_masks(torch.from_numpy(parents_np), _int32(cu))
        depths = _depths(masks)
        root_positions = np.asarray(num_computed, dtype=np.int64).copy()
        node_rows_np = np.concatenate(node_rows) if node_rows else np.zeros(0, np.int64)
        batch_rows = np.asarray(rows, dtype=np.int64)
        device = positions.device
        node_rows_t = torch.from_numpy(node_rows_np).to(device)
        if rows:
            node_root = np.repeat(root_positions[batch_rows], sizes)
            positions[node_rows_t] = torch.from_numpy(node_root + depths).to(
                device, positions.dtype)
        self._step = TreeStep(
            req_ids=list(req_ids),
            root_positions=root_positions,
            sampling=sampling_rows,
            batch_rows=batch_rows,
            parents=parents_np,
            depths=depths,
            cu_nodes=_int32(cu).to(device),
            cu_nodes_cpu=cu,
            masks=masks.to(device),
            node_rows=node_rows_t,
            node_slots=slot_mapping[node_rows_t].to(torch.int64).cpu().numpy(),
            prefix_lens=_int32(root_positions[batch_rows] + 1).to(device),
            block_table=block_table[torch.from_numpy(batch_rows).to(block_table.device)]
            .to(torch.int32).contiguous(),
            kv_caches=kv_caches,
        )
        return self._step

    # ------------------------------------------------------------------
    # Attention (called by every attention layer of a tree step).

    def attend(self, adapter: KVLayoutAdapter, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, kv_cache: torch.Tensor, scale: float,
               output: torch.Tensor) -> None:
        """Overwrite the attention output of the tree nodes' rows."""
        step = self._step
        if step is None or not step.has_trees:
            return
        if step.adapter is None:
            step.adapter = adapter
        rows = step.node_rows
        q, k, v = query[rows], key[rows], value[rows]
        result = adapter.attend(q, k, v, kv_cache, step.block_table, step.prefix_lens,
                                step.cu_nodes, step.masks, scale)
        if step.model not in self._checked:
            self._self_check(adapter, step, q, k, v, kv_cache, scale, result)
        output.view(output.shape[0], -1)[rows] = result.view(len(rows), -1).to(output.dtype)

    def _self_check(self, adapter: KVLayoutAdapter, step: TreeStep, q: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, scale: float,
                    result: torch.Tensor) -> None:
        """First tree step of the engine: the adapter must read this step's
        keys where vLLM wrote them, and its rows must match the float64
        reference on the live cache (on the engine's own device)."""
        key_cache, value_cache = adapter.cache_views(kv_cache)
        block_size = key_cache.shape[1]
        slots = torch.from_numpy(step.node_slots).to(key_cache.device)
        if not torch.equal(key_cache[slots // block_size, slots % block_size],
                           k.to(key_cache.dtype)):
            raise TreeRuntimeError(
                f"tree speculation: {adapter.name} does not find this step's keys where "
                f"the attention backend wrote them ({kv_cache.dtype} cache "
                f"{tuple(kv_cache.shape)}): the KV cache layout is not the one this "
                "adapter reads; use lookahead mode \"linear\"")
        want = reference.tree_attention(
            q.cpu(), k.cpu(), v.cpu(), key_cache.cpu(), value_cache.cpu(),
            step.block_table.cpu(), step.prefix_lens.cpu(), step.cu_nodes.cpu(),
            step.masks.cpu(), scale, accumulate=torch.float64)
        tolerance = SELF_CHECK_TOLERANCE.get(q.dtype, 3e-2)
        error = (result.cpu().double() - want.double()).abs().max().item() if len(want) else 0.0
        scale_ref = max(1.0, want.double().abs().max().item() if len(want) else 1.0)
        bound = tolerance * scale_ref
        # Plus the rounding of the scores themselves in the kernel's float32:
        # an error of eps * |q|.|k| in a score moves the output by up to that
        # times |v|. Models with huge attention logits (Qwen2.5's first layer)
        # showed 1.5e-4 relative in float32 on correct trees.
        if len(want):
            used = torch.cat([step.block_table[b, :(int(n) + block_size - 1) // block_size]
                              for b, n in enumerate(step.prefix_lens.tolist())]).long()
            keys, values = key_cache[used], value_cache[used]
            logit = scale * q.double().abs().sum(-1).max().item() * max(
                k.double().abs().max().item(), keys.double().abs().max().item())
            bound += 4 * torch.finfo(torch.float32).eps * logit * max(
                v.double().abs().max().item(), values.double().abs().max().item())
        if not error <= bound:
            raise TreeRuntimeError(
                f"tree speculation self-check failed on {q.device}: {adapter.name} tree "
                f"attention of the {step.model} model differs from the reference by "
                f"{error:.3g} (tolerance {bound:.3g}, {q.dtype}); stopping before a wrong "
                "token")
        self._checked.add(step.model)

    # ------------------------------------------------------------------
    # Acceptance.

    def predictions(self, logits: torch.Tensor, input_tokens: torch.Tensor) -> Predictions | None:
        """The target's top ``drafter.prediction_ranks`` tokens at every
        logits row (one batched ``topk``), None when the drafter wants none."""
        ranks = min(self.drafter.prediction_ranks, logits.shape[-1])
        if ranks <= 0:
            return None
        topk = logits.topk(ranks, dim=-1).indices.to(torch.int32).cpu().numpy()
        return Predictions(input_tokens=input_tokens.to(torch.int32).cpu().numpy(), topk=topk)

    def observe_sampled_step(self, logits: torch.Tensor, input_tokens: torch.Tensor) -> None:
        """A step vLLM's sampler verified (no tree): the drafter gets the
        target's top-k at its rows, when it asks for them."""
        predictions = self.predictions(logits, input_tokens)
        if predictions is not None:
            self.drafter.observe_predictions(predictions)

    def accept_and_compact(self, draft_tokens: torch.Tensor, num_draft: list[int],
                           logits: torch.Tensor,
                           input_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Verify every request of the current step (tree or chain), compact
        the KV of accepted tree paths, tell the drafter what the target
        predicted and end the step. ``draft_tokens`` is vLLM's flat draft
        list, ``logits`` its [sum(n + 1), V] rows (root row, then the nodes,
        per request), ``input_tokens`` the input token of every logits row
        (for the drafter's ``Predictions``). Returns vLLM's sampled token ids
        [batch, max_draft + 1], -1 padded."""
        step = self._step
        if step is None:
            raise TreeRuntimeError("accept_and_compact without a tree step")
        self._step = None
        out, argmax, cu_draft, accepted, path = _accept(step, draft_tokens, num_draft, logits)
        self._compact(step, path, accepted)
        self.drafter.observe_verification(Verification(
            req_ids=step.req_ids, argmax=argmax, cu_rows=cu_draft + np.arange(len(num_draft) + 1),
            accepted=accepted, path=path,
            predictions=None if input_tokens is None else self.predictions(logits, input_tokens)))
        return out

    def _compact(self, step: TreeStep, path: np.ndarray, accepted: np.ndarray) -> None:
        """Move the KV of each accepted tree path to the slots of positions
        p+1..p+a (chains are in place already)."""
        if not step.has_trees:
            return
        src, dst = [], []
        cu_tree = step.cu_nodes_cpu
        for t, b in enumerate(step.batch_rows):
            a = accepted[b]
            slots = step.node_slots[cu_tree[t]:cu_tree[t + 1]]
            src.append(slots[path[b, :a]])
            dst.append(slots[:a])
        src_all, dst_all = np.concatenate(src), np.concatenate(dst)
        moved = src_all != dst_all
        if moved.any() and step.adapter is not None:
            step.adapter.compact(step.kv_caches, torch.from_numpy(src_all[moved]),
                                 torch.from_numpy(dst_all[moved]))


def verify_greedy_chains(draft_tokens: torch.Tensor, num_draft: list[int],
                         logits: torch.Tensor) -> torch.Tensor:
    """Greedy chain verification of a whole batch, by the runtime's rule
    (used for the greedy rows of batches vLLM's rejection sampler verifies)."""
    step = TreeStep.chains(len(num_draft))
    return _accept(step, draft_tokens, num_draft, logits)[0]


def raw_argmax_is_greedy(sampling_metadata: Any) -> bool:
    """Whether the greedy token is the argmax of the raw logits: no
    penalties, bad words or allowed-token masks (logits processors that
    vLLM's sampler would apply first)."""
    return bool(sampling_metadata.no_penalties
                and not sampling_metadata.bad_words_token_ids
                and sampling_metadata.allowed_token_ids_mask is None)


def _target_tokens(step: TreeStep, logits: torch.Tensor, row_batch: np.ndarray,
                   row_depth: np.ndarray, argmax: torch.Tensor) -> torch.Tensor:
    """Target token of every logits row: the argmax for greedy requests,
    the position-keyed sample (``tree.sampling``) for the others."""
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


def _accept(step: TreeStep, draft_tokens: torch.Tensor, num_draft: list[int],
            logits: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray,
                                           np.ndarray]:
    """Verify every request of ``step``: vLLM's sampled token ids [batch,
    max_draft + 1] (-1 padded), the argmax of every logits row, the draft
    offsets [batch + 1], accepted tokens [batch] and accepted paths [batch,
    max_draft]."""
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
    cu_tree = step.cu_nodes_cpu
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

    tokens = draft_tokens.to(torch.int32).cpu().contiguous()
    max_draft = int(num_draft_np.max(initial=0))
    path, accepted, bonus = ops.tree_accept_greedy(
        _int32(parents), tokens, targets[root_mask], targets[~root_mask],
        _int32(cu_draft), max_draft)

    out = torch.full((batch, max_draft + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    accepted_np = accepted.numpy().astype(np.int64)
    path_np = path.numpy().astype(np.int64)
    taken = path_np >= 0
    flat_path = np.where(taken, path_np + cu_draft[:-1, None], 0)
    out[:, :max_draft] = torch.where(torch.from_numpy(taken), tokens[flat_path],
                                     PLACEHOLDER_TOKEN_ID)
    out[torch.arange(batch), accepted] = bonus
    return out.to(logits.device), argmax.numpy(), cu_draft, accepted_np, path_np
