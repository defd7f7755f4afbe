"""Typed, validated configuration read from ``additional_config``.

vLLM's ``SpeculativeConfig`` rejects unknown keys, so method parameters live
in ``additional_config["lookahead"]``; a bad value fails at engine start with
the offending key named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

CONFIG_KEY = "lookahead"


class LookaheadConfigError(ValueError):
    """Raised for an invalid ``additional_config["lookahead"]``."""


@dataclass(frozen=True)
class LookaheadConfig:
    """Parameters of the lookahead proposer.

    mode:       "tree": lookahead decoding proper, one target forward per step
                over a tree of the Jacobi lookahead branch (window x
                (ngram - 1) levels) and up to ``guesses`` pool candidates,
                verified by the tree runtime; "linear": one chain per request
                from the pool, verified by vLLM's own rejection sampler.
    window:     W, columns of the Jacobi lookahead branch (tree mode).
    guesses:    G, pool candidates verified per step (tree mode).
    pool_from_prompt: also fill the pool with the prompt's n-grams (tree
                mode; linear mode always does).
    budget:     "measured" (tree mode): verify a node only where it pays:
                the engine's step time is fitted online against the tokens it
                schedules, and a window column or candidate depth is kept
                while its measured acceptance rate exceeds the tokens the
                engine would produce in the time the node costs (so trees
                shrink as the batch grows, and to nothing where they do not
                pay); "static": always the full W x (N-1) + G tree, within
                the caps below.
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
    adaptive:   size each request's draft from its last acceptance: after a
                fully accepted draft allow twice as many tokens (up to
                num_speculative_tokens), otherwise one more than were
                accepted. Rejected draft tokens cost target compute, so this
                keeps the verified batch small where guesses fail.
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
    adaptive: bool = True

    def __post_init__(self) -> None:
        def integer(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                kind = "a positive" if minimum else "a non-negative"
                raise LookaheadConfigError(
                    f'additional_config["{CONFIG_KEY}"]["{name}"] must be '
                    f"{kind} integer, got {value!r}"
                )

        if self.mode not in ("tree", "linear"):
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["mode"] must be "tree" or '
                f'"linear", got {self.mode!r}'
            )
        if self.budget not in ("measured", "static"):
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["budget"] must be "measured" '
                f'or "static", got {self.budget!r}'
            )
        if self.ngram is None:
            object.__setattr__(self, "ngram", 3 if self.mode == "tree" else 4)
        if self.key_len is None and isinstance(self.ngram, int):
            default = 1 if self.mode == "tree" else 2
            object.__setattr__(self, "key_len", max(1, min(default, self.ngram - 1)))
        for name in ("window", "ngram", "key_len", "capacity", "buckets", "ways"):
            integer(name, 1)
        for name in ("guesses", "max_tree_tokens"):
            integer(name, 0)
        if self.ngram < 2:
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["ngram"] must be >= 2, '
                f"got {self.ngram}"
            )
        if self.key_len >= self.ngram:
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["key_len"] ({self.key_len}) '
                f'must be smaller than "ngram" ({self.ngram})'
            )
        if self.buckets & (self.buckets - 1) or self.buckets < self.ways:
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["buckets"] must be a power of '
                f'two >= "ways" ({self.ways}), got {self.buckets}'
            )
        if self.ways & (self.ways - 1):
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"]["ways"] must be a power of '
                f"two, got {self.ways}"
            )
        for name in ("shared_pool", "adaptive", "pool_from_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise LookaheadConfigError(
                    f'additional_config["{CONFIG_KEY}"]["{name}"] must be a '
                    f"boolean, got {getattr(self, name)!r}"
                )

    @classmethod
    def from_dict(cls, raw: Any) -> LookaheadConfig:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise LookaheadConfigError(
                f'additional_config["{CONFIG_KEY}"] must be a JSON object, '
                f"got {type(raw).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LookaheadConfigError(
                f'unknown key(s) in additional_config["{CONFIG_KEY}"]: '
                f"{', '.join(unknown)}; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> LookaheadConfig:
        additional = vllm_config.additional_config or {}
        if not isinstance(additional, dict):
            return cls()
        return cls.from_dict(additional.get(CONFIG_KEY))
