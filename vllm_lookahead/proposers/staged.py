"""Staged draft cascade (Staged speculative decoding, arXiv 2308.04623).

A small draft model, loaded and given its own paged KV cache by vLLM's
``draft_model`` machinery, proposes a token tree per request; the draft is
itself sped up by a second, almost free stage.

- Stage 1, tree: the draft's greedy chain c_1..c_L plus, at each depth j,
  the alternatives among its ``children`` likeliest tokens. Every candidate
  node is scored by its probability under the draft of being on the target's
  path (the chain prefix's product of top-1 probabilities times the node's
  own), and the ``num_speculative_tokens`` best are kept: a single child
  where the draft is confident, several where it is not. Alternatives are
  leaves; the chain is laid out first, so an accepted chain prefix is
  already in place in the KV cache (the tree runtime compacts the rest).
- Stage 2, draft acceleration: each draft forward feeds, after the chain's
  last token, a guess of the chain's continuation from an n-gram pool (fed
  with the request's tokens and the draft's own earlier chains) and keeps the
  guessed tokens that equal the draft's argmax, so one forward can extend the
  chain by several tokens. The chain is exactly the draft's greedy chain with
  or without stage 2; only the number of draft forwards changes.

Measured budget (``budget: "measured"``, the default): the target's step
time and the draft's forward time are fitted online (``budget.py``), and a
draft node's acceptance is estimated from its draft probability, calibrated
on the verified steps. A step drafts only if the first draft round can pay
for itself; each further round runs for the requests whose chain may still
be accepted often enough to pay for a node, and only while their nodes are
worth more than the round costs; a node is verified only where its
estimated acceptance beats the tokens the engine would produce in the time
it costs. So a loaded engine drafts short chains, or none.

Drafts are deterministic (the draft's top tokens), so the tree runtime's
sample-and-match verification is lossless for sampled requests without the
draft's probabilities; batches the runtime cannot verify get the chain
alone, verified by vLLM's rejection sampler.

The draft model's KV holds each request's tokens up to where they were last
fed; a request's fed tokens are compared with its verified tokens every
step, and the draft re-reads from the first difference. This module sees
no vLLM internals: the draft forward comes from ``vllm_lookahead.patches``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from vllm_lookahead.config import StagedConfig
from vllm_lookahead.proposers.budget import (COUNT_DECAY, PROBE_DRAFTS, REPROBE_STEPS,
                                             SCORE_EDGES, DecayedMean, DraftCostModel,
                                             ScoreCalibration, StepCostModel, StepTimer)
from vllm_lookahead.proposers.pool import NgramPool
from vllm_lookahead.tree.protocol import (BatchInfo, DraftForward, DraftInputs, Drafts,
                                          Predictions, Verification)

logger = logging.getLogger(__name__)

STATS_EVERY_STEPS = int(os.environ.get("VLLM_LOOKAHEAD_LOG_EVERY", "500"))
# Longest span of unread tokens the draft reads in one forward per request.
PREFILL_CHUNK = 512
# Unread tokens of a request that drafts every step (its last token and a
# rejected node's place); a longer span (a prompt, drafting paused) is read
# only where the request's remaining tokens pay for it (measured budget).
USUAL_UNREAD = 2
# Draft forwards over at least this many tokens time the draft's reading
# of a span (its prefill rate, not its per-round cost).
READ_SPAN = 32
# Most nodes of a stage-2 guess tree.
GUESS_NODES = 16


class _Chain:
    """One request's greedy chain under construction."""

    def __init__(self, row: int, length: int, capacity: int, max_len: int):
        self.row = row
        self.length = length  # verified tokens n; the chain starts at position n
        self.capacity = capacity  # positions with KV slots
        self.max_len = max_len  # chain tokens allowed by max_model_len and k
        self.tokens: list[int] = []
        self.top_tokens: list[np.ndarray] = []  # per depth: the draft's top tokens
        self.top_probs: list[np.ndarray] = []
        self.path_prob = 1.0  # draft probability of the whole chain
        self.scores: list[float] = []  # alternatives' scores so far
        self.done = False

    def extend(self, tokens: np.ndarray, probs: np.ndarray) -> None:
        for top, p in zip(tokens, probs):
            self.scores.extend((self.path_prob * p[1:]).tolist())
            self.tokens.append(int(top[0]))
            self.top_tokens.append(top)
            self.top_probs.append(p)
            self.path_prob *= float(p[0])


