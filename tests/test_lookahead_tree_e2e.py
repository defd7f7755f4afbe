"""Lookahead decoding in tree mode end to end on the real SmolLM2-135M-Instruct
(fp32): greedy output token-identical to plain vLLM for several (W, N, G),
including N=2, pure Jacobi (G=0), W=1 and token recycling alone (W=0, G=0),
chosen per request through
``SamplingParams.extra_args`` in one continuously batched run, with drafts
verified and accepted under the static and the measured budget; seeded
sampling reproducible whatever the batch."""

import pytest

from benchmarks.common import Method, lookahead_method, make_llm, spec_counters

pytestmark = pytest.mark.slow

OVERRIDES = [None, {"window": 1, "guesses": 3}, {"guesses": 0}, {"disable": True},
             {"window": 2, "guesses": 1}]


def _penalised():
    from vllm import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=24,
                           repetition_penalty=1.3 if i == 0 else 1.0) for i in range(4)]


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def workload(smollm2, spec_bench_prompts, code_prompts):
    """10 prompts, 5 HumanEval (code, where lookahead's drafts are accepted)
    and 5 chat prompts of different categories, with different lengths and
    endings (max_tokens, stop token ids) and, per prompt, a lookahead
    override (each override once on code, once on chat); plain vLLM's
    output."""
    from vllm import SamplingParams

    prompts = code_prompts[:5] + spec_bench_prompts[:5]

    def params(extra_args=None):
        return [SamplingParams(temperature=0.0, max_tokens=24 + 12 * (i % 4),
                               stop_token_ids=[2] if i % 3 == 0 else None,
                               extra_args=extra_args and extra_args[i])
                for i in range(len(prompts))]

    plain = make_llm(smollm2, Method("plain"), max_num_seqs=4)
    reference = token_ids(plain.generate(prompts, params(), use_tqdm=False))
    penalised = token_ids(plain.generate(prompts[:4], _penalised(), use_tqdm=False))
    del plain
    overrides = [{"lookahead": o} if o else None
                 for o in (OVERRIDES * 2)[:len(prompts)]]
    return prompts, params, overrides, reference, penalised


# The measured budget at 2 running requests: at 4 on this 2-core CPU it
# verifies a tree in a few steps only (measured: 12 trees, 5 tokens accepted
# over both runs below), at 2 in ~70 (35 tokens accepted).
@pytest.mark.parametrize("ngram, window, guesses, budget, max_num_seqs",
                         [(4, 5, 5, "static", 4), (2, 3, 3, "static", 4),
                          (3, 3, 3, "measured", 2),
                          # Token recycling alone: every draft comes from the
                          # successor table.
                          (3, 0, 0, "static", 4)])
def test_greedy_tree_mode_is_exact(smollm2, workload, ngram, window, guesses, budget,
                                   max_num_seqs):
    prompts, params, overrides, reference, penalised = workload
    method = lookahead_method(k=32, ngram=ngram, window=window, guesses=guesses,
                              budget=budget, recycle=window == 0 or budget == "measured",
                              chain=0 if window == 0 else 8)
    # max_num_seqs < prompts: requests join and leave (continuous batching).
    llm = make_llm(smollm2, method, max_num_seqs=max_num_seqs)
    outputs = token_ids(llm.generate(prompts, params(overrides), use_tqdm=False))
    # The same prompts without overrides: the default (W, G) for every request.
    uniform = token_ids(llm.generate(prompts, params(), use_tqdm=False))
    spec = spec_counters(llm)
    # A penalised request makes the batch one the runtime cannot verify: the
    # drafts go to vLLM's own verification as chains, still exact.
    fallback = token_ids(llm.generate(prompts[:4], _penalised(), use_tqdm=False))
    del llm
    assert fallback == penalised
    print(f"{budget} budget: {spec}")
    assert outputs == reference
    assert uniform == reference
    # Trees were verified and accepted, under either budget.
    assert spec["drafts"] > 0 and spec["draft_tokens"] > 0
    assert spec["accepted_tokens"] > 0


@pytest.mark.xfail(
    reason="tree mode samples a seeded request position-keyed only in steps the runtime "
    "verifies; a token sampled in a step without trees (a prefill's first token, when no "
    "running request has a tree then) comes from vLLM's own sampler, so it depends on the "
    "batch and the prefix cache (measured: the first token differs)",
    raises=AssertionError, strict=True,
)
def test_seeded_sampling_is_reproducible_whatever_the_batch(smollm2, spec_bench_prompts):
    """Tree mode samples position t of a seeded request with a uniform keyed
    by (seed, t): the same seeded requests give the same tokens again (the
    second time with their prompts in the prefix cache), and alone as next
    to others, while trees are verified and accepted."""
    from vllm import SamplingParams

    prompts = spec_bench_prompts
    params = [SamplingParams(temperature=0.8, seed=1000 + i, max_tokens=32)
              for i in range(len(prompts))]
    llm = make_llm(smollm2, lookahead_method(k=16, budget="static"), max_num_seqs=8)
    before = spec_counters(llm)
    first = token_ids(llm.generate(prompts, params, use_tqdm=False))
    again = token_ids(llm.generate(prompts, params, use_tqdm=False))
    alone = token_ids(llm.generate(prompts[9:10], params[9:10], use_tqdm=False))
    after = spec_counters(llm)
    del llm
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    print(f"sampled trees: {accepted} tokens accepted in "
          f"{after['drafts'] - before['drafts']} drafted steps; requests whose samples "
          f"differ: {[i for i, (a, b) in enumerate(zip(first, again)) if a != b]}")
    if accepted == 0:
        # Not an AssertionError: the expected failure must not pass on it.
        pytest.fail("no draft token accepted while sampling: the check says nothing")
    assert len(set(map(tuple, first))) == len(first)  # really sampled, not all alike
    assert first == again
    assert alone[0] == first[9]
