"""Oracle tree proposer: a test instrument for the tree runtime.

Knows each request's true greedy continuation (from a reference file made
with plain vLLM) and proposes random trees in which that continuation is
planted to a random depth among decoy branches that can never be accepted.
The runtime must then accept exactly the planted depth every step, and the
output must equal plain vLLM's. Requests it knows nothing of (sampled ones,
or all of them without a reference) get random trees of random tokens, which
on a small vocabulary are often accepted: the sampling-distribution test's
instrument. Configure with ``additional_config={"oracle": {"reference": PATH,
"seed": 0, "log": PATH, "verified_log": PATH}}``: ``reference`` (optional) is
a JSON list of token sequences (prompt followed by the greedy output); each
step appends the planted depths to ``log``, and each verified step a line
``request planted accepted`` per planted request to ``verified_log``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from vllm_lookahead.tree.protocol import (BatchInfo, DraftInputs, Drafts, Predictions,
                                           Verification)


class OracleTreeProposer:
    """A ``tree.protocol.TreeDrafter`` (custom class
    ``vllm_lookahead.proposers.oracle.OracleTreeProposer``)."""

    def __init__(self, vllm_config: Any):
        config = (vllm_config.additional_config or {}).get("oracle")
        if not isinstance(config, dict):
            raise ValueError('OracleTreeProposer needs additional_config["oracle"]')
        self.references: list[list[int]] = []
        if "reference" in config:
            with open(config["reference"], encoding="utf-8") as f:
                self.references = [list(map(int, seq)) for seq in json.load(f)]
        self.k = vllm_config.speculative_config.num_speculative_tokens
        self.vocab = vllm_config.model_config.get_vocab_size()
        self.max_model_len = vllm_config.model_config.max_model_len
        self.rng = np.random.default_rng(config.get("seed", 0))
        self.log_path = config.get("log")
        self.verified_log_path = config.get("verified_log")
        # Planted depth of each request's tree in the last drafts.
        self._planted: dict[str, int] = {}
        self._req_ids: list[str] = []
        self._greedy: list[bool] = []

    def load_model(self, *args, **kwargs) -> None:
        """No model."""

    def bind_batch(self, batch: BatchInfo) -> None:
        self._req_ids = batch.req_ids
        self._greedy = batch.greedy

    def step_started(self) -> None:
        """No timing."""

    # The target's top-k per logits row is not used.
    prediction_ranks = 0

    def observe_predictions(self, predictions: Predictions) -> None:
        """Not used (``prediction_ranks`` 0)."""

    def observe_verification(self, verification: Verification) -> None:
        if not self.verified_log_path:
            return
        lines = [f"{req_id} {self._planted[req_id]} {accepted}\n"
                 for req_id, accepted in zip(verification.req_ids, verification.accepted)
                 if req_id in self._planted]
        with open(self.verified_log_path, "a", encoding="utf-8") as f:
            f.writelines(lines)

    def _continuation(self, history: np.ndarray) -> list[int] | None:
        n = len(history)
        for ref in self.references:
            if len(ref) > n and np.array_equal(ref[:n], history):
                return ref[n:]
        return None

    def _decoy(self, avoid: int | None) -> int:
        while True:
            token = int(self.rng.integers(0, self.vocab))
            if token != avoid:
                return token

    def _tree(self, cont: list[int]) -> tuple[list[int], list[int], int]:
        """Random tree of at most k nodes with ``cont`` planted to a random
        depth; returns (tokens, parents, planted depth)."""
        depth = int(self.rng.integers(0, min(self.k, len(cont) - 1) + 1))
        size = int(self.rng.integers(max(depth, 1), self.k + 1))
        tokens, parents, chain_depth = [], [], []  # chain_depth: -1 for decoys
        planted = 0
        while len(tokens) < size:
            if planted < depth and (self.rng.random() < 0.5 or size - len(tokens) == depth - planted):
                tokens.append(cont[planted])
                parents.append(chain_depth.index(planted - 1) if planted else -1)
                chain_depth.append(planted)
                planted += 1
                continue
            parent = int(self.rng.integers(-1, len(tokens)))
            under = 0 if parent < 0 else chain_depth[parent] + 1
            # Under a planted node (or the root) the decoy must differ from the
            # true next token, so it is never accepted.
            avoid = cont[under] if parent < 0 or chain_depth[parent] >= 0 else None
            tokens.append(self._decoy(avoid))
            parents.append(parent)
            chain_depth.append(-1)
        return tokens, parents, depth

    def _random_tree(self) -> tuple[list[int], list[int]]:
        """k random tokens: the first half children of the root (distinct),
        the rest under random earlier nodes."""
        roots = self.rng.permutation(self.vocab)[: max(1, self.k // 2)].tolist()
        rest = self.k - len(roots)
        tokens = roots + self.rng.integers(0, self.vocab, rest).tolist()
        parents = [-1] * len(roots) + [int(self.rng.integers(-1, len(roots) + i))
                                       for i in range(rest)]
        return tokens, parents

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
                slot_mappings=None) -> list[list[int]]:
        """vLLM's custom-class entry point (the plugin calls ``draft``)."""
        return self.draft(DraftInputs(sampled_token_ids, num_tokens_no_spec,
                                      token_ids_cpu)).tokens

    def draft(self, inputs: DraftInputs) -> Drafts:
        sampled_token_ids = inputs.sampled_token_ids
        num_tokens_no_spec, token_ids_cpu = inputs.num_tokens, inputs.token_ids
        drafts = Drafts.empty(len(sampled_token_ids))
        planted: list[int] = []
        self._planted = {}
        for row, sampled in enumerate(sampled_token_ids):
            cont = None
            if sampled and self._greedy[row]:
                cont = self._continuation(token_ids_cpu[row, : num_tokens_no_spec[row]])
            room = self.max_model_len - int(num_tokens_no_spec[row])
            if not sampled or room <= 0:
                continue
            if cont is not None and len(cont) >= 2:
                tokens, parents, depth = self._tree(cont)
                planted.append(depth)
                self._planted[self._req_ids[row]] = depth
            elif cont is None:
                tokens, parents = self._random_tree()
            else:
                continue
            drafts.tokens[row], drafts.parents[row] = tokens[:room], parents[:room]
        if self.log_path and planted:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(" ".join(map(str, planted)) + "\n")
        return drafts
