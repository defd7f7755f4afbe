"""Lookahead decoding proposer (arXiv 2402.02057) for vLLM.

Each request keeps an n-gram pool fed with the n-grams of its prompt and
output. Two modes:

- tree (default): per request a Jacobi lookahead branch (a 2D window of W
  columns x (N-1) levels) and up to G pool candidates for the last tokens,
  laid out as one token tree (``jacobi.tree_layout``) and verified in one
  target forward by the tree runtime, merged in one trie with the recycled
  tree (``recycle.py``: the target's own top-k successors of earlier
  tokens, read from the last token). After the forward the target's argmax
  at the window's last level becomes its new level, each column gives one
  new n-gram for the pool, and every row's top-k updates the successor
  table.
- linear: the most recent pool continuation of the last ``key_len`` tokens,
  extended greedily through the pool up to ``num_speculative_tokens``,
  verified by vLLM's own rejection sampler.

Either way the output is exactly that of plain decoding.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from vllm_lookahead import ops, vllm as vllm_patches
from vllm_lookahead.config import LookaheadConfig
from vllm_lookahead.proposers.budget import (PROBE_DRAFTS, BarTuner, NodeValues, StepCostModel,
                                             StepTimer)
from vllm_lookahead.proposers.jacobi import JacobiWindow, num_classes
from vllm_lookahead.proposers.pool import NgramPool
from vllm_lookahead.proposers.recycle import (CHAIN_MAX_NGRAM, SuccessorTable, chain_depths,
                                               chain_tokens, tree_template)
from vllm_lookahead.proposers.shared_text import SharedText
from vllm_lookahead.tree.protocol import (BatchInfo, DraftInputs, Drafts, Predictions,
                                          Verification)

logger = logging.getLogger(__name__)

# Per-request override: SamplingParams(extra_args={"lookahead": {...}}).
OVERRIDE_KEYS = ("window", "guesses", "disable")
# Steps between stats log lines (env VLLM_LOOKAHEAD_LOG_EVERY).
STATS_EVERY_STEPS = int(os.environ.get("VLLM_LOOKAHEAD_LOG_EVERY", "500"))
# Candidate ranks with their own acceptance estimates (later ranks share the
# last one's).
MAX_RANKS = 8


def _int32(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int32))


class LookaheadProposer:
    """Custom-class proposer for ``speculative_config={"method":
    "custom_class", "model": "vllm_lookahead.LookaheadProposer", ...}``; a
    ``tree.protocol.TreeDrafter``."""

    def __init__(self, vllm_config: Any):
        if not vllm_patches.is_applied():
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
        # Token recycling (tree mode): the successor table, shared by all
        # requests, and the template its trees are read with, holding the
        # context-match chain as one more branch.
        tree = self.config.mode == "tree"
        recycling = self.config.recycle and tree
        chain = self.config.chain if tree else 0
        self.prediction_ranks = self.config.recycle_ranks if recycling else 0
        self.successors = (SuccessorTable(vllm_config.model_config.get_vocab_size(),
                                          self.config.recycle_ranks) if recycling else None)
        self.template_parents, self.template_ranks = tree_template(
            self.config.recycle_nodes if recycling else 0, self.config.recycle_ranks,
            self.config.recycle_depth, chain)
        self.template_chain = chain_depths(self.template_parents, self.template_ranks)
        # Tokens of each request already inserted into its pool.
        self._indexed: dict[str, int] = {}
        # Draft length allowed next step, and length of the last draft.
        self._allowed: dict[str, int] = {}
        self._last_draft: dict[str, int] = {}
        self._batch_req_ids: list[str] | None = None
        self._batch_trees = False
        self._prompt_lens: dict[str, int] = {}
        self._overrides: dict[str, dict[str, Any]] = {}
        self._windows: dict[str, JacobiWindow] = {}
        # Each request's last tree: window columns, filled levels, node classes.
        self._layouts: dict[str, tuple[int, int, np.ndarray]] = {}
        # Measured budget (tree mode): step-time fit and per-class
        # acceptance estimates (``budget.py``).
        self.cost = StepCostModel()
        # Earlier requests' text, where a request's chain may come from instead
        # of its own text, and each running request's text so far (given to
        # it as the request leaves).
        self.shared_text = (SharedText(self.config.shared_text)
                            if chain and self.config.shared_text else None)
        self._texts: dict[str, np.ndarray] = {}
        # Node classes: the layout's (window, candidates, template nodes), then
        # the chain's by its source (the request's own text, the shared text),
        # the length of its context match and its depth (a chain after a
        # 4-token match is accepted several times as often as one after a
        # 1-token match).
        self._chain_classes = num_classes(self.config.ngram - 1, self.config.window, MAX_RANKS,
                                          len(self.template_parents))
        self.values = NodeValues(self._chain_classes + 2 * CHAIN_MAX_NGRAM * chain)
        # Chains (linear mode, and batches the runtime cannot verify): a
        # class per depth.
        self.chain_values = NodeValues(self.k)
        self.timer = StepTimer(self.cost)
        # Multiple of the bar chosen by realized throughput (measured budget).
        # One for every batch size: tuners per power of two of the batch
        # restarted their exploration each time a batch drained below one
        # (SmolLM2 at batch 16: 0.86x of plain in one run, one tuner 0.97x in
        # another).
        self.tuner = BarTuner()
        self._scale = 1.0  # of the coming step
        self._drafted_tokens = 0  # in the last step
        self._threshold = 0.0  # acceptance bar of the last drafting step
        self._proposer_seconds = 0.0
        # trees, nodes, accepted tokens, pool lookups, pool hits
        self._stats = np.zeros(5, dtype=np.int64)
        self._steps = 0
        logger.info(
            "vllm_lookahead: LookaheadProposer (%s) %s, k=%d, pool %.1f MiB, successor "
            "table %.1f MiB, shared text %.1f MiB", self.config.mode, self.config, self.k,
            self.pool.nbytes() / 2**20,
            (self.successors.nbytes() if self.successors else 0) / 2**20,
            (self.shared_text.nbytes() if self.shared_text else 0) / 2**20,
        )

    def load_model(self, *args, **kwargs) -> None:
        """No model to load: the pool is the whole draft."""

    def bind_batch(self, batch: BatchInfo) -> None:
        """The coming ``draft`` call's rows. Pools of requests that left the
        batch (finished, aborted, preempted or unscheduled) are freed here
        and rebuilt from the token history if the request comes back."""
        self.timer.batch_bound(batch.scheduled_tokens, batch.prefill_tokens)
        req_ids = batch.req_ids
        self._batch_req_ids = req_ids
        self._batch_trees = batch.trees_verified and self.config.mode == "tree"
        self._prompt_lens = dict(zip(req_ids, batch.prompt_lens))
        # Parsed once per request, so a bad override warns once.
        self._overrides = {r: self._overrides[r] if r in self._overrides
                           else self._override(r, e) for r, e in zip(req_ids, batch.extra_args)}
        present = set(req_ids)
        for req_id in [r for r in self._indexed.keys() | self._allowed.keys() | self._texts.keys()
                       if r not in present]:
            self._drop(req_id)

    def step_started(self) -> None:
        """Called by the model runner as a forward starts (budget timing)."""
        self.timer.forward_started()

    def _override(self, req_id: str, extra_args: dict[str, Any] | None) -> dict[str, Any]:
        """The request's valid ``extra_args["lookahead"]`` settings. A bad
        one is ignored with a warning: raising here would stop the engine
        for every request."""
        raw = (extra_args or {}).get("lookahead")
        if raw is None:
            return {}
        valid = isinstance(raw, dict) and set(raw) <= set(OVERRIDE_KEYS) and all(
            isinstance(raw[k], int) and not isinstance(raw[k], bool) and raw[k] >= 0
            for k in ("window", "guesses") if k in raw
        ) and isinstance(raw.get("disable", False), bool)
        if not valid:
            logger.warning(
                "vllm_lookahead: request %s: ignoring extra_args['lookahead']=%r "
                "(keys: %s; window, guesses: non-negative integers; disable: bool)",
                req_id, raw, ", ".join(OVERRIDE_KEYS))
            return {}
        return raw

    def _drop(self, req_id: str) -> None:
        text = self._texts.pop(req_id, None)
        if text is not None:
            self.shared_text.add(text)
        if self._indexed.pop(req_id, None) is not None:
            self.pool.erase(req_id)
        self._allowed.pop(req_id, None)
        self._last_draft.pop(req_id, None)
        self._windows.pop(req_id, None)
        self._layouts.pop(req_id, None)

    def _draft_budget(self, req_ids, sampled_token_ids, rows) -> np.ndarray:
        """Per-row draft length from the request's last acceptance (vLLM
        returns the accepted draft tokens plus one in ``sampled_token_ids``),
        which also feeds the acceptance estimate per chain depth."""
        budget = np.full(len(rows), self.k, dtype=np.int64)
        offered, taken = [], []
        for i, (req_id, row) in enumerate(zip(req_ids, rows)):
            last = self._last_draft.get(req_id, 0)
            allowed = self._allowed.get(req_id, self.k)
            if last:
                accepted = min(len(sampled_token_ids[row]) - 1, last)
                offered.append(np.arange(last))
                taken.append(np.arange(accepted))
                allowed = min(self.k, 2 * last) if accepted >= last else accepted + 1
            self._allowed[req_id] = allowed
            if self.config.adaptive:
                budget[i] = allowed
        if offered:
            self.chain_values.update(np.concatenate(offered), np.concatenate(taken))
        return budget

    def _bar(self, n_requests: int) -> float:
        """The acceptance probability a draft node needs this step, at the
        nodes its trees are expected to hold, times the scale the
        ``BarTuner`` chose for the step (0 with the static budget)."""
        self._scale = 1.0
        if self.config.budget != "measured":
            bar = 0.0
        else:
            bar = self.cost.threshold(n_requests, round(n_requests * self.cost.nodes_per_tree))
            # Tuned once drafts' costs are measured: the probing steps before
            # hold the runtime's one-time self-check (a step several times
            # slower than any later one), which priced drafting out for good
            # in the tuner as it had in the fit (the demo's batch 1 ran 0.95x
            # at S 1.03).
            if np.isfinite(bar) and self.config.tune_bar and self.cost.draft_costs_known:
                self._scale = self.tuner.choose()
                bar = bar * self._scale if np.isfinite(self._scale) else np.inf
        self._threshold = bar
        return bar

    def _paying(self, values: NodeValues, classes: np.ndarray, num_nodes: np.ndarray,
                threshold: float, n_requests: int) -> np.ndarray:
        """Rows whose draft (node classes [rows, width], the first
        ``num_nodes`` valid) is kept by the measured budget: each draft's
        expected net gain (measured acceptance minus the bar, over its nodes)
        must beat its own fixed cost, and the kept drafts together that of a
        drafting step; until drafts' costs are measured, only the
        ``PROBE_DRAFTS`` best. Classes not verified for a while drift back to
        the prior and are tried again."""
        drafting = np.nonzero(num_nodes)[0]
        if self.config.budget != "measured" or not len(drafting) or not self.cost.ready:
            return drafting
        valid = np.arange(classes.shape[1]) < num_nodes[:, None]
        gain = np.where(valid, values.rate()[classes] - threshold, 0.0).sum(axis=1)
        gain -= self._scale * self.cost.tree_cost_tokens(n_requests)
        drafting = drafting[gain[drafting] > 0]
        if not self.cost.draft_costs_known:  # probing: the best few
            best = np.argsort(-gain[drafting], kind="stable")[:PROBE_DRAFTS]
            drafting = np.sort(drafting[best])
        if gain[drafting].sum() < self._scale * self.cost.fixed_cost_tokens(n_requests):
            drafting = drafting[:0]
        return drafting

    def _select(self, values: np.ndarray, parents: np.ndarray, num_nodes: np.ndarray,
                n_requests: int) -> np.ndarray:
        """bool [rows, width]: the nodes kept by the measured budget once
        drafts' costs are measured. Nodes are taken best first over the whole
        batch (a node's value is its class's measured acceptance, capped by
        its parent's, so every prefix of that order is a set of trees), and
        the step keeps the prefix of the highest net gain: expected accepted
        tokens less the tokens a plain step would produce in the time the
        prefix adds to the forward, priced by the step's size
        (``StepCostModel.decode_seconds``) and scaled by the step's
        ``BarTuner`` scale; none where no prefix gains.
        ``values`` and ``parents`` [rows, width] (parents before children,
        -1: under the root), the first ``num_nodes`` of each row valid."""
        rows, width = values.shape
        kept = np.zeros((rows, width), dtype=bool)
        valid = np.arange(width) < num_nodes[:, None]
        if not valid.any():
            return kept
        capped = np.where(valid, values, -np.inf)
        for j in range(width):
            under = valid[:, j] & (parents[:, j] >= 0)
            if under.any():
                r = np.nonzero(under)[0]
                capped[r, j] = np.minimum(capped[r, j], capped[r, parents[r, j]])
        row, col = np.nonzero(valid)
        order = np.lexsort((col, row, -capped[row, col]))
        row, col = row[order], col[order]
        gain = np.cumsum(capped[row, col])
        new_tree = np.zeros(len(row), dtype=bool)  # a row's first node opens its tree
        new_tree[np.unique(row, return_index=True)[1]] = True
        counts = np.arange(1, len(row) + 1)
        seconds = self.cost.decode_seconds(n_requests, np.concatenate([[0], counts]),
                                           np.concatenate([[0], np.cumsum(new_tree)]))
        net = np.concatenate([[0.0], gain]) - self._scale * (
            seconds - seconds[0]) * self.cost.decode_rate(n_requests)
        best = int(np.argmax(net))
        kept[row[:best], col[:best]] = True
        return kept

    @property
    def _sized_budget(self) -> bool:
        """Whether drafts are cut by :meth:`_select` (the measured budget,
        once drafts' costs are measured; until then ``_paying`` probes)."""
        return (self.config.budget == "measured" and self.cost.ready
                and self.cost.draft_costs_known)

    def _any_tree_may_pay(self, threshold: float, n_requests: int) -> bool:
        """Whether ``_paying`` could keep any tree this step: a tree holds
        each node class at most once, so its net gain is at most the sum of
        the classes' positive margins. Where even that does not cover a
        tree's or a step's fixed cost, the layout is not built (measured:
        ~1 ms a step at batch 16 that the budget then discarded)."""
        if (self.config.budget != "measured" or not self.cost.ready
                or self.cost.draft_costs_known):
            return True
        best = np.maximum(self.values.rate() - threshold, 0.0).sum()
        best -= self._scale * self.cost.tree_cost_tokens(n_requests)
        return (best > 0 and n_requests * best
                >= self._scale * self.cost.fixed_cost_tokens(n_requests))

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None) -> list[list[int]]:
        """vLLM's custom-class entry point; with this package's plugin the
        model runner calls :meth:`draft` instead."""
        return self.draft(DraftInputs(sampled_token_ids, num_tokens_no_spec,
                                      token_ids_cpu)).tokens

    def draft(self, inputs: DraftInputs) -> Drafts:
        req_ids = self._batch_req_ids
        if req_ids is None or len(req_ids) != len(inputs.sampled_token_ids):
            raise RuntimeError(
                "LookaheadProposer.draft called without the batch's request ids; the "
                "vllm_lookahead patch of GPUModelRunner is not active")
        self._batch_req_ids = None
        started = time.perf_counter()
        step = self.timer.observe(sum(len(sampled) for sampled in inputs.sampled_token_ids))
        # Credited to the scale _bar chose for that step, if it chose one.
        self.tuner.observe(step.realized_ratio(self.cost) if step is not None else None)
        if not self._drafted_tokens:  # the last step verified nothing
            self.values.age()
            self.chain_values.age()
        drafts = self._propose(req_ids, inputs.sampled_token_ids, inputs.num_tokens,
                               inputs.token_ids)
        self._drafted_tokens = sum(len(d) for d in drafts.tokens)
        self.timer.drafted(self._drafted_tokens, sum(1 for d in drafts.tokens if d))
        self._proposer_seconds += time.perf_counter() - started
        self._steps += 1
        if self._steps % STATS_EVERY_STEPS == 0:
            self._log_stats()
        return drafts

    def _propose(self, req_ids, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> Drafts:
        drafts = Drafts.empty(len(sampled_token_ids))
        rows = [
            i
            for i, sampled in enumerate(sampled_token_ids)
            if sampled and num_tokens_no_spec[i] < self.max_model_len
        ]
        if not rows:
            return drafts
        row_req_ids = [req_ids[i] for i in rows]
        lengths = num_tokens_no_spec[rows].astype(np.int64)
        keep = [i for i, r in enumerate(row_req_ids)
                if not self._overrides.get(r, {}).get("disable", False)]
        rows = [rows[i] for i in keep]
        row_req_ids = [row_req_ids[i] for i in keep]
        lengths = lengths[keep]
        if not rows:
            return drafts
        if self.shared_text is not None:
            for req_id, row, n in zip(row_req_ids, rows, lengths):
                self._texts[req_id] = token_ids_cpu[row, :n].copy()
        if self._batch_trees:
            trees = self._propose_trees(row_req_ids, rows, lengths, token_ids_cpu)
            for row, (tokens, parents) in zip(rows, trees):
                drafts.tokens[row], drafts.parents[row] = tokens, parents
            return drafts

        budget = np.minimum(
            self._draft_budget(row_req_ids, sampled_token_ids, rows),
            self.max_model_len - lengths,
        )
        threshold = self._bar(len(rows))
        # Chain depths that pay (a prefix).
        budget = np.minimum(budget, np.cumprod(self.chain_values.estimate() >= threshold).sum())
        self._last_draft.update((r, 0) for r in row_req_ids)
        if not budget.max(initial=0):
            return drafts
        self._index_new_tokens(row_req_ids, rows, lengths, token_ids_cpu)
        chains = self._extend_chains(row_req_ids, rows, lengths, token_ids_cpu, budget)
        depths = np.broadcast_to(np.arange(self.k), (len(rows), self.k))
        lengths = np.array([len(c) for c in chains])
        if self._sized_budget:
            chain_parents = np.broadcast_to(np.arange(self.k) - 1, (len(rows), self.k))
            lengths = self._select(self.chain_values.rate()[depths], chain_parents, lengths,
                                   len(rows)).sum(axis=1)
            kept = np.nonzero(lengths)[0]
        else:
            kept = self._paying(self.chain_values, depths, lengths, threshold, len(rows))
        for i in kept:
            drafts.tokens[rows[i]] = chains[i][:lengths[i]]
            self._last_draft[row_req_ids[i]] = int(lengths[i])
        return drafts

    def _index_new_tokens(self, req_ids, rows, lengths, token_ids_cpu) -> None:
        """Inserts into each request's pool the n-grams of the tokens it
        gained since its last indexing. Called only on steps that may draft,
        so an engine whose budget drafts nothing does no pool work; the next
        drafting step catches up in one span per request."""
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
                if not self.config.pool_from_prompt and self.config.mode == "tree":
                    indexed = min(int(lengths[i]), self._prompt_lens.get(req_id, 0))
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

    def _pool_keys(self, rows, lengths, token_ids_cpu) -> np.ndarray:
        """int32 [len(rows), key_len]: each row's last ``key_len`` tokens,
        left-padded with -1 where the row is shorter."""
        key_len = self.config.key_len
        keys = np.full((len(rows), key_len), -1, dtype=np.int32)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            take = min(key_len, int(n))
            keys[i, key_len - take:] = token_ids_cpu[row, n - take:n]
        return keys

    def _extend_chains(self, req_ids, rows, lengths, token_ids_cpu, budget):
        key_len = self.config.key_len
        n = len(rows)
        # Context tail (the key) followed by the chain grown so far.
        width = key_len + int(budget.max(initial=0)) + self.pool.cont_len
        tail = np.full((n, width), -1, dtype=np.int32)
        tail[:, :key_len] = self._pool_keys(rows, lengths, token_ids_cpu)
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

    # ------------------------------------------------------------------
    # Tree mode.

    def _propose_trees(self, req_ids, rows, lengths,
                       token_ids_cpu) -> list[tuple[list[int], list[int] | None]]:
        """One token tree per request: (tokens, parents), ([], None) for no
        tree. Nodes are kept where they pay (``budget.py``):
        window columns whose estimated acceptance covers their nodes' cost,
        candidates cut at the first depth that does not; then the hard caps
        (``max_tree_tokens`` over the batch, num_speculative_tokens and
        max_model_len per request) apply."""
        cfg = self.config
        levels = cfg.ngram - 1
        cont_len = self.pool.cont_len
        per_request = self.k
        if cfg.max_tree_tokens:
            per_request = min(per_request, cfg.max_tree_tokens // max(1, len(rows)))
        threshold = self._bar(len(rows))
        value = self.values.estimate()
        no_tree: tuple[list[int], list[int] | None] = ([], None)
        if value.max() < threshold or not self._any_tree_may_pay(threshold, len(rows)):
            return [no_tree] * len(req_ids)
        self._index_new_tokens(req_ids, rows, lengths, token_ids_cpu)
        column_value = value[:levels * cfg.window].reshape(levels, cfg.window)
        recycled_start = levels * cfg.window + MAX_RANKS * levels
        candidate_value = value[levels * cfg.window:recycled_start].reshape(
            MAX_RANKS, levels)[:, :cont_len]
        keys = self._pool_keys(rows, lengths, token_ids_cpu)
        overrides = [self._overrides.get(req_id, {}) for req_id in req_ids]
        max_guesses = max([cfg.guesses] + [o.get("guesses", 0) for o in overrides])
        candidates, counts = self.pool.lookup(req_ids, torch.from_numpy(keys), max_guesses)
        self._stats[3] += len(rows)
        self._stats[4] += int((counts > 0).sum())
        windows = [self._window(req_id, token_ids_cpu[row, :n])
                   for req_id, row, n in zip(req_ids, rows, lengths)]
        filled = np.array([window.filled for window in windows], dtype=np.int32)
        # Window columns that pay (a prefix), for each number of filled levels.
        column_pays = (np.cumsum(column_value, axis=0)
                       >= threshold * np.arange(1, levels + 1)[:, None])
        paying_columns = np.concatenate([[0], np.cumprod(column_pays, axis=1).sum(axis=1)])
        columns = np.minimum([min(o.get("window", cfg.window), cfg.window) for o in overrides],
                             paying_columns[filled])
        # Depths of each candidate rank that pay (a prefix), offered up to the
        # request's guesses.
        depth_pays = np.cumprod(candidate_value >= threshold, axis=1).sum(axis=1)
        ranks = np.arange(max_guesses)
        guesses = np.minimum(counts.numpy(), [o.get("guesses", cfg.guesses) for o in overrides])
        candidate_lens = np.where(ranks < guesses[:, None],
                                  depth_pays[np.minimum(ranks, MAX_RANKS - 1)], 0)
        caps = np.clip(self.max_model_len - lengths, 0, per_request)
        recycled, match_sources, match_sizes = self._recycled_trees(
            rows, lengths, token_ids_cpu, value, recycled_start, threshold)
        layout = ops.lookahead_tree_layout(
            _int32(np.stack([window.levels for window in windows])), _int32(filled),
            _int32(columns), candidates, _int32(candidate_lens), _int32(caps), MAX_RANKS,
            recycled, _int32(self.template_parents))
        tokens, parents, classes, num_nodes, used_columns = (t.numpy() for t in layout)
        classes = self._chain_node_classes(classes, recycled_start, match_sources, match_sizes)
        trees = [no_tree] * len(req_ids)
        if self._sized_budget:
            kept = self._select(self.values.rate()[classes], parents, num_nodes, len(rows))
            for i in np.nonzero(kept.any(axis=1))[0]:
                nodes = np.nonzero(kept[i])[0]  # in layout order: parents first
                index = np.full(len(kept[i]) + 1, -1, dtype=np.int64)
                index[nodes] = np.arange(len(nodes))
                window = int(used_columns[i]) * int(filled[i])
                # A window cut short is not advanced (as if trimmed by the scheduler).
                w = int(used_columns[i]) if kept[i, :window].all() else 0
                trees[i] = (tokens[i, nodes].tolist(), index[parents[i, nodes]].tolist())
                self._layouts[req_ids[i]] = (w, int(filled[i]), classes[i, nodes])
                self._stats[0] += 1
                self._stats[1] += len(nodes)
            return trees
        drafting = self._paying(self.values, classes, num_nodes, threshold, len(rows))
        for i in drafting:
            n = num_nodes[i]
            trees[i] = (tokens[i, :n].tolist(), parents[i, :n].tolist())
            self._layouts[req_ids[i]] = (int(used_columns[i]), int(filled[i]), classes[i, :n])
        self._stats[0] += len(drafting)
        self._stats[1] += int(num_nodes[drafting].sum())
        return trees

    def _chain_class(self, sources: np.ndarray, sizes: np.ndarray,
                     depths: np.ndarray) -> np.ndarray:
        """Class of the chain node at ``depths`` (0-based) after a context
        match of ``sizes`` tokens (>= 1) in the request's own text (source
        0) or the shared text (1)."""
        return (self._chain_classes
                + (sources * CHAIN_MAX_NGRAM + sizes - 1) * self.config.chain + depths)

    def _recycled_trees(self, rows, lengths, token_ids_cpu, value: np.ndarray,
                        recycled_start: int,
                        threshold: float) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """int32 [len(rows), T]: the template read from each row's last
        token (recycled nodes) and its context-match chain (chain nodes:
        from the request's own text, or from the shared text where that
        matches more of its last tokens); nodes whose class's estimated
        acceptance (``value``, all classes; template node j's class is
        ``recycled_start + j``, a chain node's by its source, match length
        and depth) is below the bar are disabled, and with them their
        subtrees. Also each row's chain source and match length (0: no
        chain)."""
        enabled = value[recycled_start:recycled_start + len(self.template_parents)] >= threshold
        is_chain = self.template_chain >= 0
        if self.successors is not None:
            roots = token_ids_cpu[rows, lengths - 1]
            ranks = np.where(enabled & ~is_chain, self.template_ranks, -1)
            trees = self.successors.trees(roots, self.template_parents, ranks)
        else:
            trees = torch.full((len(rows), len(self.template_parents)), -1, dtype=torch.int32)
        sources = np.zeros(len(rows), dtype=np.int64)
        sizes = np.zeros(len(rows), dtype=np.int64)
        if is_chain.any():
            slots = np.nonzero(is_chain)[0]  # in depth order
            depths = self.template_chain[slots]
            contexts = [token_ids_cpu[row, :n] for row, n in zip(rows, lengths)]
            chains, sizes = chain_tokens(contexts, int(depths.max()) + 1)
            if self.shared_text is not None:
                for i in np.flatnonzero(sizes < CHAIN_MAX_NGRAM):
                    chain, size = self.shared_text.match(contexts[i], chains.shape[1])
                    if size > sizes[i]:
                        chains[i], sizes[i], sources[i] = chain, size, 1
            matched = sizes > 0
            classes = self._chain_class(sources[:, None], np.maximum(sizes, 1)[:, None],
                                        depths[None, :])
            on = np.cumprod(value[classes] >= threshold, axis=1).astype(bool) & matched[:, None]
            trees[:, slots] = torch.from_numpy(np.where(on, chains[:, depths], -1).astype(np.int32))
        return trees, sources, sizes

    def _chain_node_classes(self, classes: np.ndarray, recycled_start: int,
                            match_sources: np.ndarray, match_sizes: np.ndarray) -> np.ndarray:
        """The layout's classes [rows, width] with each chain node's template
        class replaced by its class by source, match length and depth."""
        template = len(self.template_parents)
        if not (self.template_chain >= 0).any():
            return classes
        slot = classes - recycled_start
        in_template = (slot >= 0) & (slot < template)
        depth = np.where(in_template, self.template_chain[np.clip(slot, 0, template - 1)], -1)
        chain = depth >= 0
        if not chain.any():
            return classes
        sizes = np.maximum(match_sizes, 1)[:, None]
        return np.where(chain, self._chain_class(match_sources[:, None], sizes,
                                                 np.maximum(depth, 0)), classes)

    def observe_predictions(self, predictions: Predictions) -> None:
        """A step without trees: its rows' top-k go into the successor
        table."""
        if self.successors is not None:
            started = time.perf_counter()
            self.successors.update(predictions.input_tokens, predictions.topk)
            self._proposer_seconds += time.perf_counter() - started

    def _window(self, req_id: str, context: np.ndarray) -> JacobiWindow:
        """The request's Jacobi window, initialised from its context on
        first use."""
        window = self._windows.get(req_id)
        if window is None:
            window = self._windows[req_id] = JacobiWindow.from_context(
                context, self.config.ngram - 1, self.config.window)
        return window

    def observe_verification(self, verification: Verification) -> None:
        """After each tree step: the target's argmax at the deepest window
        level becomes the window's new level (each column completing one
        n-gram for the pool), and the offered and accepted node classes feed
        the acceptance estimates."""
        started = time.perf_counter()
        v = verification
        self._stats[2] += int(v.accepted.sum())
        p = v.predictions
        if p is not None and self.successors is not None:
            # Every row, then the verified text's rows again: where a token
            # was both, the prediction in the real context wins.
            rows = np.concatenate([np.arange(len(p.input_tokens)), v.accepted_rows()])
            self.successors.update(p.input_tokens[rows], p.topk[rows])
        grown, ngrams, offered, taken = [], [], [], []
        for i, req_id in enumerate(v.req_ids):
            layout = self._layouts.pop(req_id, None)
            window = self._windows.get(req_id)
            if layout is None or window is None:
                continue
            w, filled, classes = layout
            node_argmax = v.node_argmax(i)
            offered.append(classes[:len(node_argmax)])
            taken.append(classes[v.accepted_path(i)])
            deepest = (filled - 1) * w
            # Trimmed by the scheduler, or the window moved on: no update.
            if w == 0 or deepest + w > len(node_argmax) or filled != window.filled:
                continue
            completed = window.advance(node_argmax[deepest:deepest + w].astype(np.int32))
            if completed is not None:
                grown += [req_id] * len(completed)
                ngrams.append(completed)
        if ngrams:
            self.pool.insert_ngrams(grown, torch.from_numpy(np.concatenate(ngrams)))
        if offered:
            self.values.update(np.concatenate(offered),
                               np.concatenate(taken) if taken else np.zeros(0, np.int64))
        self._proposer_seconds += time.perf_counter() - started

    def _log_stats(self) -> None:
        trees, nodes, accepted_total, lookups, hits = self._stats.tolist()
        logger.info(
            "vllm_lookahead: %d steps, %d with trees: %.1f nodes and %.2f accepted "
            "tokens per tree (tokens per target forward: %.2f), pool hit rate "
            "%.0f%%; budget: node cost %.2f ms, tree cost %.2f ms, tree-step cost %.2f ms, host "
            "overhead %.1f ms/step, %.1f tok/s, acceptance threshold %.2f (bar scale %.2g); "
            "proposer %.1f%% of step time",
            self._steps, trees, nodes / max(trees, 1), accepted_total / max(trees, 1),
            1 + accepted_total / max(trees, 1), 100 * hits / max(lookups, 1),
            1e3 * self.cost.node_seconds, 1e3 * self.cost.tree_seconds,
            1e3 * self.cost.tree_step_seconds,
            1e3 * self.cost.overhead_seconds,
            self.cost.tokens_per_second, self._threshold, self._scale,
            100 * self._proposer_seconds / max(self.timer.step_seconds, 1e-9))