class _Guess:
    """A stage-2 guess of the draft's chain past a row's fed tokens: a trie
    of candidate continuations, parent-first, the first candidate's nodes
    first (so a chain is its own flat order)."""

    def __init__(self, candidates: list[tuple[int, np.ndarray]], limit: int):
        tokens: list[int] = []
        parents: list[int] = []
        self._child: dict[tuple[int, int], int] = {}
        self.branches: list[tuple[int, list[int]]] = []  # (source, nodes) per candidate
        for source, candidate in candidates:
            node, nodes = -1, []
            for token in candidate.tolist():
                child = self._child.get((node, token))
                if child is None:
                    if len(tokens) >= limit:
                        break
                    child = self._child[(node, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                nodes.append(child)
                node = child
            if nodes:
                self.branches.append((source, nodes))
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.parents = np.asarray(parents, dtype=np.int32)
        self.is_chain = bool((self.parents == np.arange(-1, len(tokens) - 1)).all())

    def walk(self, predicted: np.ndarray) -> list[int]:
        """The nodes the draft's greedy tokens follow: ``predicted[0]`` its
        token after the fed ones, ``predicted[1 + i]`` after node i."""
        node, path = -1, []
        while True:
            child = self._child.get((node, int(predicted[0 if node < 0 else 1 + node])))
            if child is None:
                return path
            path.append(child)
            node = child

    def branch_of(self, path: list[int]) -> tuple[int, list[int]] | None:
        """The first candidate that holds ``path`` (or the first one)."""
        for source, nodes in self.branches:
            if nodes[:len(path)] == path:
                return source, nodes
        return self.branches[0] if self.branches else None

    def found(self, path: list[int]) -> dict[int, int]:
        """Per source that guessed: the most chain tokens one of its
        candidates found."""
        out: dict[int, int] = {}
        for source, nodes in self.branches:
            match = int(np.cumprod(np.asarray(nodes[:len(path)]) == path[:len(nodes)]).sum()
                        ) if path else 0
            out[source] = max(out.get(source, 0), match)
        return out


def _top_tokens(logits: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the argmax (vLLM's greedy token) and the next n - 1 likeliest
    tokens, with their probabilities, [rows, n] each."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    top_p, top_t = probs.topk(n, dim=-1)
    # On a tie topk may rank another token first: put the argmax there.
    swap = top_t[:, 0] != greedy
    if bool(swap.any()):
        rows = torch.nonzero(swap).flatten()
        for r in rows.tolist():
            others = [t for t in top_t[r].tolist() if t != int(greedy[r])][:n - 1]
            top_t[r] = torch.tensor([int(greedy[r])] + others)
            top_p[r] = probs[r, top_t[r]]
    return top_t.cpu().numpy(), top_p.cpu().numpy()


class StagedDrafter:
    """Builds the drafts (trees or chains) of every request of a step; a
    ``tree.protocol.TreeDrafter``."""

    def __init__(self, config: StagedConfig, num_speculative_tokens: int,
                 max_model_len: int, max_num_seqs: int, vocab_size: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.config = config
        self.k = num_speculative_tokens
        self.depth = min(config.depth or self.k, self.k)
        self.children = config.children if config.tree else 1
        self.max_model_len = max_model_len
        self.pool = NgramPool(
            max_requests=max_num_seqs, vocab_size=vocab_size, ngram=config.ngram,
            key_len=config.key_len, capacity=config.capacity, buckets=config.buckets,
            ways=config.ways) if config.stage2 != "off" else None
        # Stage 2 as lookahead decoding: Jacobi guesses besides the pool's,
        # in one guess tree per draft forward where the draft takes trees
        # (the model runner clears ``wants_draft_trees`` where it cannot).
        self.jacobi = config.stage2 == "lookahead"
        self.wants_draft_trees = self.jacobi
        # Per request: positions whose draft KV holds the verified tokens,
        # and the tokens fed after them (verified or not).
        self._valid: dict[str, int] = {}
        # Requests with extra_args={"staged": {"disable": True}}; and those
        # whose bad "staged" extra_args were warned about.
        self._disabled: set[str] = set()
        self._warned: set[str] = set()
        self._fed: dict[str, np.ndarray] = {}
        # Per request: the draft's last predictions past its verified tokens
        # (first position, tokens, how many of them are its greedy chain):
        # the next step's Jacobi guess.
        self._leftover: dict[str, tuple[int, np.ndarray, int]] = {}
        # Chain tokens found per guess, by source (pool, Jacobi): the
        # likelier source guesses where both have one.
        self.guess_yield = DecayedMean(np.ones(2))
        self._indexed: dict[str, int] = {}
        self._batch_req_ids: list[str] | None = None
        self._batch_trees = False
        self._max_tokens: list[int | None] = []
        self._prompt_lens: list[int] = []
        # Measured budget: the target's step time, the draft's forward time,
        # acceptance by draft probability; each request's last draft
        # (tokens, parents, node scores) to calibrate it.
        self.measured = config.budget == "measured"
        self.clock = clock
        self.cost = StepCostModel()
        self.timer = StepTimer(self.cost, clock)
        self.draft_cost = DraftCostModel()
        self.calibration = ScoreCalibration()
        self._last: dict[str, tuple[list[int], list[int], np.ndarray]] = {}
        self._bar = 0.0  # acceptance bar of the last step
        self._since_forward = 0  # steps with decoding rows but no draft forward
        # What a drafting request yields per step: accepted tokens, nodes,
        # and the step's draft rounds (a first round's worth until measured).
        self.yields = DecayedMean(np.ones(3))
        # Decayed seconds and tokens of the draft's forwards over long spans.
        self._reads = np.zeros(2)
        # steps, drafting requests, draft forwards, chain tokens, nodes,
        # chain tokens found by stage-2 guesses, steps with a draft, rows
        # whose unread span was not worth reading, chain tokens found by
        # Jacobi guesses (of those of stage 2), draft forwards that verified
        # a guess tree
        self.counters = np.zeros(10, dtype=np.int64)
        # Seconds in draft forwards, and in the whole of ``draft``.
        self.seconds = np.zeros(2)

    # ------------------------------------------------------------------
    # Batch bookkeeping.

    def bind_batch(self, batch: BatchInfo) -> None:
        """Row -> request map of the coming ``draft``, and whether the tree
        runtime verifies this batch. State of requests that left the batch is
        dropped; one that comes back is re-read from its first token."""
        self.timer.batch_bound(batch.scheduled_tokens, batch.prefill_tokens)
        self._batch_req_ids = list(batch.req_ids)
        self._batch_trees = batch.trees_verified and self.config.tree
        self._max_tokens = batch.max_tokens or [None] * len(batch.req_ids)
        self._prompt_lens = batch.prompt_lens
        self._disabled = {r for r, extra in zip(batch.req_ids, batch.extra_args)
                          if self._disables(r, extra)}
        present = set(batch.req_ids)
        self._warned &= present
        for req_id in [r for r in self._valid if r not in present]:
            self._drop(req_id)

    def _disables(self, req_id: str, extra_args: dict[str, Any] | None) -> bool:
        """Whether the request turned drafting off with
        ``extra_args={"staged": {"disable": True}}`` (or, as the OpenAI
        server's flat ``vllm_xargs`` allow, ``{"staged_disable": 1}``);
        anything else there is ignored with one warning (raising would stop
        the engine for every request)."""
        extra_args = extra_args or {}
        if "staged_disable" in extra_args:
            value = extra_args["staged_disable"]
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
        elif "staged" in extra_args:
            value = extra_args["staged"]
            if (isinstance(value, dict) and set(value) <= {"disable"}
                    and isinstance(value.get("disable", False), bool)):
                return value.get("disable", False)
        else:
            return False
        if req_id not in self._warned:
            self._warned.add(req_id)
            logger.warning("vllm_lookahead: request %s: ignoring extra_args %r (the cascade "
                           "takes {'staged': {'disable': bool}} or {'staged_disable': 0 or 1})",
                           req_id, extra_args)
        return False

    def _drop(self, req_id: str) -> None:
        self._valid.pop(req_id, None)
        self._fed.pop(req_id, None)
        self._leftover.pop(req_id, None)
        self._last.pop(req_id, None)
        if self._indexed.pop(req_id, None) is not None:
            self.pool.erase(req_id)

    def _resume_point(self, req_id: str, history: np.ndarray) -> int:
        """First position whose draft KV does not hold ``history``'s token
        (at most the last position: its logits start the chain)."""
        fed = self._fed.get(req_id, np.zeros(0, dtype=np.int64))
        valid = min(self._valid.get(req_id, 0), len(fed), len(history) - 1)
        end = min(len(fed), len(history) - 1)
        same = fed[valid:end] == history[valid:end]
        return valid + int(np.cumprod(same).sum())

    def _record_fed(self, req_id: str, start: int, tokens: np.ndarray) -> None:
        """The draft's KV now holds ``tokens`` from position ``start`` (on
        top of the tokens fed before it)."""
        fed = self._fed.get(req_id, np.zeros(0, dtype=np.int64))
        self._fed[req_id] = np.concatenate([fed[:start], tokens])

    # ------------------------------------------------------------------
    # Stage 2: the pool.

    def _index(self, req_ids: list[str], spans: list[np.ndarray]) -> None:
        """Add the n-grams of each span to its request's pool."""
        todo = [i for i, s in enumerate(spans) if len(s) >= self.config.ngram]
        if not todo:
            return
        width = max(len(spans[i]) for i in todo)
        tokens = np.full((len(todo), width), 0, dtype=np.int32)
        for j, i in enumerate(todo):
            tokens[j, :len(spans[i])] = spans[i]
        self.pool.insert_spans([req_ids[i] for i in todo], torch.from_numpy(tokens),
                               np.arange(len(todo)), np.zeros(len(todo), np.int64),
                               np.asarray([len(spans[i]) for i in todo]))

    def _guesses(self, req_ids: list[str], tails: list[np.ndarray], room: np.ndarray,
                 n: int = 1) -> list[list[np.ndarray]]:
        """The pool's continuations of each tail (its last key_len tokens),
        at most ``n`` of them (most recent first), ``room`` tokens each."""
        if self.pool is None or not len(req_ids):
            return [[] for _ in req_ids]
        key_len = self.config.key_len
        keys = np.full((len(tails), key_len), -1, dtype=np.int32)
        for i, tail in enumerate(tails):
            take = min(key_len, len(tail))
            keys[i, key_len - take:] = tail[len(tail) - take:]
        out, counts = self.pool.lookup(req_ids, torch.from_numpy(keys), n)
        out, counts = out.numpy(), counts.numpy()
        return [[out[i, g, :max(0, int(room[i]))].astype(np.int64)
                 for g in range(int(counts[i]))] for i in range(len(req_ids))]

    def _jacobi_guess(self, req_id: str, history: np.ndarray) -> tuple[np.ndarray, bool]:
        """The draft's predictions from its last forwards for the positions
        past ``history`` (Jacobi iteration: predictions made past a token
        that turned out wrong, or past the nodes the target was not given,
        are the next guess), and whether they continue the very chain the
        target accepted (its tokens are then the draft's greedy chain, not
        a guess: the target verified fewer nodes than the draft found)."""
        empty = np.zeros(0, dtype=np.int64)
        start, tokens, chain = self._leftover.get(req_id, (len(history), empty, 0))
        ahead = len(history) - start
        if ahead < 0:
            return empty, False
        return tokens[ahead:], bool(ahead < chain
                                    and (tokens[:ahead] == history[start:]).all())

    def _guess(self, pool: list[np.ndarray], jacobi: np.ndarray, exact: bool, tree: bool,
               limit: int) -> _Guess:
        """What a draft forward verifies past a row's fed tokens, at most
        ``limit`` nodes: the draft's own chain where the Jacobi guess is
        ``exact``; else with a guess ``tree``, the Jacobi guess and the
        pool's continuations merged into one trie, the likelier source's
        first (laid out first: where it is the chain, its KV is in place);
        else one chain, the source that found more chain tokens per guess
        lately (pool 0, Jacobi 1)."""
        jacobi_first = len(jacobi) and (exact or not pool or self.guess_yield.value[1]
                                        > self.guess_yield.value[0])
        if exact and len(jacobi):
            candidates = [(1, jacobi)]
        elif tree:
            candidates = [(0, p) for p in pool]
            if len(jacobi):
                candidates.insert(0 if jacobi_first else len(candidates), (1, jacobi))
        elif jacobi_first:
            candidates = [(1, jacobi)]
        else:
            candidates = [(0, pool[0])] if pool else []
        return _Guess(candidates, limit)

    # ------------------------------------------------------------------
    # Drafting.

    def step_started(self) -> None:
        """A target forward starts (budget timing)."""
        self.timer.forward_started()

    # The target's top-k per logits row is not used.
    prediction_ranks = 0

    def observe_predictions(self, predictions: Predictions) -> None:
        """Not used (``prediction_ranks`` 0)."""

    def observe_verification(self, verification: Verification) -> None:
        """The draft's own state follows the verified tokens (``draft``)."""

    def draft(self, inputs: DraftInputs) -> Drafts:
        """Drafts for every batch row (empty for rows in prefill):
        ``inputs.num_tokens[row]`` verified tokens of each row are in
        ``inputs.token_ids[row]``; ``inputs.draft_model`` has KV slots for
        ``kv_capacity[row]`` positions."""
        if inputs.draft_model is None:
            raise RuntimeError("the staged drafter needs vLLM's draft model")
        sampled_token_ids, num_tokens, token_ids = (
            inputs.sampled_token_ids, inputs.num_tokens, inputs.token_ids)
        capacity, forward = inputs.draft_model.kv_capacity, inputs.draft_model.forward
        req_ids = self._batch_req_ids
        if req_ids is None or len(req_ids) != len(sampled_token_ids):
            raise RuntimeError(
                "staged drafter called without the batch's request ids; the "
                "vllm_lookahead patch of GPUModelRunner is not active")
        self._batch_req_ids = None
        started = self.clock()
        try:
            return self._draft(req_ids, sampled_token_ids, num_tokens, token_ids, capacity,
                               forward, self.wants_draft_trees and inputs.draft_model.trees)
        finally:
            self.seconds[1] += self.clock() - started

    def _draft(self, req_ids, sampled_token_ids, num_tokens, token_ids, capacity,
               forward: DraftForward, trees: bool) -> Drafts:
        self.timer.observe(sum(len(s) for s in sampled_token_ids))
        self._calibrate(req_ids, sampled_token_ids)
        drafts = Drafts.empty(len(sampled_token_ids))
        decoding = sum(1 for s in sampled_token_ids if s)
        # Rows out of prefill, below max_model_len, with a KV slot for their
        # last token.
        rows = [r for r, s in enumerate(sampled_token_ids)
                if s and num_tokens[r] < self.max_model_len
                and capacity[r] >= num_tokens[r] and req_ids[r] not in self._disabled]
        if rows:
            self.counters[0] += 1
            if self.counters[0] % STATS_EVERY_STEPS == 0:
                self._log_stats()
        # A node's bar at the nodes the step's trees are expected to hold
        # (past the target's knee, each costs a prompt token's compute).
        self._bar = (self.cost.threshold(decoding, round(len(rows) * self.cost.nodes_per_tree))
                     if self.measured else 0.0)
        if self.measured:
            rows = self._worth_reading(req_ids, rows, num_tokens, token_ids, decoding)
            rows = self._first_round_pays(rows, decoding)
            self._since_forward = 0 if rows else self._since_forward + bool(decoding)
            if self._since_forward >= REPROBE_STEPS:
                self.draft_cost.forget()
                self._since_forward = 0
        if not rows:
            self.timer.drafted(0, 0)
            return drafts
        chains = self._chains(req_ids, rows, num_tokens, token_ids, capacity, forward,
                              decoding, trees)
        layouts = [self._layout(chain) for chain in chains]
        for i in self._paying(layouts, decoding):
            tokens, parents, scores = layouts[i]
            row = chains[i].row
            drafts.tokens[row] = tokens
            if self._batch_trees and parents != list(range(-1, len(tokens) - 1)):
                drafts.parents[row] = parents
            if self.measured:
                self._last[req_ids[row]] = (tokens, parents, scores)
            self.counters[4] += len(tokens)
        self.counters[1] += len(rows)
        self.counters[3] += sum(len(c.tokens) for c in chains)
        drafted = [t for t in drafts.tokens if t]
        self.counters[6] += bool(drafted)
        self.yields.update(1, sum(map(len, drafted)), len(drafted))
        self.timer.drafted(sum(map(len, drafted)), len(drafted))
        return drafts

    # ------------------------------------------------------------------
    # Measured budget.

    def _calibrate(self, req_ids: list[str], sampled_token_ids: list[list[int]]) -> None:
        """Count each request's last draft nodes and the accepted ones (the
        path of the tokens the step accepted, read from vLLM's sampled
        tokens: the accepted draft tokens and one more) by draft
        probability. Called every step, so counts of probabilities no
        longer drafted fade and are tried again."""
        if not self.measured:
            return
        offered, accepted = [], []
        for req_id, sampled in zip(req_ids, sampled_token_ids):
            last = self._last.pop(req_id, None)
            if last is None or not sampled:
                continue
            tokens, parents, scores = last
            node, path = -1, []
            for token in sampled[:-1]:
                node = next((i for i in range(node + 1, len(tokens))
                             if parents[i] == node and tokens[i] == token), None)
                if node is None:
                    break
                path.append(node)
            offered.append(scores)
            accepted.append(scores[path])
        self.yields.update(0, sum(map(len, accepted)), len(accepted))
        classes = ScoreCalibration.classes
        self.calibration.update(
            classes(np.concatenate(offered)) if offered else np.zeros(0, np.int64),
            classes(np.concatenate(accepted)) if accepted else np.zeros(0, np.int64))

    def _round_cost(self, tokens: int, decoding: int) -> float:
        """A draft forward over ``tokens`` tokens, in tokens the engine
        would produce meanwhile."""
        return self._draft_seconds(tokens) * self.cost.decode_rate(decoding)

    def _draft_seconds(self, tokens: int) -> float:
        """A draft forward over ``tokens`` tokens: its fitted time, and at
        least what reading that many tokens of a span takes (the fit is a
        line through the rounds seen, mostly a few tokens each, where a
        forward is bound by its weight reads; a round of a loaded batch
        computes each token: at batch 32 the line priced 64-token rounds at
        a fraction of their time and the cascade ran at 0.64x plain)."""
        return max(self.draft_cost.predict(tokens), tokens * self._read_seconds())

    def _worth_reading(self, req_ids: list[str], rows: list[int], num_tokens: np.ndarray,
                       token_ids: np.ndarray, decoding: int) -> list[int]:
        """Rows whose draft KV is at most ``USUAL_UNREAD`` tokens behind, and
        those further behind (a fresh prompt, drafting paused) whose
        drafting would gain, over the tokens they have left, more than
        reading the span costs: the gain per step is a drafting request's
        measured yield (accepted tokens) less its share of the step's draft
        rounds and tree costs, in tokens the engine would produce
        meanwhile. Under load a fresh request's prompt can cost more draft
        time than its drafts would save; it is then not read."""
        if not rows or not self.cost.ready:
            return rows
        accepted, nodes, rounds = self.yields.value
        rate = self.cost.decode_rate(decoding)
        per_step = accepted - rate * (
            rounds * self._draft_seconds(USUAL_UNREAD * len(rows)) / len(rows)
            + self.cost.tree_seconds
            + nodes * self.cost.nodes_seconds(decoding, round(nodes * len(rows)))
            + self.cost.tree_step_seconds / len(rows))
        per_token = self._read_seconds() * rate
        kept = []
        for r in rows:
            n = int(num_tokens[r])
            span = n - self._resume_point(req_ids[r], token_ids[r, :n]) - USUAL_UNREAD
            if span > 0:
                left = self.max_model_len - n
                if self._max_tokens[r] is not None:
                    left = min(left, self._max_tokens[r] - (n - self._prompt_lens[r]))
                if per_step * left / (1.0 + accepted) <= per_token * span:
                    self.counters[7] += 1
                    continue
            kept.append(r)
        return kept

    def _read_seconds(self) -> float:
        """Seconds the draft takes to read one token of a long span; until
        it has read one, a target prompt token's scaled by the two models' fixed
        costs per forward (both mostly the reading of their weights), or
        unscaled while the draft's forward is not timed (a scale of 0 then
        made every prompt look free to read: a batch of 8 read 7 prompts
        for drafts that did not pay)."""
        seconds, tokens = self._reads
        if tokens:
            return seconds / tokens
        target = self.cost.coefficients
        ratio = 1.0
        if self.draft_cost.known and target["a"] > 0:
            ratio = min(1.0, self.draft_cost.coefficients[0] / target["a"])
        return max(target["b_plain"], target["b_prefill"]) * ratio

    def _first_round_pays(self, rows: list[int], decoding: int) -> list[int]:
        """Rows that draft this step: none until the target's step time is
        fitted, or where even a first node accepted as often as the draft's
        likeliest nodes ever are would not pay for its share of the first
        draft forward and of the step's and the request's tree costs. At
        most ``PROBE_DRAFTS`` rows until the draft's forward is timed (again
        every ``REPROBE_STEPS`` steps without a draft), but all of them
        while the target has not yet timed tree steps (its nodes are priced
        as plain tokens meanwhile): a few rows cannot pay for the draft
        forward they share, so under load the budget would never learn what
        trees cost."""
        if not rows or not self.cost.ready:
            return []
        gain = (float(self.calibration.of(np.ones(1))[0]) - self._bar
                - self.cost.tree_cost_tokens(decoding))
        if not self.draft_cost.known:
            rows = rows[:PROBE_DRAFTS]
        # A usual round's tokens (each row's last token and a short guess),
        # not the unread span a row that paused drafting must catch up on:
        # that is paid whenever it drafts again, and counting it would keep
        # a paused row paused.
        cost = self._round_cost(2 * len(rows), decoding) + self.cost.fixed_cost_tokens(decoding)
        return rows if gain > 0 and len(rows) * gain > cost else []

    def _next_round(self, chains: list[_Chain], active: list[int], tokens: np.ndarray,
                    decoding: int) -> list[int]:
        """The chains worth another draft forward (``tokens[j]`` its tokens
        for ``active[j]``): those whose next node may still pay for itself
        (its draft probability is at most the chain's), if together they
        pay for the forward."""
        value = self.calibration.of(np.array([chains[i].path_prob for i in active])) - self._bar
        keep = value > 0
        cost = self._round_cost(int(tokens[keep].sum()), decoding)
        return [i for i, k in zip(active, keep) if k] if value[keep].sum() > cost else []

    def _paying(self, layouts, decoding: int) -> list[int]:
        """Drafts the target verifies: each one's expected net gain (its
        nodes' estimated acceptance minus the bar) must beat the cost of
        one request's tree, and all of them together that of a drafting
        step (measured budget; every non-empty draft with the static one)."""
        drafting = [i for i, (tokens, _, _) in enumerate(layouts) if tokens]
        if not self.measured or not drafting:
            return drafting
        gain = np.array([(self.calibration.of(layouts[i][2]) - self._bar).sum()
                         for i in drafting]) - self.cost.tree_cost_tokens(decoding)
        kept = [i for i, g in zip(drafting, gain) if g > 0]
        if gain[gain > 0].sum() <= self.cost.fixed_cost_tokens(decoding):
            return []
        return kept

    def _trees_pay(self, fed: int, chains: list[_Guess], trees: list[_Guess]) -> bool:
        """Whether a round verifies guess trees rather than one guess chain
        per row: while the trees at most double the round's time (the
        draft's forward still mostly the reading of its weights: a batch of
        one on this CPU, far larger batches on a GPU), or, before the
        draft's forward is timed, for a round of one row."""
        if not self.measured:
            return True
        if not self.draft_cost.known:
            return len(trees) == 1
        chain_tokens = fed + sum(len(g.tokens) for g in chains)
        tree_tokens = fed + sum(len(g.tokens) for g in trees)
        return self._draft_seconds(tree_tokens) <= 2 * self._draft_seconds(chain_tokens)

    def _timed(self, forward: DraftForward, fit: bool) -> DraftForward:
        """``forward``, its time taken out of the engine's host overhead and
        (``fit``) fitted by ``draft_cost``."""

        def timed(rows, starts, tokens, num_logits, **trees):
            started = self.clock()
            logits = forward(rows, starts, tokens, num_logits, **trees)
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            seconds = self.clock() - started
            self.seconds[0] += seconds
            read = sum(len(t) for t in tokens)
            if read >= READ_SPAN:
                self._reads = COUNT_DECAY * self._reads + (seconds, read)
            if fit:
                self.draft_cost.observe(sum(len(t) for t in tokens), seconds)
            self.timer.exclude(seconds)
            return logits

        return timed

    def _chains(self, req_ids, rows, num_tokens, token_ids, capacity,
                forward: DraftForward, decoding: int, trees: bool = False) -> list[_Chain]:
        """Each row's greedy draft chain, stage 2 guessing ahead (guess
        trees where ``trees``: stage 2 "lookahead" on a draft that takes
        them), with each depth's likeliest alternatives where the batch's
        trees are verified."""
        children = self.children if self._batch_trees else 1
        ids = [req_ids[r] for r in rows]
        histories = [token_ids[r, :int(num_tokens[r])] for r in rows]
        chains = [_Chain(r, len(h), int(capacity[r]),
                         min(self.depth, self.max_model_len - len(h)))
                  for r, h in zip(rows, histories)]
        starts = np.asarray([self._resume_point(i, h) for i, h in zip(ids, histories)])
        if self.pool is not None:
            for req_id in ids:
                if req_id not in self._indexed:
                    self.pool.open(req_id)
                    self._indexed[req_id] = 0
            overlap = self.config.ngram - 1
            self._index(ids, [h[max(0, self._indexed[i] - overlap):]
                              for i, h in zip(ids, histories)])
            for i, h in zip(ids, histories):
                self._indexed[i] = len(h)
        feed = [h[s:] for h, s in zip(histories, starts)]
        jacobi, exact = [], np.zeros(len(chains), dtype=bool)
        for j, (req_id, history) in enumerate(zip(ids, histories)):
            guess, exact[j] = (self._jacobi_guess(req_id, history) if self.jacobi
                               else (history[:0], False))
            jacobi.append(guess)
        self._catch_up(ids, chains, starts, feed, self._timed(forward, fit=False))
        forward = self._timed(forward, fit=True)
        # First chain forward: the tokens the draft has not read, then a guess.
        rounds = int(self.counters[2])
        active = list(range(len(chains)))
        first = True
        while active:
            batch = [chains[i] for i in active]
            # Chain tokens still to come, and positions with KV slots after
            # the last token fed.
            last = np.asarray([starts[i] + len(feed[i]) - 1 for i in active])
            slots = np.asarray([c.capacity for c in batch]) - last - 1
            room = np.minimum(np.asarray([c.max_len - len(c.tokens) - 1 for c in batch]),
                              slots)
            pool = self._guesses(
                [ids[i] for i in active],
                [np.concatenate([histories[i], chains[i].tokens]) for i in active], room,
                self.config.guesses if trees else 1)
            # A guess is at most ``room`` deep (a chain) or ``GUESS_NODES``
            # nodes with KV slots (a tree).
            guesses = [self._guess(p[:1], jacobi[i][:max(0, int(r))], exact[i], False,
                                   max(0, int(r)))
                       for i, p, r in zip(active, pool, room)]
            if trees:
                tree_guesses = [self._guess(p, jacobi[i][:max(0, int(r))], exact[i], True,
                                            max(0, min(int(n), GUESS_NODES)))
                                for i, p, r, n in zip(active, pool, room, slots)]
                if self._trees_pay(sum(len(feed[i]) for i in active), guesses, tree_guesses):
                    guesses = tree_guesses
            exact[:] = False  # later rounds guess past the draft's own tokens
            inputs = [np.concatenate([feed[i], g.tokens]) for i, g in zip(active, guesses)]
            if self.measured and not first:
                keep = self._next_round(chains, active, np.array([len(x) for x in inputs]),
                                        decoding)
                kept = set(keep)
                guesses = [g for i, g in zip(active, guesses) if i in kept]
                inputs = [x for i, x in zip(active, inputs) if i in kept]
                active, batch = keep, [chains[i] for i in keep]
                if not active:
                    break
            first = False
            num_logits = np.asarray([1 + len(g.tokens) for g in guesses])
            parents = [None if g.is_chain else g.parents for g in guesses]
            logits = forward(np.asarray([c.row for c in batch]), starts[active],
                             inputs, num_logits,
                             **({"parents": parents} if any(p is not None for p in parents)
                                else {}))
            self.counters[2] += 1
            self.counters[9] += any(p is not None for p in parents)
            top_t, top_p = _top_tokens(logits, children)
            offsets = np.concatenate([[0], np.cumsum(num_logits)])
            still = []
            for j, i in enumerate(active):
                chain, guess = chains[i], guesses[j]
                lo = offsets[j]
                predicted = top_t[lo:offsets[j + 1], 0]
                # Guess nodes the draft's own argmax follows are the chain.
                path = guess.walk(predicted)
                hits = len(path)
                take = min(hits + 1, chain.max_len - len(chain.tokens))
                rows = lo + np.asarray([0] + [1 + n for n in path])[:take]
                self.counters[5] += take - 1
                for source, found in guess.found(path).items():
                    self.guess_yield.update(source, min(found, take - 1), 1)
                branch = guess.branch_of(path)
                if branch is not None and branch[0] == 1:
                    self.counters[8] += take - 1
                chain.extend(top_t[rows], top_p[rows])
                if self.jacobi:
                    along = [0] + [1 + n for n in branch[1]] if branch else [0]
                    jacobi[i] = predicted[along][take:].astype(np.int64)
                # The path's KV is in place where it is the first candidate's
                # start; else its tokens are fed again with the next round.
                kept = min(hits, take - 1) if path == list(range(hits)) else 0
                self._record_fed(ids[i], int(starts[i]), inputs[j][:len(feed[i]) + kept])
                starts[i] += len(feed[i]) + kept
                feed[i] = np.asarray(chain.tokens[len(chain.tokens) - take + kept:],
                                     dtype=np.int64)
                if not self._stop(chain, starts[i], children):
                    still.append(i)
            active = still
        self.yields.update(2, int(self.counters[2]) - rounds, 1)
        for req_id, history, chain, guess in zip(ids, histories, chains, jacobi):
            self._valid[req_id] = len(history)
            if self.jacobi:
                self._leftover[req_id] = (len(history), np.concatenate(
                    [np.asarray(chain.tokens, dtype=np.int64), guess]), len(chain.tokens))
        if self.pool is not None:
            tails = [np.concatenate([h[-(self.config.ngram - 1):], c.tokens])
                     for h, c in zip(histories, chains)]
            self._index(ids, tails)
        return chains

    def _catch_up(self, ids: list[str], chains: list[_Chain], starts: np.ndarray,
                  feed: list[np.ndarray], forward: DraftForward) -> None:
        """Feed long unread spans (a prompt, a request back in the batch) in
        chunks of ``PREFILL_CHUNK`` tokens, leaving each row's last chunk to
        the first chain forward."""
        while True:
            long = [i for i, f in enumerate(feed) if len(f) > PREFILL_CHUNK]
            if not long:
                return
            chunks = [feed[i][:PREFILL_CHUNK] for i in long]
            forward(np.asarray([chains[i].row for i in long]), starts[long], chunks,
                    np.ones(len(long), dtype=np.int64))
            self.counters[2] += 1
            for i, chunk in zip(long, chunks):
                self._record_fed(ids[i], int(starts[i]), chunk)
                starts[i] += len(chunk)
                feed[i] = feed[i][len(chunk):]

    def _stop(self, chain: _Chain, next_start: int, children: int) -> bool:
        if len(chain.tokens) >= chain.max_len or next_start >= chain.capacity:
            return True
        # No deeper chain node can beat k likelier nodes already found.
        likelier = sum(s > chain.path_prob for s in chain.scores) + len(chain.tokens)
        return children > 1 and likelier >= self.k

    def _layout(self, chain: _Chain) -> tuple[list[int], list[int], np.ndarray]:
        """The k likeliest nodes of the chain and its alternatives (with the
        measured budget, those whose estimated acceptance beats the bar):
        chain first, then alternatives by depth. Returns tokens, parents
        and the nodes' draft probabilities (scores)."""
        n = len(chain.tokens)
        budget = min(self.k, self.max_model_len - chain.length)
        path = np.cumprod([p[0] for p in chain.top_probs]) if n else np.zeros(0)
        if not self._batch_trees or self.children == 1:
            depth = min(n, budget)
            if self.measured:
                depth = int(np.cumprod(self.calibration.of(path[:depth]) > self._bar).sum())
            return chain.tokens[:depth], list(range(-1, depth - 1)), path[:depth]
        before = np.concatenate([[1.0], path[:-1]])
        # (score, depth, rank): chain nodes are rank 0.
        nodes = [(float(path[d]), d, 0) for d in range(n)]
        for d in range(n):
            for r in range(1, len(chain.top_tokens[d])):
                nodes.append((float(before[d] * chain.top_probs[d][r]), d, r))
        nodes.sort(key=lambda x: (-x[0], x[1], x[2]))
        kept = nodes[:budget]
        if self.measured and kept:
            pays = self.calibration.of(np.array([score for score, _, _ in kept])) > self._bar
            kept = [node for node, p in zip(kept, pays) if p]
        depth = max([d + 1 for _, d, r in kept if r == 0], default=0)
        # An alternative's parent (the chain node above it) is always
        # likelier, so it is kept; ties could break that, so check.
        alts = sorted((d, r) for _, d, r in kept if r and d <= depth)
        tokens = chain.tokens[:depth] + [int(chain.top_tokens[d][r]) for d, r in alts]
        parents = list(range(-1, depth - 1)) + [d - 1 for d, _ in alts]
        scores = np.concatenate([path[:depth], [before[d] * chain.top_probs[d][r]
                                                for d, r in alts]])
        return tokens, parents, scores

    # ------------------------------------------------------------------
    # Stats.

    def stats(self) -> dict[str, float]:
        (steps, drafting, forwards, chain, nodes, guessed, drafted, unread, jacobi,
         tree_forwards) = (int(x) for x in self.counters)
        return {
            "steps": steps,
            "drafting_steps": drafted,
            "rows_not_read": unread,
            "draft_forwards": forwards,
            "draft_forwards_per_step": forwards / steps if steps else 0.0,
            "chain_tokens_per_request": chain / drafting if drafting else 0.0,
            "nodes_per_request": nodes / drafting if drafting else 0.0,
            "acceptance_bar": self._bar,
            "yield_per_request": dict(zip(("accepted", "nodes", "rounds"),
                                          self.yields.value.tolist())),
            "target_node_ms": 1e3 * self.cost.node_seconds,
            "draft_forward_ms": 1e3 * self.draft_cost.predict(1),
            "target_fit": self.cost.coefficients,
            "draft_fit": self.draft_cost.coefficients,
            "acceptance_by_probability": dict(zip(SCORE_EDGES.tolist(),
                                                  self.calibration.rate().tolist())),
            "draft_forward_seconds": float(self.seconds[0]),
            "drafter_seconds": float(self.seconds[1]),
            "stage2_tokens_per_request": guessed / drafting if drafting else 0.0,
            "jacobi_tokens_per_request": jacobi / drafting if drafting else 0.0,
            "guess_tree_forwards": tree_forwards,
            "tokens_per_guess": dict(zip(("pool", "jacobi"), self.guess_yield.value.tolist())),
        }

    def _log_stats(self) -> None:
        s = self.stats()
        logger.info(
            "vllm_lookahead staged: %d steps (%d drafted), %.2f draft forwards per step; per "
            "drafting request %.2f chain tokens (%.2f from stage 2) and %.2f nodes; budget: "
            "acceptance bar %.2f, target node %.2f ms, draft forward %.1f ms", s["steps"],
            s["drafting_steps"], s["draft_forwards_per_step"], s["chain_tokens_per_request"],
            s["stage2_tokens_per_request"], s["nodes_per_request"], s["acceptance_bar"],
            s["target_node_ms"], s["draft_forward_ms"])
