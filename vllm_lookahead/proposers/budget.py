"""Measured tree budget: a draft node is verified only where it pays.

A tree node costs target compute; it pays back only if it is accepted. The
engine's step time is fitted online as

    t = a + c * [step has trees] + d * n_trees
          + b_plain * (n_plain + n_tree) + (b_tree - b_plain) * n_tree
          + b_prefill * n_prefill + h * max(0, n_plain + n_tree - K)

(exponentially weighted least squares over recent steps: ``n_tree`` tree
nodes in ``n_trees`` requests' trees, ``n_plain`` other scheduled tokens,
``c`` the fixed cost of a tree step, ``d`` that of one request's tree: the
runtime's per-request work in every layer; a node is a decode token, fitted
with the plain ones, plus what the tree attention adds to it (``b_tree -
b_plain >= 0``, drawn to zero like ``c`` and ``d``): fitted apart, batch 1
(one plain token in every step) could not tell a plain token from the fixed
cost (a = -2.9 s, b_plain = 3.1 s in one trace of Qwen 1.5B), nor a batch
seen only with drafts its plain tokens from its nodes (batch 8 after batch 1:
a plain token at 40-76 ms), so a plain step of 8 looked several times slower
than it was, the bar fell with it, and full trees that did not pay were
drafted; ``n_prefill`` prompt tokens,
kept apart so that a prompt's cost per token never enters the cost of a
decode step: fitted together, a prefill of 1,100 prompt tokens made a plain
decode step of 8 requests look 50% slower than it was, and drafts look
cheap; ``h`` beyond the knee ``K``: a forward reads the model's weights
whatever it computes, so a few more query tokens cost little, until the
step computes more than it reads and each token costs its compute, as a
prompt token does. Measured on Qwen2.5-Coder-1.5B on this CPU: a node cost
~16 ms in a batch-1 tree step of ~9 tokens and ~33 ms in a batch-8 step of
~60, which a line through both priced at the first, so batch 8 drafted full
trees. ``K`` is the knee of a fixed grid that fits best; beyond the steps
seen, ``h`` is taken as a prompt token's cost less a node's, worth one step
of twice the knee, so a step larger than any seen is priced as compute, not
as the small steps that were). Adding a node with acceptance
probability p to a step that produces T tokens in time t raises throughput
T / t iff p > b_tree * T / t: the node must be accepted more often than the
tokens the engine produces in the time the node costs. ``threshold()`` is
that bar, with T / t the fitted rate of a plain decode step of the current
batch (prefill chunks left out) and the node's cost its mean over the nodes
the step is expected to hold (past the knee, ``b_tree + h``); it rises with
the batch and falls back as the load goes down. A request keeps its tree
only if the tree's expected net gain beats ``d``, and a step keeps its trees
only if their total net gain beats ``c``.

Until the fit has seen a few steps (``MIN_STEPS``) no draft is verified:
the first steps (prefill, then plain decode) give the cost of a prompt
token and a plain one, and a draft node is then assumed to cost as much as
the dearer (c = d = 0, b_tree = max(b_plain, b_prefill): a node is one
more query token of its request in the forward) until steps with drafts
measure what it really costs, with at most ``PROBE_DRAFTS`` drafts per step
meanwhile. So a loaded engine never pays for a phase of full trees to learn
that they do not pay.

The same budget cuts linear mode's chains: a chain's node classes are its
depths, and its fixed costs are those of vLLM's rejection sampler.

Times come from the engine itself (``step_started`` at the start of each
forward, ``bind_batch`` after it), so the policy adapts to the hardware, the
model and the load without configuration.

The acceptance probability of a node is estimated per node class (its place
in the tree: Jacobi level and column, or pool candidate rank and depth) from
decayed counts of how often such nodes were verified and accepted, plus an
exploration bonus that grows while a class is not verified, so a class that
was cut is tried again now and then.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

# Steps before the fit is trusted (until then no draft is verified).
MIN_STEPS = 4
# Weight of past steps in the step-time fit, and of past verifications in the
# acceptance counts (per step).
TIME_DECAY = 0.98
COUNT_DECAY = 0.99
# Recent steps whose host overhead (scheduling, output processing, drafting:
# step time outside the forward) gives its median.
OVERHEAD_WINDOW = 64
EXPLORATION = 0.15
# Decayed count of recent tree steps below which the fit cannot tell the
# tree costs (c, d, b_tree - b_plain) and keeps their last estimates.
MIN_TREE_WEIGHT = 4.0
# Relative ridge per feature of the step-time fit (1, has trees, n_trees,
# decode tokens, nodes, n_prefill, past the knee): the fixed costs of a tree
# step and of each tree, and a node's cost over a plain token's, are drawn
# to zero harder than the per-token costs (that premium less hard: at 1e-2 a
# premium of 3 ms a node, with sizes that tell it, was fitted 13% low). At
# one batch size every drafting step holds about as many trees of about the
# same size, so the fit cannot tell them from their nodes' cost; the extra
# time then went to the trees (0.16 s each at batch 8 on Qwen 1.5B, where it
# is 24 ms a node past the knee), no first node paid for its tree, and the
# batch stopped drafting drafts that paid. It is compute: a node's.
TREE_RIDGE = np.array([0.0, 1e-2, 1e-2, 1e-6, 1e-3, 1e-6, 1e-6])
TREE_COSTS = [1, 2, 4]  # c, d, b_tree - b_plain in the fit's coefficients
# Drafts per step while their costs are not measured yet (the best ones by
# expected gain): learning what drafts cost never makes a step of the whole
# batch's drafts.
PROBE_DRAFTS = 2
# The first steps with drafts are left out of the fit: the tree runtime's
# one-time self-check and first allocations make the first one several
# times slower than any later one (135 ms instead of ~30 on SmolLM2, CPU),
# which priced every node out for good.
WARMUP_DRAFT_STEPS = 1
# Steps without a draft after which the drafts' measured costs are
# forgotten and probed again (at most PROBE_DRAFTS per step): costs measured
# under another load, or from a few noisy steps, must not keep drafts out
# forever.
REPROBE_STEPS = 128
# Candidate knees of the step-time fit (decode tokens in a step): where a
# forward stops being bound by reading the weights (about a dozen tokens
# for a 1.5B model in fp32 on two CPU cores, hundreds on a GPU).
KNEES = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Steps between choices of the knee (each solves every candidate's fit).
KNEE_EVERY = 16
# Decode step sizes (scheduled tokens) whose forward times are also kept
# apart, the weight of past steps in them (per decode step), and the weight
# below which a size counts as not seen (one step, ~280 steps ago).
STEP_SIZES = 8192
SIZE_DECAY = 0.995
SIZE_MIN_WEIGHT = 0.25


def nonnegative_least_squares(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """argmin over coef[1:] >= 0 of the least-squares fit with normal
    equations ``xtx @ coef = xty`` (positive definite; the intercept is
    free). Clamping the unconstrained solution instead lets collinear costs
    trade off (a negative tree-step cost against a huge per-node cost) and
    keeps the wrong one after the clamp.

    Exact, by faces: the optimum of a convex quadratic over the orthant is
    the unconstrained optimum on the face it lies in, so it is the best of
    the faces' optima that are feasible. The unconstrained solution (the
    usual case) is one solve; otherwise the 2^(n-1) faces are a few dozen
    solves of at most n x n (this runs every engine step: coordinate
    descent in Python cost ~1 ms a step)."""
    n = len(xty)
    coef = np.linalg.solve(xtx, xty)
    if (coef[1:] >= 0).all():
        return coef
    best, best_value = np.zeros(n), np.inf
    for mask in range(1 << (n - 1)):
        free = np.array([0] + [i + 1 for i in range(n - 1) if mask >> i & 1])
        face = np.zeros(n)
        face[free] = np.linalg.solve(xtx[np.ix_(free, free)], xty[free])
        if (face[1:] < 0).any():
            continue
        value = face @ xtx @ face - 2 * xty @ face
        if value < best_value:
            best, best_value = face, value
    return best


class StepCostModel:
    """Online fit of the engine's forward time, and its throughput.

    The fit uses the time from the start of the forward (input preparation)
    to the drafter's next call, so idle gaps between requests never enter
    it; the host overhead around the forward is the median over recent
    steps, for the same reason."""

    # 1, has trees, n_trees, decode tokens (plain and nodes), nodes, n_prefill,
    # tokens past the knee
    FEATURES = 7
    EXCESS = 6

    def __init__(self) -> None:
        shape = (len(KNEES), self.FEATURES)
        self._xtx = np.zeros(shape + (self.FEATURES,))  # per candidate knee
        self._xty = np.zeros(shape)
        self._yty = 0.0
        # The same sums apart for steps without and with drafts, each decayed
        # only by steps of its own kind: at batch 1 nearly every step drafts,
        # and with one decay the plain steps faded from the fit, the fixed
        # cost of a drafting step could no longer be told from the intercept
        # (the ridge gave it to the intercept), a plain step looked as slow
        # as a drafting one and trees that cost more than they gained were
        # kept (Qwen 1.5B on Spec-Bench: S 1.7 at plain's speed).
        self._kinds = [[np.zeros(shape + (self.FEATURES,)), np.zeros(shape), 0.0]
                       for _ in range(2)]
        self._knee = 0  # index into KNEES
        self._coef = np.zeros(self.FEATURES)
        self._steps = 0
        self._tree_weight = 0.0
        self._tree_costs: np.ndarray | None = None  # c, d, b_tree when last told
        self._trees = np.zeros(2)  # decayed nodes and trees of recent steps
        self._tokens = 0.0
        self._forward_seconds = 0.0
        self._draft_steps_seen = 0
        self._since_draft_step = 0
        self._overheads: deque[float] = deque(maxlen=OVERHEAD_WINDOW)
        self._overhead = 0.0  # their median
        # Decayed forward seconds and weight of decode-only steps, by size.
        self._size_seconds = np.zeros(STEP_SIZES)
        self._size_weight = np.zeros(STEP_SIZES)

    @property
    def knee(self) -> int:
        """Decode tokens in a step past which each costs ``h`` more."""
        return KNEES[self._knee]

    @staticmethod
    def _features(n_plain: int, n_tree: int, n_trees: int, n_prefill: int,
                  knees: np.ndarray | int) -> np.ndarray:
        """Features of a step, one row per knee in ``knees``."""
        excess = np.maximum(n_plain + n_tree - np.atleast_1d(knees), 0).astype(np.float64)
        x = np.empty((len(excess), StepCostModel.FEATURES))
        x[:] = [1.0, float(n_tree > 0), float(n_trees), float(n_plain + n_tree),
                float(n_tree), float(n_prefill), 0.0]
        x[:, StepCostModel.EXCESS] = excess
        return x

    def predict(self, n_plain: int, n_tree: int, n_trees: int, n_prefill: int = 0) -> float:
        """Forward seconds of a step scheduling these tokens."""
        return float(self._features(n_plain, n_tree, n_trees, n_prefill, self.knee)[0]
                     @ self._coef)

    def decode_seconds(self, n_plain: int, n_tree: np.ndarray, n_trees: np.ndarray) -> np.ndarray:
        """Forward seconds of decode steps of ``n_plain`` tokens plus
        ``n_tree[i]`` nodes in ``n_trees[i]`` trees, by their size: the
        recent mean of steps of that size where such steps were seen;
        between sizes seen, the largest mean at or below it (so a size is
        tried before it is priced out); beyond every size seen, or below,
        the linear fit's, and beyond never below what was seen.

        The fit is linear in the tokens; a forward is not: a GPU computes
        tens of tokens in the time of one, and a CPU's matrix kernels change
        with the step's size (oneDNN fp32, Qwen2.5-Coder-1.5B's layers, in
        the engine's threads on two cores: 2 tokens +3% over 1, 4 +19%, 7
        +46%, 17 +122%). A line through the steps seen put 20-30 ms of a
        157 ms batch-1 step in the fixed cost of a tree step and 4-5 ms in
        each node, so it priced one node at a fifth of a step, and sixteen
        below what they cost; measured by size, each tree size is priced at
        what steps of that size took."""
        n_tree = np.asarray(n_tree, dtype=np.int64)
        n_trees = np.asarray(n_trees, dtype=np.float64)
        sizes = np.minimum(n_plain + n_tree, STEP_SIZES - 1)
        x = np.zeros((len(sizes), self.FEATURES))
        x[:, 0] = 1.0
        x[:, 1] = n_tree > 0
        x[:, 2] = n_trees
        x[:, 3] = n_plain + n_tree
        x[:, 4] = n_tree
        x[:, self.EXCESS] = np.maximum(n_plain + n_tree - self.knee, 0)
        model = x @ self._coef
        known = np.flatnonzero(self._size_weight >= SIZE_MIN_WEIGHT)
        if not len(known):
            return model
        top = int(sizes.max(initial=0))
        weight = self._size_weight[:top + 1]
        means = np.where(weight >= SIZE_MIN_WEIGHT,
                         self._size_seconds[:top + 1] / np.maximum(weight, 1e-12), 0.0)
        floor = np.maximum.accumulate(means)[sizes]
        return np.where(sizes < known[0], model,
                        np.where(sizes > known[-1], np.maximum(floor, model), floor))

    def observe(self, n_plain: int, n_tree: int, n_trees: int, forward_seconds: float,
                step_seconds: float | None, produced: int, n_prefill: int = 0) -> None:
        """One engine step: scheduled tokens (``n_tree`` of them in
        ``n_trees`` trees, ``n_prefill`` prompt tokens, ``n_plain`` the
        others), forward time, time since the previous step (None for the
        first), tokens produced."""
        if n_tree > 0:
            self._since_draft_step = 0
            self._draft_steps_seen += 1
            if self._draft_steps_seen <= WARMUP_DRAFT_STEPS:
                return
        else:
            self._since_draft_step += 1
            if self._since_draft_step >= REPROBE_STEPS and self._tree_costs is not None:
                self._tree_costs = None
                self._tree_weight = 0.0
                self._kinds[1] = [np.zeros_like(self._kinds[1][0]),
                                  np.zeros_like(self._kinds[1][1]), 0.0]
        if n_prefill == 0:
            self._size_seconds *= SIZE_DECAY
            self._size_weight *= SIZE_DECAY
            if n_plain + n_tree < STEP_SIZES:
                self._size_seconds[n_plain + n_tree] += forward_seconds
                self._size_weight[n_plain + n_tree] += 1.0
        x = self._features(n_plain, n_tree, n_trees, n_prefill, np.asarray(KNEES))
        kind = self._kinds[int(n_tree > 0)]
        kind[0] = TIME_DECAY * kind[0] + x[:, :, None] * x[:, None, :]
        kind[1] = TIME_DECAY * kind[1] + x * forward_seconds
        kind[2] = TIME_DECAY * kind[2] + forward_seconds ** 2
        self._xtx, self._xty, self._yty = (a + b for a, b in zip(*self._kinds))
        self._tree_weight = TIME_DECAY * self._tree_weight + float(n_tree > 0)
        self._trees = TIME_DECAY * self._trees + (n_tree, n_trees)
        self._tokens = TIME_DECAY * self._tokens + produced
        self._forward_seconds = TIME_DECAY * self._forward_seconds + forward_seconds
        if step_seconds is not None:
            self._overheads.append(max(step_seconds - forward_seconds, 0.0))
            self._overhead = float(np.median(self._overheads))
        self._steps += 1
        if self._steps % KNEE_EVERY == 1:
            fits = [self._solve(k) for k in range(len(KNEES))]
            values = np.array([value for _, value in fits])
            # The smallest knee of those that fit as well as the best (the
            # knees past every step seen fit alike).
            self._knee = int(np.argmax(values <= values.min() + 1e-9 * max(self._yty, 1e-12)))
            coef = fits[self._knee][0]
        else:
            coef = self._solve(self._knee)[0]
        if self._tree_weight >= MIN_TREE_WEIGHT:
            self._tree_costs = coef[TREE_COSTS].copy()
        elif self._tree_costs is not None:
            # Steps without trees say nothing of what trees cost: keep the
            # last estimates rather than let the ridge pull them to zero,
            # which would let trees back in only to pay those costs again.
            coef[TREE_COSTS] = self._tree_costs
        self._coef = coef

    def _solve(self, knee: int) -> tuple[np.ndarray, float]:
        """The fit with knee ``KNEES[knee]`` and its penalised residual.

        A small ridge on all but the intercept, scaled by each feature's
        own size (one scaled by the trace let prompt chunks of thousands of
        tokens weigh on the others), keeps features that did not vary (no
        tree steps yet) at zero instead of making the system singular; so a
        batch size never seen costs what the sizes seen cost (a step's time
        is its fixed cost until decode batches of several sizes tell the two
        apart): an unknown batch below the knee is taken as fast, not slow,
        so drafts do not look cheap there. ``h`` is drawn to
        its prior (a prompt token's cost less a node's) with the weight of
        one step of twice the knee's tokens: steps that barely pass the
        knee do not tell it, and past the steps seen it is the prior."""
        xtx, xty = self._xtx[knee], self._xty[knee]
        ridge = np.diag(TREE_RIDGE * (np.diag(xtx) + 1.0))
        ridge[self.EXCESS, self.EXCESS] += float(KNEES[knee]) ** 2
        prior = np.zeros(self.FEATURES)
        base = self._fitted_node_seconds if self._tree_costs is not None else self._coef[3]
        prior[self.EXCESS] = max(self._coef[5] - base, 0.0)
        a, b = xtx + ridge, xty + ridge @ prior
        coef = nonnegative_least_squares(a, b)
        return coef, float(coef @ a @ coef - 2 * b @ coef + self._yty + prior @ ridge @ prior)

    @property
    def ready(self) -> bool:
        return self._steps >= MIN_STEPS

    @property
    def coefficients(self) -> dict[str, float]:
        """The fit, in seconds: a, c (tree step), d (per tree), b_plain,
        b_tree, b_prefill, h (per token past the knee), the knee (tokens)
        and the median host overhead."""
        a, c, d, b_plain, _, b_prefill, h = map(float, self._coef)
        return {"a": a, "c": c, "d": d, "b_plain": b_plain,
                "b_tree": self._fitted_node_seconds, "b_prefill": b_prefill, "h": h,
                "knee": float(self.knee), "overhead": self._overhead}

    @property
    def draft_costs_known(self) -> bool:
        """Whether steps with drafts have measured what drafts cost."""
        return self._tree_costs is not None

    @property
    def node_seconds(self) -> float:
        """Marginal cost of one tree node below the knee; until steps with
        drafts measured it, a plain or a prompt token's, whichever is
        dearer."""
        if self.draft_costs_known:
            return self._fitted_node_seconds
        return float(max(self._coef[3], self._coef[5]))

    @property
    def _fitted_node_seconds(self) -> float:
        """A node's fitted cost below the knee: a decode token's and what
        the tree attention adds to it."""
        return float(self._coef[3] + self._coef[4])

    def nodes_seconds(self, n_requests: int, n_nodes: int) -> float:
        """Mean cost of each of ``n_nodes`` nodes added to a decode step of
        ``n_requests`` tokens (the first node's where ``n_nodes`` is 0):
        ``node_seconds``, and ``h`` for those past the knee (a node priced
        as a prompt token, before drafts are measured, is compute already)."""
        n_nodes = max(n_nodes, 1)
        past = (max(n_requests + n_nodes - self.knee, 0)
                - max(n_requests - self.knee, 0)) / n_nodes
        h = float(self._coef[self.EXCESS])
        if self.draft_costs_known:
            return self._fitted_node_seconds + h * past
        return max(float(self._coef[3]) + h * past, float(self._coef[5]))

    @property
    def nodes_per_tree(self) -> float:
        """Nodes in a request's tree in recent steps (from one node, the
        prior, worth one tree): what a step's trees are expected to hold."""
        return float((self._trees[0] + 1.0) / (self._trees[1] + 1.0))

    @property
    def tree_step_seconds(self) -> float:
        return float(self._coef[1]) if self.draft_costs_known else 0.0

    @property
    def tree_seconds(self) -> float:
        """Cost of one request's tree beyond its nodes."""
        return float(self._coef[2]) if self.draft_costs_known else 0.0

    @property
    def overhead_seconds(self) -> float:
        return self._overhead

    @property
    def tokens_per_second(self) -> float:
        """Recent throughput: tokens produced per step over the forward time
        plus the median overhead per step."""
        if self._forward_seconds <= 0:
            return 0.0
        steps = (1 - TIME_DECAY ** self._steps) / (1 - TIME_DECAY)
        return self._tokens / (self._forward_seconds + steps * self.overhead_seconds)

    def decode_rate(self, n_requests: int | None = None) -> float:
        """Tokens per second of a plain decode step of ``n_requests``
        requests, by the fit (prefill chunks and idle gaps left out, so the
        rate follows the load at once); the recent throughput where the fit
        cannot tell."""
        if n_requests:
            seconds = self.predict(n_requests, 0, 0) + self.overhead_seconds
            if seconds > 0:
                return n_requests / seconds
        return self.tokens_per_second

    def threshold(self, n_requests: int | None = None, n_nodes: int = 0) -> float:
        """Acceptance probability a node needs to pay for itself in a step
        of ``n_requests`` decoding requests holding ``n_nodes`` nodes
        (infinite until the fit is trusted: no node is verified on a
        guess)."""
        if not self.ready:
            return np.inf
        return self.nodes_seconds(n_requests or 1, n_nodes) * self.decode_rate(n_requests)

    def fixed_cost_tokens(self, n_requests: int | None = None) -> float:
        """The fixed cost of a tree step, in tokens the engine would produce
        meanwhile."""
        return self.tree_step_seconds * self.decode_rate(n_requests) if self.ready else 0.0

    def tree_cost_tokens(self, n_requests: int | None = None) -> float:
        """The cost of one request's tree beyond its nodes, in tokens."""
        return self.tree_seconds * self.decode_rate(n_requests) if self.ready else 0.0


