"""Sampling on token trees preserves the target distribution.

Unit level: the position-keyed sampler draws from softmax(top-k/top-p(logits
/ T)) exactly as vLLM does. End to end, on a random tiny model with a
32-token vocabulary: the distribution of the tokens verified on random trees
matches plain vLLM sampling (two-sample chi-square per position, every
p > ALPHA) for random trees, lookahead trees and staged draft-model trees, a
deliberately wrong acceptor fails the same test, and a seed fixes the output
whatever the batch around it.
"""

import numpy as np
import pytest
import torch

from vllm_lookahead.tree import sampling


def chi_square_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """p-value of the two-sample chi-square test that counts ``a`` and ``b``
    (over the same categories) come from one distribution; categories with
    fewer than 10 observations in all are pooled."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    small = (a + b) < 10
    a = np.append(a[~small], a[small].sum())
    b = np.append(b[~small], b[small].sum())
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    total = a.sum() + b.sum()
    expected_a = (a + b) * a.sum() / total
    expected_b = (a + b) * b.sum() / total
    stat = ((a - expected_a) ** 2 / expected_a).sum() + ((b - expected_b) ** 2 / expected_b).sum()
    dof = len(a) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_position_uniforms_are_deterministic_and_uniform():
    seeds = np.full(20000, 7, dtype=np.uint64)
    positions = np.arange(20000)
    u = sampling.position_uniforms(seeds, positions)
    assert torch.equal(u, sampling.position_uniforms(seeds, positions))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    counts = np.histogram(u.numpy(), bins=20, range=(0, 1))[0]
    assert chi_square_p_value(counts, np.full(20, 1000)) > 0.01
    other = sampling.position_uniforms(np.full(20000, 8, dtype=np.uint64), positions)
    assert not torch.equal(u, other)


@pytest.mark.parametrize("seed", range(10))
def test_top_k_top_p_match_vllm(seed):
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 50, generator=gen) * 3
    logits[:, 7] = logits[:, 3]  # a tie
    top_k = torch.randint(1, 51, (16,), generator=gen)
    top_p = torch.rand(16, generator=gen) * 0.9 + 0.1
    ours = sampling.apply_top_k_top_p(logits.clone(), top_k, top_p)
    theirs = apply_top_k_top_p_pytorch(logits.clone(), top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_rejection_sampler_expands_sampling_parameters_per_draft_token(dtype):
    """vLLM's chain verification expands each request's temperature / top-k /
    top-p to its draft tokens; on CPU vLLM 0.32 leaves non-int64 results
    uninitialised (vLLM #55005), which the declared patch fixes."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.sample import rejection_sampler

    from vllm_lookahead import vllm as vllm_patches
    from vllm_lookahead.vllm.sampler import ExpandBatchToTokensPatch

    CpuPlatform.register_triton_kernel_overrides()
    vllm_patches.apply_all()
    x = torch.tensor([24, 0, 5, 7], dtype=dtype) * (0.5 if dtype.is_floating_point else 1)
    cu = torch.tensor([3, 5, 5, 9], dtype=torch.int32)
    expected = torch.tensor([24, 24, 24, 1, 1, 7, 7, 7, 7], dtype=dtype)
    expected = expected * torch.tensor([0.5] * 3 + [1, 1] + [0.5] * 4) \
        if dtype.is_floating_point else expected
    for _ in range(3):  # uninitialised memory may hold the right values once
        torch.empty(64, dtype=dtype).fill_(-3)
        got = rejection_sampler.expand_batch_to_tokens(x, cu, 9, replace_from=0, replace_to=1)
        assert got.dtype == dtype and torch.equal(got, expected)
    assert rejection_sampler.expand_batch_to_tokens.__qualname__.startswith(
        ExpandBatchToTokensPatch.__name__)


def test_sample_rows_follow_the_processed_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=gen) * 2
    n = 40000
    temperature, top_k, top_p = torch.full((n,), 0.7), torch.full((n,), 8), torch.full((n,), 0.9)
    u = sampling.position_uniforms(np.full(n, 3, dtype=np.uint64), np.arange(n))
    tokens = sampling.sample_rows(logits.expand(n, -1), temperature, top_k, top_p, u)
    probs = sampling.apply_top_k_top_p(logits / 0.7, top_k[:1], top_p[:1]).softmax(-1)[0]
    counts = np.bincount(tokens.numpy(), minlength=12)
    assert counts[probs.numpy() == 0].sum() == 0
    expected = (probs.double().numpy() * n)
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    p = float(torch.special.gammaincc(torch.tensor((keep.sum() - 1) / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    assert p > 0.01


# ---------------------------------------------------------------------------
# End to end on the tiny model.

NUM_SAMPLES = 3000
PROMPT = [0, 5, 9, 2, 17, 4]


def _sample_tokens(llm, params, n=NUM_SAMPLES):
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)] * n, params,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


# Per p-value: about ten of them are tested in a run, so a run of a lossless
# sampler fails by chance with probability about 1%; the wrong acceptor below
# gives p < 1e-10.
ALPHA = 1e-3

PARAMS = dict(temperature=0.9, top_k=24, top_p=0.95, ignore_eos=True)
ENGINE = dict(max_model_len=64, max_num_seqs=256, kv_cache_gib=0.25,
              skip_tokenizer_init=True)


def accepted_tokens(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics()
                   if m.name == "vllm:spec_decode_num_accepted_tokens"))


