"""Lookahead pool proposer, linear mode.

Each request keeps an n-gram pool fed with every n-gram of its prompt and
output. Per step the proposer looks up the request's last ``key_len`` tokens
and proposes the most recent continuation, extended greedily through the
pool up to ``num_speculative_tokens``. vLLM's rejection sampler verifies the
chain, so the output is exactly that of plain decoding.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from vllm_lookahead import patches
from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.ops import NgramPool

logger = logging.getLogger(__name__)


class LookaheadProposer:
    """Custom-class proposer for ``speculative_config={"method":
    "custom_class", "model": "vllm_lookahead.LookaheadProposer", ...}``."""

    def __init__(self, vllm_config: Any):
        if not patches.is_applied():
            raise RuntimeError(
                "vllm_lookahead's vLLM plugin is not loaded in this process; "
                "reinstall vllm-lookahead and make sure VLLM_PLUGINS (if set) "
                "includes 'vllm_lookahead'"
            )
        spec_config = vllm_config.speculative_config
        self.config = LookaheadConfig.from_vllm_config(vllm_config)
        self.k = spec_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.pool = NgramPool(
            max_requests=vllm_config.scheduler_config.max_num_seqs,
            vocab_size=vllm_config.model_config.get_vocab_size(),
            ngram=self.config.ngram,
            key_len=self.config.key_len,
            capacity=self.config.capacity,
            buckets=self.config.buckets,
            ways=self.config.ways,
            shared=self.config.shared_pool,
        )
        # Tokens of each request already inserted into its pool.
        self._indexed: dict[str, int] = {}
        # Draft length allowed next step, and length of the last draft.
        self._allowed: dict[str, int] = {}
        self._last_draft: dict[str, int] = {}
        self._batch_req_ids: list[str] | None = None
        logger.info(
            "vllm_lookahead: LookaheadProposer (linear) %s, k=%d, pool %.1f MiB",
            self.config, self.k, self.pool.nbytes() / 2**20,
        )

    def load_model(self, *args, **kwargs) -> None:
        """No model to load: the pool is the whole draft."""

    def bind_batch(self, req_ids: list[str], greedy: list[bool] | None = None) -> None:
        """Row -> request map of the coming ``propose`` call; pools of
        requests that left the batch (finished, aborted, preempted or
        unscheduled) are freed here and rebuilt from the token history if the
        request comes back."""
        self._batch_req_ids = req_ids
        present = set(req_ids)
        for req_id in [r for r in self._indexed if r not in present]:
            self._drop(req_id)

    def _drop(self, req_id: str) -> None:
        del self._indexed[req_id]
        self._allowed.pop(req_id, None)
        self._last_draft.pop(req_id, None)
        self.pool.erase(req_id)

    def _draft_budget(self, req_ids, sampled_token_ids, rows) -> np.ndarray:
        """Per-row draft length from the request's last acceptance (vLLM
        returns the accepted draft tokens plus one in ``sampled_token_ids``)."""
        if not self.config.adaptive:
            return np.full(len(rows), self.k, dtype=np.int64)
        budget = np.empty(len(rows), dtype=np.int64)
        for i, (req_id, row) in enumerate(zip(req_ids, rows)):
            last = self._last_draft.get(req_id, 0)
            allowed = self._allowed.get(req_id, self.k)
            if last:
                accepted = len(sampled_token_ids[row]) - 1
                allowed = min(self.k, 2 * last) if accepted >= last else accepted + 1
            self._allowed[req_id] = allowed
            budget[i] = allowed
        return budget

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        req_ids = self._batch_req_ids
        if req_ids is None or len(req_ids) != len(sampled_token_ids):
            raise RuntimeError(
                "LookaheadProposer.propose called without the batch's request "
                "ids; the vllm_lookahead patch of GPUModelRunner is not active"
            )
        self._batch_req_ids = None
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        rows = [
            i
            for i, sampled in enumerate(sampled_token_ids)
            if sampled and num_tokens_no_spec[i] < self.max_model_len
        ]
        if not rows:
            return drafts
        row_req_ids = [req_ids[i] for i in rows]
        lengths = num_tokens_no_spec[rows].astype(np.int64)
        self._index_new_tokens(row_req_ids, rows, lengths, token_ids_cpu)

        budget = np.minimum(
            self._draft_budget(row_req_ids, sampled_token_ids, rows),
            self.max_model_len - lengths,
        )
        chains = self._extend_chains(row_req_ids, rows, lengths, token_ids_cpu, budget)
        for i, row in enumerate(rows):
            drafts[row] = chains[i]
            self._last_draft[row_req_ids[i]] = len(chains[i])
        return drafts

    def _index_new_tokens(self, req_ids, rows, lengths, token_ids_cpu) -> None:
        overlap = self.config.ngram - 1
        starts = np.empty(len(rows), dtype=np.int64)
        for i, req_id in enumerate(req_ids):
            indexed = self._indexed.get(req_id)
            if indexed is not None and indexed > lengths[i]:
                self._drop(req_id)
                indexed = None
            if indexed is None:
                self.pool.open(req_id)
                indexed = 0
            starts[i] = max(0, indexed - overlap)
            self._indexed[req_id] = int(lengths[i])
        todo = np.nonzero(lengths - starts >= self.config.ngram)[0]
        if len(todo):
            self.pool.insert_spans(
                [req_ids[i] for i in todo],
                torch.from_numpy(token_ids_cpu),
                np.asarray(rows)[todo],
                starts[todo],
                lengths[todo],
            )

    def _extend_chains(self, req_ids, rows, lengths, token_ids_cpu, budget):
        key_len = self.config.key_len
        n = len(rows)
        # Context tail (the key) followed by the chain grown so far.
        width = key_len + int(budget.max(initial=0)) + self.pool.cont_len
        tail = np.full((n, width), -1, dtype=np.int32)
        for i, row in enumerate(rows):
            take = min(key_len, int(lengths[i]))
            tail[i, key_len - take : key_len] = token_ids_cpu[row, lengths[i] - take : lengths[i]]
        chain_len = np.zeros(n, dtype=np.int64)
        active = np.nonzero((budget > 0) & (lengths >= key_len))[0]
        while len(active):
            ends = key_len + chain_len[active]
            key_cols = ends[:, None] - key_len + np.arange(key_len)
            query = torch.from_numpy(np.take_along_axis(tail[active], key_cols, axis=1))
            out, counts = self.pool.lookup([req_ids[i] for i in active], query, 1)
            found = counts.numpy() > 0
            guesses = out[:, 0].numpy()
            for j in np.nonzero(found)[0]:
                i = active[j]
                tail[i, ends[j] : ends[j] + guesses.shape[1]] = guesses[j]
                chain_len[i] += guesses.shape[1]
            active = active[found]
            active = active[chain_len[active] < budget[active]]
        return [
            tail[i, key_len : key_len + min(chain_len[i], budget[i])].tolist()
            for i in range(n)
        ]
