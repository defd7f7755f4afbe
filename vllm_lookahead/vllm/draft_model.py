"""vLLM's ``draft_model`` method driven by the staged cascade: the staged
drafter next to vLLM's draft-model proposer, which keeps loading the draft
and owning its KV cache, and a causal forward over that draft."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_lookahead.config import StagedConfig
from vllm_lookahead.tree.protocol import DraftForward, DraftModel
from vllm_lookahead.tree.runtime import TreeRuntime

logger = logging.getLogger(__name__)


def make_staged_drafter(runner: Any) -> Any:
    """The runner's staged drafter (``proposers.staged``) when vLLM's
    ``draft_model`` method runs with ``additional_config["staged"]``, else
    None."""
    spec = runner.speculative_config
    raw = StagedConfig.section(runner.vllm_config) if spec is not None else None
    if raw is None or not spec.uses_draft_model():
        return None
    from vllm_lookahead.proposers.staged import StagedDrafter

    staged = StagedDrafter(
        StagedConfig.from_dict(raw), spec.num_speculative_tokens,
        runner.vllm_config.model_config.max_model_len,
        runner.vllm_config.scheduler_config.max_num_seqs,
        runner.vllm_config.model_config.get_vocab_size())
    logger.info("vllm_lookahead: staged draft cascade %s, k=%d", staged.config, staged.k)
    # vLLM's non-padded drafter path: the drafter runs after the step's
    # bookkeeping and gets the sampled tokens as lists (vLLM's draft-model
    # proposer refuses this flag at construction; it is not called any more).
    spec.disable_padded_drafter_batch = True
    return staged


def draft_model(runner: Any, num_reqs: int, runtime: TreeRuntime | None = None) -> DraftModel:
    """The draft model of vLLM's draft-model proposer for the batch's rows;
    it takes token trees where ``runtime`` (the runner's tree runtime, its
    attention layers bound to it) gives the draft's attention tree rows."""
    drafter = runner.drafter
    table = runner.input_batch.block_table[drafter.kv_cache_gid]
    capacity = table.num_blocks_per_row[:num_reqs].astype(np.int64) * table.block_size
    return DraftModel(kv_capacity=capacity, trees=runtime is not None,
                      forward=_draft_forward(drafter, table.get_device_tensor(num_reqs),
                                             table.block_size, runtime))


def _tree_positions(parents: np.ndarray) -> np.ndarray:
    """Depth of each node of a parent-first tree (1 for a child of the
    token before it)."""
    depth = np.zeros(len(parents), dtype=np.int64)
    for i, p in enumerate(parents):
        depth[i] = 1 + (depth[p] if p >= 0 else 0)
    return depth


def _draft_forward(drafter: Any, block_table: torch.Tensor, block_size: int,
                   runtime: TreeRuntime | None) -> DraftForward:
    """A forward of several tokens per request over vLLM's draft model,
    writing their KV to the draft layers' slots (the request's own blocks,
    shared with the target): causal, and where given, a token tree at the
    end of a row, whose rows the tree runtime recomputes in every draft
    attention layer (``DraftForward``)."""
    device = block_table.device

    def forward(rows: np.ndarray, starts: np.ndarray, tokens: list[np.ndarray],
                num_logits: np.ndarray,
                parents: list[np.ndarray | None] | None = None) -> torch.Tensor:
        q = np.asarray([len(t) for t in tokens], dtype=np.int64)
        cu = np.zeros(len(q) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(q)
        flat = [np.arange(s, s + n) for s, n in zip(starts, q)]
        positions = [f.copy() for f in flat]
        trees = [] if parents is None else [
            (i, p) for i, p in enumerate(parents) if p is not None and len(p)]
        if trees and runtime is None:
            raise ValueError("this draft forward takes no token trees")
        for i, p in trees:
            first = q[i] - len(p)
            positions[i][first:] = starts[i] + first - 1 + _tree_positions(p)
        owner = np.repeat(np.arange(len(q)), q)
        table = block_table[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)]
        slot_pos = torch.from_numpy(np.concatenate(flat)).to(device)
        pos = torch.from_numpy(np.concatenate(positions)).to(device)
        slots = (table[torch.from_numpy(owner).to(device), slot_pos // block_size]
                 .to(torch.int64) * block_size + slot_pos % block_size)
        seq_lens = torch.from_numpy((np.asarray(starts) + q).astype(np.int32))
        query_start = torch.from_numpy(cu)
        metadata = CommonAttentionMetadata(
            query_start_loc=query_start.to(device), query_start_loc_cpu=query_start,
            seq_lens=seq_lens.to(device), num_reqs=len(q), num_actual_tokens=int(cu[-1]),
            max_query_len=int(q.max()), max_seq_len=int(seq_lens.max()),
            block_table_tensor=table, slot_mapping=slots, positions=pos,
            seq_lens_cpu_upper_bound=seq_lens)
        _, per_layer = drafter.build_per_group_and_layer_attn_metadata(metadata)
        input_ids = torch.from_numpy(np.concatenate(tokens).astype(np.int32)).to(device)
        with contextlib.ExitStack() as stack:
            if trees:
                index = np.asarray([i for i, _ in trees])
                node_rows = np.concatenate([np.arange(cu[i + 1] - len(p), cu[i + 1])
                                            for i, p in trees])
                stack.enter_context(runtime.draft_tree_forward(
                    rows=index, parents=[p for _, p in trees], node_rows=node_rows,
                    prefix_lens=np.asarray([starts[i] + q[i] - len(p) for i, p in trees]),
                    node_slots=slots[torch.from_numpy(node_rows).to(device)],
                    block_table=table[torch.from_numpy(index).to(device)]))
            with set_forward_context(per_layer, drafter.vllm_config, num_tokens=int(cu[-1]),
                                     slot_mapping=dict.fromkeys(per_layer, slots)):
                hidden = drafter.model(input_ids=input_ids, positions=pos)
        if drafter.model_returns_tuple():
            hidden = hidden[0]
        wanted = np.concatenate([np.arange(e - n, e) for e, n in zip(cu[1:], num_logits)])
        return drafter.model.compute_logits(hidden[torch.from_numpy(wanted).to(device)])

    return forward
