"""vLLM's ``draft_model`` method driven by the staged cascade: the staged
drafter next to vLLM's draft-model proposer, which keeps loading the draft
and owning its KV cache, and a causal forward over that draft."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_lookahead.config import StagedConfig
from vllm_lookahead.tree.protocol import DraftForward, DraftModel

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


def draft_model(runner: Any, num_reqs: int) -> DraftModel:
    """The draft model of vLLM's draft-model proposer for the batch's rows."""
    drafter = runner.drafter
    table = runner.input_batch.block_table[drafter.kv_cache_gid]
    capacity = table.num_blocks_per_row[:num_reqs].astype(np.int64) * table.block_size
    return DraftModel(kv_capacity=capacity,
                      forward=_draft_forward(drafter, table.get_device_tensor(num_reqs),
                                             table.block_size))


def _draft_forward(drafter: Any, block_table: torch.Tensor, block_size: int) -> DraftForward:
    """A causal forward of several tokens per request over vLLM's draft
    model, writing their KV to the draft layers' slots (the request's own
    blocks, shared with the target)."""
    device = block_table.device

    def forward(rows: np.ndarray, starts: np.ndarray, tokens: list[np.ndarray],
                num_logits: np.ndarray) -> torch.Tensor:
        q = np.asarray([len(t) for t in tokens], dtype=np.int64)
        cu = np.zeros(len(q) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(q)
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, q)])
        owner = np.repeat(np.arange(len(q)), q)
        table = block_table[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)]
        pos = torch.from_numpy(positions).to(device)
        slots = (table[torch.from_numpy(owner).to(device), pos // block_size].to(torch.int64)
                 * block_size + pos % block_size)
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
        with set_forward_context(per_layer, drafter.vllm_config, num_tokens=int(cu[-1]),
                                 slot_mapping=dict.fromkeys(per_layer, slots)):
            hidden = drafter.model(input_ids=input_ids, positions=pos)
        if drafter.model_returns_tuple():
            hidden = hidden[0]
        wanted = np.concatenate([np.arange(e - n, e) for e, n in zip(cu[1:], num_logits)])
        return drafter.model.compute_logits(hidden[torch.from_numpy(wanted).to(device)])

    return forward
