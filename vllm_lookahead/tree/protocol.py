"""The typed interface between proposers and the tree runtime.

A proposer that drafts token trees implements :class:`TreeDrafter`. Per
engine step the model runner (``vllm_lookahead.vllm.model_runner``) calls, in
this order:

1. ``bind_batch(BatchInfo)``: which request each batch row is, and what the
   step that just ran scheduled;
2. ``draft(DraftInputs) -> Drafts``: the drafts of every row, a chain or a
   tree (``parents``) each;
3. ``step_started()``: the next target forward starts (for step timing);
4. ``observe_verification(Verification)``: what the target predicted at
   every node of the drafts the runtime verified as trees, and the accepted
   path of every request; on steps without a tree (vLLM's sampler verified
   them), ``observe_predictions(Predictions)`` instead, when the drafter
   asks for the target's top-k (``prediction_ranks`` > 0).

Nothing passes between them through attributes or module state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


class DraftForward(Protocol):
    """A forward of the draft model over its KV cache (staged cascade)."""

    def __call__(self, rows: np.ndarray, starts: np.ndarray, tokens: list[np.ndarray],
                 num_logits: np.ndarray,
                 parents: list[np.ndarray | None] | None = None) -> torch.Tensor:
        """Feed ``tokens[i]`` to batch row ``rows[i]`` from position
        ``starts[i]`` (KV to the slots of positions ``starts[i]`` on) and
        return the logits of each row's last ``num_logits[i]`` tokens,
        concatenated. ``parents[i]`` (only where ``DraftModel.trees``): the
        last ``len(parents[i])`` tokens of row i are a token tree, each
        node's parent a tree-local index (-1: the token before the tree);
        a node attends to the tokens before the tree and its ancestors and
        sits at that token's position plus its depth (its KV still goes to
        the slot of its index in ``tokens[i]``)."""
        ...


@dataclass(frozen=True)
class BatchInfo:
    """The batch of the coming ``draft`` call, one entry per row."""

    req_ids: list[str]
    greedy: list[bool]
    # Whether the runtime verifies this batch's trees (else drafts are
    # verified as chains by vLLM's rejection sampler: a tree is cut to its
    # first chain by the drafter).
    trees_verified: bool
    prompt_lens: list[int]
    extra_args: list[dict[str, Any] | None]
    # Tokens the step that just ran scheduled (its forward's size).
    scheduled_tokens: int
    # Per row: the request's max_tokens (None: up to max_model_len); the
    # staged cascade's budget reads a request's prompt into the draft only
    # if the tokens it has left can pay for it. None: all unbounded.
    max_tokens: list[int | None] | None = None
    # Of ``scheduled_tokens``, those of prompt chunks (the step-cost fit
    # prices them apart from decode tokens).
    prefill_tokens: int = 0


@dataclass(frozen=True)
class DraftModel:
    """The draft model of vLLM's ``draft_model`` method (staged cascade):
    KV positions each row has slots for, and a forward over its KV cache."""

    kv_capacity: np.ndarray  # int64 [rows]
    forward: DraftForward
    # Whether ``forward`` takes token trees (tree attention in the draft).
    trees: bool = False


@dataclass(frozen=True)
class DraftInputs:
    """What vLLM knows of every row after a step."""

    sampled_token_ids: list[list[int]]  # tokens the step produced per row
    num_tokens: np.ndarray  # verified tokens per row
    token_ids: np.ndarray  # [max_rows, max_model_len]: row r's tokens
    draft_model: DraftModel | None = None


@dataclass(frozen=True)
class Drafts:
    """Per row: draft tokens, and the parent of each (request-local index,
    -1: a child of the last verified token, parents before children), or
    None for a chain."""

    tokens: list[list[int]]
    parents: list[list[int] | None]

    @classmethod
    def empty(cls, rows: int) -> Drafts:
        return cls([[] for _ in range(rows)], [None] * rows)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} token lists but {len(self.parents)} "
                             "parent lists")
        for row, (tokens, parents) in enumerate(zip(self.tokens, self.parents)):
            if parents is None:
                continue
            if len(parents) != len(tokens):
                raise ValueError(f"row {row}: {len(tokens)} tokens but {len(parents)} parents")
            if any(not -1 <= p < i for i, p in enumerate(parents)):
                raise ValueError(f"row {row}: a parent must come before its child: {parents}")


@dataclass(frozen=True)
class Predictions:
    """The target's top-k next tokens at every logits row of a step: after
    the row's input token ``input_tokens[i]`` (in the row's context) the
    target ranks ``topk[i, 0]`` first, ``topk[i, 1]`` second, ... Rows of
    rejected tree nodes count too: their context is a real prefix of the
    tree."""

    input_tokens: np.ndarray  # int32 [rows]
    topk: np.ndarray  # int32 [rows, prediction_ranks]


@dataclass(frozen=True)
class Verification:
    """What the target predicted on a step the runtime verified. Request i
    (``req_ids[i]``, batch row i) owns logits rows ``cu_rows[i]:cu_rows[i+1]``:
    its root (the last verified token), then one row per draft node in draft
    order; ``argmax`` is the target's argmax at every row. ``accepted[i]``
    draft tokens were accepted, along the request-local nodes
    ``path[i, :accepted[i]]``."""

    req_ids: list[str]
    argmax: np.ndarray  # int32 [rows]
    cu_rows: np.ndarray  # int64 [batch + 1]
    accepted: np.ndarray  # int64 [batch]
    path: np.ndarray  # int64 [batch, max_draft], -1 padded
    # Every row's top-k (rows as in ``argmax``), when the drafter asks for it.
    predictions: Predictions | None = None

    def node_argmax(self, i: int) -> np.ndarray:
        """The target's argmax after each of request i's draft nodes."""
        return self.argmax[self.cu_rows[i] + 1:self.cu_rows[i + 1]]

    def accepted_path(self, i: int) -> np.ndarray:
        return self.path[i, :self.accepted[i]]

    def accepted_rows(self) -> np.ndarray:
        """Logits rows of every request's root and accepted nodes (their
        contexts are the verified text)."""
        rows = [self.cu_rows[i] + np.concatenate([[0], 1 + self.accepted_path(i)])
                for i in range(len(self.req_ids))]
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)


@runtime_checkable
class TreeDrafter(Protocol):
    """A proposer whose drafts the tree runtime verifies. ``prediction_ranks``:
    how many of the target's top tokens per logits row it wants
    (``Predictions``; 0: none, no top-k is computed)."""

    prediction_ranks: int

    def bind_batch(self, batch: BatchInfo) -> None: ...

    def draft(self, inputs: DraftInputs) -> Drafts: ...

    def step_started(self) -> None: ...

    def observe_verification(self, verification: Verification) -> None: ...

    def observe_predictions(self, predictions: Predictions) -> None: ...
