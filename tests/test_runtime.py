"""The tree runtime without an engine: what it does to a step's positions,
attention rows and KV cache, and exactly what it hands back to the drafter
(``Verification``), on a hand-built batch of a tree request and a chain
request over vLLM's CPU cache layout."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_lookahead import reference
from vllm_lookahead.tree import sampling
from vllm_lookahead.tree.backends import CpuVecAdapter, LbnhcAdapter, adapter_for
from vllm_lookahead.tree.protocol import Drafts
from vllm_lookahead.tree.runtime import BatchSampling, TreeRuntime, TreeRuntimeError

BLOCK, HEADS, KV_HEADS, D, LAYERS, VOCAB = 16, 2, 1, 8, 2, 64


class RecordingDrafter:
    def __init__(self, prediction_ranks=0):
        self.verifications = []
        self.predictions = []
        self.prediction_ranks = prediction_ranks

    def bind_batch(self, batch):
        pass

    def draft(self, inputs):
        raise AssertionError("not called")

    def step_started(self):
        pass

    def observe_verification(self, verification):
        self.verifications.append(verification)

    def observe_predictions(self, predictions):
        self.predictions.append(predictions)


def sampled_params(seed):
    return SimpleNamespace(temperature=1.0, seed=seed, top_k=0, top_p=1.0)


class Batch:
    """Two requests: "t" at row 0 with a tree, "c" at row 1 with a chain,
    their roots at positions ``roots``; one step's inputs as vLLM prepares
    them (flat positions, slots from the block table, KV written)."""

    def __init__(self, adapter, tree_tokens, tree_parents, chain_tokens, roots=(21, 5),
                 layout="cpu"):
        gen = torch.Generator().manual_seed(0)
        self.adapter = adapter
        self.tokens = [tree_tokens, chain_tokens]
        self.parents = [tree_parents, None]
        self.roots = np.array(roots)
        sizes = [len(tree_tokens), len(chain_tokens)]
        self.query_start = np.concatenate([[0], np.cumsum([n + 1 for n in sizes])])
        self.block_table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
        positions = np.concatenate([np.arange(r, r + n + 1) for r, n in zip(roots, sizes)])
        owner = np.repeat([0, 1], [n + 1 for n in sizes])
        self.positions = torch.from_numpy(positions.copy())
        self.slot_mapping = (self.block_table[owner, positions // BLOCK].long() * BLOCK
                             + torch.from_numpy(positions % BLOCK))
        shape = ((6, KV_HEADS, BLOCK, 2 * D) if layout == "cpu"
                 else (6, BLOCK, KV_HEADS, 2 * D))
        caches = [torch.randn(*shape, generator=gen) for _ in range(LAYERS)]
        self.kv_caches = caches if layout == "cpu" else [c.transpose(1, 2) for c in caches]
        tokens = len(positions)
        self.query = torch.randn(tokens, HEADS, D, generator=gen)
        self.keys = [torch.randn(tokens, KV_HEADS, D, generator=gen) for _ in range(LAYERS)]
        self.values = [torch.randn(tokens, KV_HEADS, D, generator=gen) for _ in range(LAYERS)]
        for cache, k, v in zip(self.kv_caches, self.keys, self.values):
            key_cache, value_cache = adapter.cache_views(cache)
            s = self.slot_mapping
            key_cache[s // BLOCK, s % BLOCK] = k
            value_cache[s // BLOCK, s % BLOCK] = v
        self.node_rows = [np.arange(self.query_start[b] + 1, self.query_start[b + 1])
                          for b in range(2)]

    def begin(self, runtime, sampling_rows=None):
        runtime.set_drafts(["t", "c"], Drafts(self.tokens, self.parents))
        return runtime.begin_step(
            req_ids=["t", "c"], scheduled_drafts={"t": self.tokens[0], "c": self.tokens[1]},
            sampling_rows=sampling_rows or BatchSampling.all_greedy(2),
            num_computed=self.roots, query_start=self.query_start, positions=self.positions,
            slot_mapping=self.slot_mapping, block_table=self.block_table,
            kv_caches=self.kv_caches)

    def attend(self, runtime):
        for layer in range(LAYERS):
            out = torch.zeros_like(self.query)
            runtime.attend(self.adapter, self.query, self.keys[layer], self.values[layer],
                           self.kv_caches[layer], D ** -0.5, out)
        return out

    def logits(self, argmax_per_row):
        """Logits whose argmax at each row is ``argmax_per_row``."""
        logits = torch.zeros(len(argmax_per_row), VOCAB)
        logits[torch.arange(len(argmax_per_row)), torch.tensor(argmax_per_row)] = 5.0
        return logits

    def draft_tokens(self):
        return torch.tensor(self.tokens[0] + self.tokens[1], dtype=torch.int32)


TREE = dict(tree_tokens=[10, 11, 12, 13], tree_parents=[-1, 0, -1, 2], chain_tokens=[40, 41])
# Per row (root, then nodes): "t" takes 12 -> 13, bonus 20; "c" takes 40, bonus 50.
ARGMAX = [12, 30, 31, 13, 20, 40, 50, 51]


@pytest.mark.parametrize("adapter, layout", [(CpuVecAdapter(), "cpu"),
                                             (LbnhcAdapter(), "lbnhc")])
def test_step_positions_attention_verification_and_compaction(adapter, layout):
    drafter = RecordingDrafter()
    runtime = TreeRuntime(drafter)
    batch = Batch(adapter, layout=layout, **TREE)
    step = batch.begin(runtime)

    # Tree nodes sit at root + depth; the chain keeps its flat positions.
    assert batch.positions[batch.node_rows[0]].tolist() == [22, 23, 22, 23]
    assert batch.positions[batch.node_rows[1]].tolist() == [6, 7]
    assert step.depths.tolist() == [1, 2, 1, 2]

    # The tree rows attend over their prefix (positions 0..21) plus their
    # ancestors: node 3 sees nodes 2 and 3, not nodes 0 and 1.
    out = batch.attend(runtime)
    assert runtime.self_checked
    rows = torch.from_numpy(batch.node_rows[0])
    key_cache, value_cache = adapter.cache_views(batch.kv_caches[-1])
    want = reference.tree_attention(
        batch.query[rows], batch.keys[-1][rows], batch.values[-1][rows], key_cache,
        value_cache, batch.block_table[:1], torch.tensor([22], dtype=torch.int32),
        torch.tensor([0, 4], dtype=torch.int32), step.masks, D ** -0.5)
    torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)
    assert not out[torch.from_numpy(batch.node_rows[1])].any()  # chains: vLLM's rows

    node_keys = [k[rows].clone() for k in batch.keys]
    sampled = runtime.accept_and_compact(batch.draft_tokens(), [4, 2], batch.logits(ARGMAX))
    assert sampled.tolist() == [[12, 13, 20, -1, -1], [40, 50, -1, -1, -1]]
    assert runtime.current is None

    (v,) = drafter.verifications
    assert v.req_ids == ["t", "c"]
    assert v.node_argmax(0).tolist() == [30, 31, 13, 20]
    assert v.node_argmax(1).tolist() == [50, 51]
    assert v.argmax[v.cu_rows[:-1]].tolist() == [12, 40]  # the roots' rows
    assert v.accepted.tolist() == [2, 1]
    assert v.accepted_path(0).tolist() == [2, 3]
    assert v.accepted_path(1).tolist() == [0]

    # The accepted path's KV now sits at positions 22, 23 in every layer.
    node_slots = batch.slot_mapping[rows]
    for cache, keys in zip(batch.kv_caches, node_keys):
        kc, _ = adapter.cache_views(cache)
        got = kc[node_slots[:2] // BLOCK, node_slots[:2] % BLOCK]
        assert torch.equal(got, keys[[2, 3]])


def test_sampled_targets_are_drawn_at_the_nodes_positions():
    """A sampled request's target token at each node is the position-keyed
    sample for the position the node predicts (root + depth + 1): a chain
    of those samples is accepted whole, a wrong depth would reject it."""
    seed, root = 1234, 21
    flat = torch.zeros(1, VOCAB)
    draw = lambda position: int(sampling.sample_rows(
        flat, torch.ones(1), None, None,
        sampling.position_uniforms(np.array([seed], np.uint64), np.array([position])))[0])
    chain = [draw(root + d) for d in (1, 2, 3)]
    decoy = (chain[0] + 1) % VOCAB
    drafter = RecordingDrafter()
    runtime = TreeRuntime(drafter)
    batch = Batch(CpuVecAdapter(), tree_tokens=[decoy] + chain, tree_parents=[-1, -1, 1, 2],
                  chain_tokens=[40, 41])
    batch.begin(runtime, runtime.batch_sampling(
        ["t", "c"], [sampled_params(seed), SimpleNamespace(temperature=0.0, seed=None,
                                                           top_k=0, top_p=1.0)]))
    batch.attend(runtime)
    logits = torch.zeros(8, VOCAB)
    logits[5:] = batch.logits(ARGMAX[5:])  # the greedy chain request
    sampled = runtime.accept_and_compact(batch.draft_tokens(), [4, 2], logits)
    assert sampled[0, :3].tolist() == chain
    assert sampled[0, 3].item() == draw(root + 4)
    assert drafter.verifications[0].accepted_path(0).tolist() == [1, 2, 3]


class SwappedAdapter(CpuVecAdapter):
    """Reads values where the keys are: a wrong layout of the right shape."""

    name = "wrong layout"

    def cache_views(self, kv_cache):
        keys, values = super().cache_views(kv_cache)
        return values, keys


def test_self_check_stops_a_wrong_layout_before_any_token():
    runtime = TreeRuntime(RecordingDrafter())
    batch = Batch(CpuVecAdapter(), **TREE)
    batch.adapter = SwappedAdapter()
    batch.begin(runtime)
    with pytest.raises(TreeRuntimeError, match="layout"):
        batch.attend(runtime)


class OffByOneAdapter(CpuVecAdapter):
    """Right layout, wrong attention (drops the last prefix token)."""

    name = "off by one"

    def attend(self, query, tree_key, tree_value, kv_cache, block_table, prefix_lens,
               cu_nodes, masks, scale):
        return super().attend(query, tree_key, tree_value, kv_cache, block_table,
                              prefix_lens - 1, cu_nodes, masks, scale)


def test_self_check_compares_attention_with_the_reference():
    runtime = TreeRuntime(RecordingDrafter())
    batch = Batch(CpuVecAdapter(), **TREE)
    batch.adapter = OffByOneAdapter()
    batch.begin(runtime)
    with pytest.raises(TreeRuntimeError, match="self-check failed"):
        batch.attend(runtime)


def test_drafts_are_checked():
    with pytest.raises(ValueError, match="before its child"):
        Drafts([[1, 2]], [[-1, 1]])
    with pytest.raises(ValueError, match="2 tokens but 1 parents"):
        Drafts([[1, 2]], [[-1]])


def test_adapters_by_backend():
    assert isinstance(adapter_for("CPU_ATTN", "vec"), CpuVecAdapter)
    assert isinstance(adapter_for("CPU_ATTN", "vec16"), CpuVecAdapter)
    for backend in ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"):
        assert isinstance(adapter_for(backend), LbnhcAdapter)
    with pytest.raises(NotImplementedError, match="'amx'.*block_size=16"):
        adapter_for("CPU_ATTN", "amx")
    with pytest.raises(NotImplementedError, match="FLASHINFER.*FLASH_ATTN"):
        adapter_for("FLASHINFER")


def test_predictions_are_the_top_k_of_every_row():
    """With ``prediction_ranks`` the drafter gets every logits row's top-k
    next to its input token: on tree steps inside the Verification (rows as
    in ``argmax``, ``accepted_rows`` the verified text's), on steps vLLM's
    sampler verified through ``observe_predictions``; with 0 no top-k."""
    drafter = RecordingDrafter(prediction_ranks=3)
    runtime = TreeRuntime(drafter)
    batch = Batch(CpuVecAdapter(), **TREE)
    batch.begin(runtime)
    batch.attend(runtime)
    logits = batch.logits(ARGMAX) + torch.linspace(0, 1, VOCAB)  # ties broken upwards
    inputs = torch.tensor([5, 10, 11, 12, 13, 6, 40, 41], dtype=torch.int32)
    runtime.accept_and_compact(batch.draft_tokens(), [4, 2], logits, inputs)
    (v,) = drafter.verifications
    p = v.predictions
    assert p.input_tokens.tolist() == inputs.tolist()
    assert p.topk[:, 0].tolist() == ARGMAX
    assert p.topk[:, 1:].tolist() == [[VOCAB - 1, VOCAB - 2]] * 8
    # Roots and accepted nodes: "t" rows 0, 3, 4 (nodes 2, 3), "c" rows 5, 6.
    assert v.accepted_rows().tolist() == [0, 3, 4, 5, 6]

    runtime.observe_sampled_step(logits[:2], inputs[:2])
    (q,) = drafter.predictions
    assert q.topk.tolist() == p.topk[:2].tolist()

    quiet = RecordingDrafter()
    runtime = TreeRuntime(quiet)
    runtime.observe_sampled_step(logits, inputs)
    assert quiet.predictions == [] and runtime.predictions(logits, inputs) is None


def test_draft_tree_forward_gives_the_draft_layers_tree_rows():
    """Stage 2 of the staged cascade: one draft forward with a guess tree
    gets the same tree rows as a target step (prefix plus ancestors), its
    own self-check, and no step outside the ``with``; never inside a
    target step."""
    adapter = CpuVecAdapter()
    runtime = TreeRuntime(RecordingDrafter())
    batch = Batch(adapter, **TREE)
    rows = batch.node_rows[0]
    with runtime.draft_tree_forward(
            rows=np.array([0]), parents=[np.array(TREE["tree_parents"])], node_rows=rows,
            prefix_lens=np.array([22]), node_slots=batch.slot_mapping[torch.from_numpy(rows)],
            block_table=batch.block_table[:1]) as step:
        assert runtime.current is step and step.model == "draft"
        assert step.depths.tolist() == [1, 2, 1, 2]
        out = batch.attend(runtime)
    assert runtime.current is None
    assert "draft" in runtime._checked and not runtime.self_checked
    key_cache, value_cache = adapter.cache_views(batch.kv_caches[-1])
    want = reference.tree_attention(
        batch.query[rows], batch.keys[-1][rows], batch.values[-1][rows], key_cache,
        value_cache, batch.block_table[:1], torch.tensor([22], dtype=torch.int32),
        torch.tensor([0, 4], dtype=torch.int32), step.masks, D ** -0.5)
    torch.testing.assert_close(out[torch.from_numpy(rows)], want, atol=1e-5, rtol=1e-5)
    batch.begin(runtime)
    with pytest.raises(TreeRuntimeError, match="inside a target tree step"):
        with runtime.draft_tree_forward(np.array([0]), [np.array([-1])], rows[:1],
                                        np.array([22]), batch.slot_mapping[:1],
                                        batch.block_table[:1]):
            pass
