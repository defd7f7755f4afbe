"""Lookahead decoding in tree mode end to end on the real SmolLM2-135M-Instruct
(fp32): greedy output token-identical to plain vLLM for several (W, N, G),
including N=2, pure Jacobi (G=0) and W=1, chosen per request through
``SamplingParams.extra_args`` in one continuously batched run."""

import pytest

from benchmarks.common import Method, lookahead_method, make_llm

pytestmark = pytest.mark.slow

OVERRIDES = [None, {"window": 1, "guesses": 3}, {"guesses": 0}, {"disable": True},
             {"window": 2, "guesses": 1}]


def _penalised():
    from vllm import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=24,
                           repetition_penalty=1.3 if i == 0 else 1.0) for i in range(4)]


def counter(llm, name: str) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == name))


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def workload(smollm2, spec_bench_prompts):
    """10 prompts with different lengths and endings (max_tokens, stop
    token ids) and, per prompt, a lookahead override; plain vLLM's output."""
    from vllm import SamplingParams

    prompts = spec_bench_prompts[:10]

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


@pytest.mark.parametrize("ngram, window, guesses, budget",
                         [(4, 5, 5, "static"), (2, 3, 3, "measured")])
def test_greedy_tree_mode_is_exact(smollm2, workload, ngram, window, guesses, budget):
    prompts, params, overrides, reference, penalised = workload
    method = lookahead_method(k=32, ngram=ngram, window=window, guesses=guesses,
                              budget=budget)
    # max_num_seqs < prompts: requests join and leave (continuous batching).
    llm = make_llm(smollm2, method, max_num_seqs=4)
    outputs = token_ids(llm.generate(prompts, params(overrides), use_tqdm=False))
    accepted = counter(llm, "vllm:spec_decode_num_accepted_tokens")
    # The same prompts without overrides: the default (W, G) for every request.
    uniform = token_ids(llm.generate(prompts, params(), use_tqdm=False))
    # A penalised request makes the batch one the runtime cannot verify: the
    # drafts go to vLLM's own verification as chains, still exact.
    fallback = token_ids(llm.generate(prompts[:4], _penalised(), use_tqdm=False))
    del llm
    assert fallback == penalised
    assert outputs == reference
    assert uniform == reference
    # The measured budget may cut every tree on a slow machine; the static one
    # always verifies some.
    assert accepted > 0 or budget == "measured"