class NodeValues:
    """Acceptance estimates per node class from decayed counts."""

    def __init__(self, classes: int) -> None:
        self.offered = np.zeros(classes)
        self.accepted = np.zeros(classes)

    def rate(self) -> np.ndarray:
        """Smoothed acceptance rate per class: the prior, worth one
        verification, is the rate over all classes (itself from a prior of
        one half). With one half for every class, the classes rarely offered
        (deep template nodes, their counts decayed to one or two
        verifications) stayed at 0.2-0.5 and filled the trees: Qwen2.5-Coder
        -1.5B on Spec-Bench drafted 11.5 nodes a tree at 0.1 accepted tokens
        a node, a third of its 78 classes seen less than twice."""
        pooled = (self.accepted.sum() + 0.5) / (self.offered.sum() + 1.0)
        return (self.accepted + pooled) / (self.offered + 1.0)

    def estimate(self) -> np.ndarray:
        """Optimistic acceptance probability per class: the rate plus a
        bonus shrinking with the verifications seen. Both fade as 1 /
        verifications, so a class accepted a few times in a hundred is cut
        where the bar is a few percent (with a 1 / sqrt bonus, and a prior
        worth two verifications, such classes stayed in every tree)."""
        return self.rate() + EXPLORATION / (self.offered + 1.0)

    def update(self, offered: np.ndarray, accepted: np.ndarray) -> None:
        """One verification step: class ids of every verified node and of
        every accepted node (repeats allowed)."""
        self.age()
        np.add.at(self.offered, offered, 1.0)
        np.add.at(self.accepted, accepted, 1.0)

    def age(self) -> None:
        """One step passed (``update`` ages the counts itself): also called
        on steps that verified nothing, so that estimates cut below the bar
        drift back to the prior and are tried again. Aged only on
        verifications, a budget whose every class fell below the bar
        verified nothing again for the rest of the engine's life (Qwen2.5-
        Coder-1.5B on Spec-Bench: S 1.00, 0.92x plain)."""
        self.offered *= COUNT_DECAY
        self.accepted *= COUNT_DECAY


