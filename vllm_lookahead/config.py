"""Typed, validated configuration read from ``additional_config``.

vLLM's ``SpeculativeConfig`` rejects unknown keys, so method parameters live
in ``additional_config["lookahead"]`` (lookahead proposer) and
``additional_config["staged"]`` (staged draft cascade); a bad value fails at
engine start with the offending key named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

CONFIG_KEY = "lookahead"
STAGED_KEY = "staged"


class LookaheadConfigError(ValueError):
    """Raised for an invalid ``additional_config["lookahead"]`` or
    ``additional_config["staged"]``."""


class _AdditionalConfig:
    """Reading and key checking shared by the ``additional_config`` sections."""

    key: str

    def _integer(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive" if minimum else "a non-negative"
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["{name}"] must be {kind} integer, '
                f"got {value!r}")

    def _boolean(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["{name}"] must be a boolean, '
                f"got {getattr(self, name)!r}")

    def _budget(self) -> None:
        if self.budget not in ("measured", "static"):
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["budget"] must be "measured" '
                f'or "static", got {self.budget!r}')

    def _pool_sizes(self) -> None:
        """The n-gram pool keys shared by both sections."""
        for name in ("ngram", "key_len", "capacity", "buckets", "ways"):
            self._integer(name, 1)
        if self.ngram < 2:
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["ngram"] must be >= 2, got {self.ngram}')
        if self.key_len >= self.ngram:
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["key_len"] ({self.key_len}) must be '
                f'smaller than "ngram" ({self.ngram})')
        if self.buckets & (self.buckets - 1) or self.buckets < self.ways:
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["buckets"] must be a power of two '
                f'>= "ways" ({self.ways}), got {self.buckets}')
        if self.ways & (self.ways - 1):
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["ways"] must be a power of two, '
                f"got {self.ways}")

    @classmethod
    def from_dict(cls, raw: Any):
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise LookaheadConfigError(
                f'additional_config["{cls.key}"] must be a JSON object, '
                f"got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LookaheadConfigError(
                f'unknown key(s) in additional_config["{cls.key}"]: '
                f"{', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**raw)

    @classmethod
    def section(cls, vllm_config: Any) -> Any:
        """The raw section of ``vllm_config.additional_config`` (None if absent)."""
        additional = vllm_config.additional_config or {}
        return additional.get(cls.key) if isinstance(additional, dict) else None

    @classmethod
    def from_vllm_config(cls, vllm_config: Any):
        return cls.from_dict(cls.section(vllm_config))


@dataclass(frozen=True)
class LookaheadConfig(_AdditionalConfig):
    """Parameters of the lookahead proposer.

    mode:       "tree": lookahead decoding proper, one target forward per step
                over a tree of the Jacobi lookahead branch (window x
                (ngram - 1) levels) and up to ``guesses`` pool candidates,
                verified by the tree runtime; "linear": one chain per request
                from the pool, verified by vLLM's own rejection sampler.
    window:     W, columns of the Jacobi lookahead branch (tree mode; 0: no
                lookahead branch, e.g. token recycling alone).
    guesses:    G, pool candidates verified per step (tree mode).
    pool_from_prompt: also fill the pool with the prompt's n-grams (tree
                mode; linear mode always does).
    budget:     "measured": verify a node only where it pays: the engine's
                step time is fitted online against the tokens it schedules,
                and a window column or candidate depth (linear mode: a chain
                depth) is kept while its measured acceptance rate exceeds the
                tokens the engine would produce in the time the node costs (so
                drafts shrink as the batch grows, and to nothing where they
                do not pay); "static": always the full W x (N-1) + G tree (the
                whole chain), within the caps below.
    max_tree_tokens: hard cap on tree nodes per engine step over the whole
                batch (tree mode); each request gets at most
                num_speculative_tokens, and W and G shrink as more requests
                share the cap (0: no batch cap).
    ngram:      n-gram length N stored in the pool (key + continuation); the
                window has N - 1 levels. Default 3 in tree mode, 4 in linear.
    key_len:    tokens of context used as the pool key (the last k tokens);
                default 1 in tree mode (the paper's), 2 in linear mode
                (measured best there, benchmarks/sweep_linear.py), at most
                ngram - 1.
    capacity:   continuations kept per key (most recent first; older evicted).
    buckets:    keys kept per request (power of two; least recently
                inserted key evicted when its set is full).
    ways:       associativity of the key table.
    shared_pool: also keep one pool shared by all requests (system prompts,
                common code), consulted after the request's own pool.
    recycle:    token recycling (tree mode, arXiv 2408.08696): keep the
                target's top ``recycle_ranks`` next tokens after every token
                it saw as input, from every forward, in one table shared by
                all requests (vocab_size x recycle_ranks x 4 bytes), and
                draft a tree of ``recycle_nodes`` nodes read from it from the
                last token (the likeliest paths by successor rank, at most
                ``recycle_depth`` deep), merged with the pool candidates into
                one trie. The table is shared, so with sampled requests a
                request's tree steps (and with a seed its tokens) depend on
                what else the engine ran; greedy outputs never do.
    recycle_ranks, recycle_nodes, recycle_depth: see ``recycle``.
    chain:      tree mode: also offer, as one more branch of the tree, the
                ``chain`` tokens that followed the earliest earlier occurrence
                of the longest suffix (1 to 3 tokens) of the request's text
                (prompt lookup, vLLM ``ngram``'s match); each of its depths is
                priced by the measured budget like any other node (0: off).
    adaptive:   size each request's draft from its last acceptance: after a
                fully accepted draft allow twice as many tokens (up to
                num_speculative_tokens), otherwise one more than were
                accepted. Rejected draft tokens cost target compute, so this
                keeps the verified batch small where guesses fail.
    shared_text: tree mode with ``chain``: tokens of earlier requests' text
                (prompt and output) kept in a ring with an n-gram index,
                where a request whose own text has no long context match
                finds one (``proposers.shared_text``); its chains are priced
                apart from the request's own. 0: off.
    tune_bar:   with the measured budget: scale the bar by the multiple
                (0.35x .. 4x, or no drafts) that gives the most tokens per
                second in the engine's own step times, tried online
                (``budget.BarTuner``); False: the bar as the budget prices it.
    """

    mode: str = "tree"
    window: int = 3
    guesses: int = 3
    pool_from_prompt: bool = True
    budget: str = "measured"
    max_tree_tokens: int = 64
    ngram: int | None = None
    key_len: int | None = None
    capacity: int = 4
    buckets: int = 2048
    ways: int = 4
    shared_pool: bool = False
    recycle: bool = True
    recycle_ranks: int = 8
    recycle_nodes: int = 48
    recycle_depth: int = 8
    chain: int = 8
    adaptive: bool = True
    shared_text: int = 65536
    tune_bar: bool = True

    key: ClassVar[str] = CONFIG_KEY

    def __post_init__(self) -> None:
        if self.mode not in ("tree", "linear"):
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["mode"] must be "tree" or '
                f'"linear", got {self.mode!r}'
            )
        self._budget()
        if self.ngram is None:
            object.__setattr__(self, "ngram", 3 if self.mode == "tree" else 4)
        if self.key_len is None and isinstance(self.ngram, int):
            default = 1 if self.mode == "tree" else 2
            object.__setattr__(self, "key_len", max(1, min(default, self.ngram - 1)))
        for name in ("window", "guesses", "max_tree_tokens", "chain", "shared_text"):
            self._integer(name, 0)
        self._pool_sizes()
        for name in ("shared_pool", "adaptive", "pool_from_prompt", "recycle", "tune_bar"):
            self._boolean(name)
        for name in ("recycle_ranks", "recycle_nodes", "recycle_depth"):
            self._integer(name, 1)


@dataclass(frozen=True)
class StagedConfig(_AdditionalConfig):
    """Parameters of the staged draft cascade (``method: "draft_model"`` plus
    ``additional_config["staged"]``; ``proposers/staged.py``).

    tree:       True: a token tree per request (the draft's greedy chain plus
                its likeliest alternatives, up to num_speculative_tokens
                nodes), verified by the tree runtime; False: the greedy chain
                alone (linear), to compare with vLLM's own draft_model.
    depth:      longest greedy chain the draft extends per step (default:
                num_speculative_tokens). In tree mode the chain stops early
                once num_speculative_tokens nodes are likelier than its next
                node.
    children:   tokens of the draft's distribution considered at each depth
                (the greedy one and children - 1 alternatives, tree mode).
    stage2:     speed up the draft itself: each draft forward also verifies
                guesses of the draft's own greedy chain, so one forward can
                extend the chain by several tokens (the chain is unchanged:
                exactly the draft's greedy tokens). "ngram" (or True): one
                guess, the continuation of its last token in an n-gram pool
                of the request's tokens and the draft's chains; "lookahead":
                lookahead decoding of the draft, a token tree of the draft's
                own Jacobi iteration (its predictions past a wrong guess
                token, or past the nodes the target was not given last step)
                and up to ``guesses`` pool continuations, verified in the
                draft forward by tree attention (a chain, the likelier of
                the two, where the draft's attention has no tree adapter);
                "off" (or False): none.
    guesses:    pool continuations in a stage-2 "lookahead" guess tree.
    ngram, key_len, capacity, buckets, ways: the stage-2 pool, as in
                ``additional_config["lookahead"]``.
    budget:     "measured": draft only what pays, per step and request: the
                target's step time and the draft's forward time are fitted
                online, each draft node's acceptance is estimated from its
                draft probability (calibrated on the verified steps), and a
                draft round runs while the nodes it adds are worth more than
                it costs; a node is verified only if its acceptance beats the
                tokens the engine would produce in the time it costs (so the
                cascade drafts less as the batch grows, and nothing where it
                does not pay); "static": the full chain and tree every step.
    """

    key: ClassVar[str] = STAGED_KEY

    tree: bool = True
    depth: int | None = None
    children: int = 4
    stage2: str | bool = "ngram"
    guesses: int = 3
    ngram: int = 4
    key_len: int = 1
    capacity: int = 4
    buckets: int = 1024
    ways: int = 4
    budget: str = "measured"

    def __post_init__(self) -> None:
        self._boolean("tree")
        if isinstance(self.stage2, bool):
            object.__setattr__(self, "stage2", "ngram" if self.stage2 else "off")
        if self.stage2 not in ("lookahead", "ngram", "off"):
            raise LookaheadConfigError(
                f'additional_config["{self.key}"]["stage2"] must be "lookahead", "ngram", '
                f'"off" or a bool, got {self.stage2!r}')
        self._budget()
        if self.depth is not None:
            self._integer("depth", 1)
        self._integer("children", 1)
        self._integer("guesses", 1)
        self._pool_sizes()