def p_values(reference, samples, positions=(1, 2, 3)):
    return [chi_square_p_value(np.bincount(reference[:, i], minlength=32),
                               np.bincount(samples[:, i], minlength=32))
            for i in positions]


@pytest.fixture(scope="module")
def plain_samples(tiny_llama):
    """Plain vLLM's samples: NUM_SAMPLES x 4 tokens."""
    from vllm import SamplingParams

    from benchmarks.common import Method, make_llm

    plain = make_llm(tiny_llama, Method("plain"), **ENGINE)
    samples = np.array(_sample_tokens(plain, SamplingParams(max_tokens=4, **PARAMS)))
    del plain
    return samples


@pytest.mark.slow
def test_tree_sampling_matches_plain_sampling(tiny_llama, plain_samples, monkeypatch):
    from vllm import SamplingParams

    from benchmarks.common import Method, make_llm
    from vllm_lookahead import ops

    # One process, so that the wrong acceptor below can be swapped in.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    params = SamplingParams(max_tokens=4, **PARAMS)
    trees = Method("random-trees",
                   {"method": "custom_class",
                    "model": "vllm_lookahead.proposers.oracle.OracleTreeProposer",
                    "num_speculative_tokens": 16},
                   {"oracle": {"seed": 0}})
    llm = make_llm(tiny_llama, trees, **ENGINE)
    ours = np.array(_sample_tokens(llm, params))
    accepted = accepted_tokens(llm)

    # A seed fixes the output, whatever else shares the batch.
    seeded = SamplingParams(max_tokens=24, seed=1234, **PARAMS)
    alone = _sample_tokens(llm, seeded, n=1)[0]
    crowded = _sample_tokens(llm, [seeded] + [params] * 15, n=16)[0]

    def optimistic(parents, tokens, root_target, node_target, cu_nodes, max_depth):
        """Wrong on purpose: where no child matches the target's sample,
        accept the first root child anyway half of the time."""
        path, accepted, bonus = correct(parents, tokens, root_target, node_target,
                                        cu_nodes, max_depth)
        for b in range(len(accepted)):
            lo = int(cu_nodes[b])
            if accepted[b] == 0 and cu_nodes[b + 1] > lo and np.random.rand() < 0.5:
                path[b, 0], accepted[b], bonus[b] = 0, 1, node_target[lo]
        return path, accepted, bonus

    correct = ops.tree_accept_greedy
    monkeypatch.setattr(ops, "tree_accept_greedy", optimistic)
    wrong = np.array(_sample_tokens(llm, params))
    del llm

    print(f"random trees: accepted {accepted} tokens; p-values",
          p_values(plain_samples, ours), "wrong acceptor", p_values(plain_samples, wrong))
    assert accepted > NUM_SAMPLES / 2  # the trees were really verified
    assert alone == crowded
    assert min(p_values(plain_samples, ours)) > ALPHA
    assert p_values(plain_samples, wrong, positions=(1,))[0] < ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("recycle", [False, True])
def test_lookahead_sampling_matches_plain_sampling(tiny_llama, plain_samples, recycle):
    from vllm import SamplingParams

    from benchmarks.common import lookahead_method, make_llm

    # Static budget and no per-step node cap: a measured budget may (rightly)
    # cut every tree of this random model, and the default cap of 64 nodes
    # per step leaves nothing for each of 256 running requests. With token
    # recycling, steps without trees reach vLLM's chain verification, where
    # vLLM 0.32 on CPU expanded the sampling parameters into uninitialised
    # memory (#55005: this test crashed the engine before the fix).
    method = lookahead_method(k=16, window=3, guesses=3, ngram=3, budget="static",
                              max_tree_tokens=16 * ENGINE["max_num_seqs"], recycle=recycle)
    llm = make_llm(tiny_llama, method, **ENGINE)
    ours = np.array(_sample_tokens(llm, SamplingParams(max_tokens=4, **PARAMS)))
    accepted = accepted_tokens(llm)
    seeded = SamplingParams(max_tokens=32, seed=99, **PARAMS)
    first = _sample_tokens(llm, seeded, n=1)[0]
    again = _sample_tokens(llm, [seeded] + [SamplingParams(max_tokens=8, **PARAMS)] * 7,
                           n=8)[0]
    del llm
    print(f"lookahead (recycle {recycle}): accepted {accepted} tokens; p-values",
          p_values(plain_samples, ours))
    assert accepted > 0
    if not recycle:
        # A request's own drafts (its pool and window) do not depend on the
        # batch, so neither do its tree steps. The successor table is shared:
        # with recycling, other requests change which of its steps have
        # trees, and a token sampled without one comes from vLLM's sampler
        # (README, Known limits).
        assert first == again
    assert min(p_values(plain_samples, ours)) > ALPHA


@pytest.mark.slow
def test_staged_sampling_matches_plain_sampling(tiny_llama, plain_samples):
    """Staged trees (the tiny model drafting for itself, every step: the
    static budget) keep the target's sampling distribution."""
    from vllm import SamplingParams

    from benchmarks.common import make_llm, staged_method

    llm = make_llm(tiny_llama, staged_method(tiny_llama, k=8, budget="static"), **ENGINE)
    ours = np.array(_sample_tokens(llm, SamplingParams(max_tokens=4, **PARAMS)))
    accepted = accepted_tokens(llm)
    del llm
    print(f"staged: accepted {accepted} tokens; p-values", p_values(plain_samples, ours))
    assert accepted > NUM_SAMPLES / 2
    assert min(p_values(plain_samples, ours)) > ALPHA