class StepRecord(NamedTuple):
    """One engine step as timed by :class:`StepTimer`."""

    n_plain: int  # scheduled tokens that were neither draft nodes nor prompt
    n_tree: int  # draft nodes
    n_prefill: int  # prompt tokens
    forward_seconds: float
    step_seconds: float | None  # since the previous step (None: the first)
    produced: int

    def realized_ratio(self, cost: StepCostModel) -> float | None:
        """Tokens produced per second over a plain decode step's of the same
        requests (whole step time, host included, by the cost model's
        sizes); None for steps that read prompt tokens, or untimed."""
        if self.n_prefill or not self.step_seconds or self.n_plain <= 0:
            return None
        plain = float(cost.decode_seconds(self.n_plain, np.zeros(1), np.zeros(1))[0])
        plain += cost.overhead_seconds
        if plain <= 0:
            return None
        return self.produced / self.n_plain * plain / self.step_seconds


class StepTimer:
    """Feeds a :class:`StepCostModel` from the engine's calls to a drafter:
    ``forward_started`` as a forward starts, ``batch_bound`` after it (the
    forward's time, and the step's since the last one), ``drafted`` with
    what the drafts of the coming forward hold, ``observe`` on the next
    drafting call with the tokens the step produced. Seconds passed to
    ``exclude`` (a draft model's forwards, which run between the target's)
    are taken out of the step time so the host overhead stays the engine's
    own."""

    def __init__(self, cost: StepCostModel,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.cost = cost
        self.clock = clock
        self._last_bind: float | None = None
        self._forward_started: float | None = None
        # n_plain, n_tree, n_trees, forward seconds, step seconds, n_prefill
        # of the last step.
        self._step: tuple[int, int, int, float, float | None, int] | None = None
        self._drafted = 0  # draft tokens of the coming forward
        self._drafted_trees = 0  # requests with a draft in it
        self._excluded = 0.0
        self.step_seconds = 0.0  # total modelled step time (forward + overhead)

    def forward_started(self) -> None:
        self._forward_started = self.clock()

    def batch_bound(self, scheduled_tokens: int, prefill_tokens: int = 0) -> None:
        now = self.clock()
        if self._forward_started is not None:
            n_tree = min(self._drafted, scheduled_tokens)
            n_prefill = min(prefill_tokens, scheduled_tokens - n_tree)
            step = None if self._last_bind is None else now - self._last_bind - self._excluded
            self._step = (scheduled_tokens - n_tree - n_prefill, n_tree, self._drafted_trees,
                          now - self._forward_started, step, n_prefill)
        self._last_bind, self._forward_started = now, None
        self._excluded = 0.0

    def observe(self, produced: int) -> StepRecord | None:
        """The last step, now that its produced tokens are known (None
        before the first timed step)."""
        if self._step is None:
            return None
        n_plain, n_tree, n_trees, forward, step, n_prefill = self._step
        self._step = None
        self.cost.observe(n_plain, n_tree, n_trees, forward, step, produced, n_prefill)
        self.step_seconds += forward + self.cost.overhead_seconds
        return StepRecord(n_plain, n_tree, n_prefill, forward, step, produced)

    def exclude(self, seconds: float) -> None:
        self._excluded += seconds

    def drafted(self, tokens: int, trees: int) -> None:
        self._drafted, self._drafted_trees = tokens, trees


# Chain forwards left out of the draft cost fit (first allocations; the
# catch-up forwards over long unread spans are never in it).
WARMUP_DRAFT_FORWARDS = 1
FORGOTTEN_WEIGHT = 1 / 16


class DraftCostModel:
    """Online fit of a draft model's forward time, ``e + f * tokens``
    (exponentially weighted least squares, ``e, f >= 0``)."""

    def __init__(self) -> None:
        self._xtx = np.zeros((2, 2))
        self._xty = np.zeros(2)
        self._coef = np.zeros(2)
        self._seen = 0

    def observe(self, tokens: int, seconds: float) -> None:
        self._seen += 1
        if self._seen <= WARMUP_DRAFT_FORWARDS:
            return
        x = np.array([1.0, float(tokens)])
        self._xtx = TIME_DECAY * self._xtx + np.outer(x, x)
        self._xty = TIME_DECAY * self._xty + x * seconds
        # A ridge on the per-token cost only: until token counts vary, a
        # forward's time is its fixed cost (with a ridge on both, one
        # forward of 2 tokens read as 0.1 s per token, which priced a batch's
        # round at eight times its cost).
        ridge = np.diag([1e-9, 1e-3 * self._xtx[0, 0]])
        self._coef = np.maximum(nonnegative_least_squares(self._xtx + ridge, self._xty), 0.0)

    @property
    def known(self) -> bool:
        return self._seen > WARMUP_DRAFT_FORWARDS

    def forget(self) -> None:
        """Drop the fit (the next forward is measured afresh): a cost
        measured under another load must not keep drafts out forever. The
        old forwards stay as a prior worth ``FORGOTTEN_WEIGHT`` of their
        weight: the first forward measured afresh is mostly a catch-up read
        of spans left unread meanwhile, and alone it made a forward's fixed
        cost its whole time (1.5 s for a 0.12 s forward)."""
        self._xtx *= FORGOTTEN_WEIGHT
        self._xty *= FORGOTTEN_WEIGHT
        self._coef[:] = 0.0
        self._seen = min(self._seen, WARMUP_DRAFT_FORWARDS)

    @property
    def coefficients(self) -> tuple[float, float]:
        """e, f (seconds, seconds per token)."""
        return float(self._coef[0]), float(self._coef[1])

    def predict(self, tokens: int) -> float:
        """Seconds of a draft forward over ``tokens`` tokens (0 until
        measured)."""
        return float(self._coef @ np.array([1.0, float(tokens)]))


class DecayedMean:
    """Means of a few per-sample quantities over recent samples (decayed
    by ``COUNT_DECAY`` per update), starting from ``prior`` worth one
    sample."""

    def __init__(self, prior: np.ndarray) -> None:
        self.prior = np.asarray(prior, dtype=np.float64)
        self._sum = np.zeros_like(self.prior)
        self._count = np.zeros_like(self.prior)

    def update(self, index: int, total: float, samples: int) -> None:
        """``samples`` new samples of quantity ``index`` summing to ``total``."""
        self._sum[index] = COUNT_DECAY * self._sum[index] + total
        self._count[index] = COUNT_DECAY * self._count[index] + samples

    @property
    def value(self) -> np.ndarray:
        return (self._sum + self.prior) / (self._count + 1.0)


# Draft-probability buckets of ``ScoreCalibration`` (upper edges).
SCORE_EDGES = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                        0.95, 0.98, 1.0])


class ScoreCalibration(NodeValues):
    """Acceptance of a draft node as a function of its probability under the
    draft (its path's probability): decayed counts per probability bucket,
    with the bucket's own probability as the prior (worth one
    verification), so an uncalibrated draft is taken at its word and the
    counts correct it (a draft is usually overconfident where the target
    disagrees)."""

    def __init__(self) -> None:
        super().__init__(len(SCORE_EDGES))
        lower = np.concatenate([[0.0], SCORE_EDGES[:-1]])
        self.prior = (lower + SCORE_EDGES) / 2

    @staticmethod
    def classes(scores: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(SCORE_EDGES, np.asarray(scores, dtype=np.float64)),
                          len(SCORE_EDGES) - 1)

    def rate(self) -> np.ndarray:
        return (self.accepted + self.prior) / (self.offered + 1.0)

    def of(self, scores: np.ndarray) -> np.ndarray:
        """Estimated acceptance probability of nodes with these scores."""
        return self.estimate()[self.classes(scores)]


# Multipliers of the measured bar (the cost side of a node's net gain) that
# ``BarTuner`` chooses from; the last (inf) drafts nothing.
BAR_SCALES = (0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0, np.inf)
# Weight of past steps in each scale's realized throughput (per step of any
# scale): a half-life of ~230 steps, a few requests at batch 1.
TUNER_DECAY = 0.997
# Share of steps that try a rival of the best scale; at first more (half of
# the steps, falling as 1 / steps seen towards TUNER_EXPLORE): a load of a few
# hundred steps must learn within them whether its drafts pay (SmolLM2-135M
# at batch 16 on HumanEval: still at 1x, 7% below plain, after 500 steps).
TUNER_EXPLORE = 0.1
TUNER_EARLY_EXPLORE = 0.5
TUNER_EARLY_STEPS = 40.0
# Decayed steps a scale needs before its mean is compared with the best's.
TUNER_MIN_STEPS = 8.0
# A step's realized throughput over a plain step's is clipped to this (an
# idle gap or a stall must not decide alone).
TUNER_MAX_RATIO = 8.0


class BarTuner:
    """Closes the loop on the measured budget: which multiple of the bar
    (``BAR_SCALES``, up to drafting nothing) gives the most tokens per
    second, by the engine's own step times.

    The budget prices nodes by a fitted cost and estimated acceptance; both
    can be off (host time the fit does not see, acceptance that depends on
    the request), and then a default that drafts costs more than it gains,
    or gives up on drafts that paid. Each decode step runs under one scale;
    its realized throughput, tokens produced per request over the step's
    whole time (host time included) relative to a plain decode step of the
    same requests, is credited to that scale. The scale with the best
    decayed mean is used, and on ``TUNER_EXPLORE`` of the steps (more at
    first) one of its rivals (``_rivals``), which takes over once it is ahead
    by more than the noise. Untried rivals are tried first."""

    def __init__(self, seed: int = 0, explore: float = TUNER_EXPLORE) -> None:
        self._rng = np.random.default_rng(seed)
        self._explore = explore
        self._seen = 0  # steps observed
        self._sum = np.zeros(len(BAR_SCALES))
        self._squares = np.zeros(len(BAR_SCALES))
        self._count = np.zeros(len(BAR_SCALES))
        self._best = BAR_SCALES.index(1.0)
        self._pending: int | None = None

    @property
    def means(self) -> np.ndarray:
        """Realized throughput over a plain step's, per scale (nan: untried)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self._count > 0, self._sum / self._count, np.nan)

    @property
    def best_scale(self) -> float:
        return float(BAR_SCALES[self._best])

    def _rivals(self) -> list[int]:
        """The scales tried besides the best: its neighbours, the bar as
        priced (1x) and no drafts at all (so a bar that loses to plain
        decoding stops drafting at once, not a scale at a time)."""
        best = self._best
        return sorted({i for i in (best - 1, best + 1, BAR_SCALES.index(1.0),
                                   len(BAR_SCALES) - 1)
                       if 0 <= i < len(BAR_SCALES) and i != best})

    def choose(self) -> float:
        """The scale of the coming step."""
        rivals = self._rivals()
        untried = [i for i in rivals if self._count[i] < TUNER_MIN_STEPS]
        arm = self._best
        early = TUNER_EARLY_EXPLORE * TUNER_EARLY_STEPS / (TUNER_EARLY_STEPS + self._seen)
        if self._rng.random() < (max(self._explore, early) if self._explore else 0.0):
            arm = int(self._rng.choice(untried or rivals))
        self._pending = arm
        return float(BAR_SCALES[arm])

    def observe(self, ratio: float | None) -> None:
        """The realized throughput of the step of the last ``choose``, over a
        plain step's (None: not measured; the step is credited to no
        scale). A step without a ``choose`` is credited to none either."""
        arm, self._pending = self._pending, None
        if arm is None or ratio is None:
            return
        self._seen += 1
        ratio = min(max(ratio, 0.0), TUNER_MAX_RATIO)
        for sums in (self._sum, self._squares, self._count):
            sums *= TUNER_DECAY
        self._sum[arm] += ratio
        self._squares[arm] += ratio * ratio
        self._count[arm] += 1.0
        best = self._best
        if self._count[best] < TUNER_MIN_STEPS:
            return
        means = self.means
        variance = np.maximum(self._squares / np.maximum(self._count, 1e-12) - means ** 2, 0.0)
        # A neighbour takes over only when it is ahead by more than the
        # standard error of the difference: a step's tokens vary several-fold
        # (one, or a whole accepted path), and on raw means the bar wandered
        # between scales a few percent apart.
        margins = {i: means[i] - means[best] - np.sqrt(variance[i] / self._count[i]
                                                       + variance[best] / self._count[best])
                   for i in self._rivals() if self._count[i] >= TUNER_MIN_STEPS}
        ahead = {i: m for i, m in margins.items() if m > 0}
        if ahead:
            self._best = max(ahead, key=ahead.get)
