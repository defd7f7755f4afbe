"""Staged draft cascade end to end (vLLM's ``draft_model`` method plus
``additional_config["staged"]``), SmolLM2-135M as the target: greedy output
equal to plain vLLM with continuous batching, with the target's own weights
as the draft (nearly every chain node accepted: the plumbing works end to
end) and with an unrelated random draft."""

import shutil

import pytest

pytestmark = pytest.mark.slow

K = 8
# Engine settings of every engine here (plain and staged alike): eager mode and
# fewer batched tokens, so engines with a draft model start in a fraction of
# the time (no torch.compile of two models, a short profiling run).
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=1024, enforce_eager=True)


@pytest.fixture(scope="module")
def random_draft(smollm2, tmp_path_factory) -> str:
    """A random 2-layer Llama with SmolLM2's vocabulary, tokenizer and
    attention shape (so its KV shares the target's cache layout)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=192, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, rope_theta=100000.0)
    path = tmp_path_factory.mktemp("random_draft")
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm2}/{name}", path / name)
    return str(path)


@pytest.fixture(scope="module")
def reference(smollm2, spec_bench_prompts):
    from benchmarks.common import Method, make_llm

    plain = make_llm(smollm2, Method("plain"), **ENGINE)
    outputs = plain.generate(spec_bench_prompts, _params(), use_tqdm=False)
    penalised = plain.generate(spec_bench_prompts[:3], _penalised(), use_tqdm=False)
    del plain
    return _tokens(outputs), _tokens(penalised)


def _params():
    from vllm import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=24 + 12 * (i % 3))
            for i in range(13)]


def _penalised():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3)


def _tokens(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def _run(model, draft, prompts, staged, monkeypatch):
    from benchmarks.common import make_llm, staged_method

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    # max_num_seqs < prompts: requests join and leave (continuous batching).
    llm = make_llm(model, staged_method(draft, k=K, **staged), **ENGINE)
    outputs = _tokens(llm.generate(prompts, _params(), use_tqdm=False))
    metrics = {m.name: m.value for m in llm.get_metrics()
               if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value")}
    from vllm_lookahead.vllm.model_runner import staged_stats

    stats = llm.collective_rpc(staged_stats)[0]
    penalised = _tokens(llm.generate(prompts[:3], _penalised(), use_tqdm=False))
    # Requests that turn the cascade off draft nothing and stay exact.
    from vllm import SamplingParams

    from benchmarks.common import spec_counters

    before = spec_counters(llm)
    disabled = _tokens(llm.generate(prompts[:3], [
        SamplingParams(temperature=0.0, max_tokens=p.max_tokens,
                       extra_args={"staged": {"disable": True}}) for p in _params()[:3]],
        use_tqdm=False))
    assert spec_counters(llm)["drafts"] == before["drafts"]
    assert disabled == outputs[:3]
    del llm
    return outputs, metrics, stats, penalised


# The static budget: every step drafts its whole chain / tree, which these
# tests count (the measured one is tested in test_staged.py and measured in
# benchmarks/: with the target drafting for itself a draft forward costs as
# much as the token it may add, so it rightly drafts next to nothing).
@pytest.mark.parametrize("staged", [{"tree": False, "budget": "static"},
                                    {"tree": True, "budget": "static"},
                                    {"tree": False, "budget": "static",
                                     "stage2": "lookahead"}])
def test_copy_draft_is_exact_and_accepts_its_chains(smollm2, spec_bench_prompts,
                                                   reference, staged, monkeypatch):
    outputs, metrics, stats, penalised = _run(smollm2, smollm2, spec_bench_prompts,
                                              staged, monkeypatch)
    print(staged, metrics, stats)
    assert outputs == reference[0]
    assert penalised == reference[1]
    # The draft is the target: each step's greedy chain is the target's own
    # continuation, so all of it is accepted (a few near-ties aside; drafts
    # are cut at max_tokens).
    accepted_per_draft = (metrics["vllm:spec_decode_num_accepted_tokens"]
                          / metrics["vllm:spec_decode_num_drafts"])
    assert accepted_per_draft >= 0.8 * stats["chain_tokens_per_request"]
    # Stage 2 found some of the chains' tokens.
    assert stats["stage2_tokens_per_request"] > 0
    # Stage 2 "lookahead": guess trees in the draft's own attention; its
    # chains are still the target's greedy tokens, all accepted (with the
    # draft's tree rows left causal, 13 of 432 were not).
    lookahead = staged.get("stage2") == "lookahead"
    assert (stats["guess_tree_forwards"] > 0) == lookahead
    if lookahead:
        assert (metrics["vllm:spec_decode_num_accepted_tokens"]
                >= 0.99 * metrics["vllm:spec_decode_num_draft_tokens"])
    if not staged["tree"]:
        assert stats["chain_tokens_per_request"] > K - 1
        # Without stage 2 a chain of K tokens takes K draft forwards.
        assert stats["draft_forwards_per_step"] < K


@pytest.mark.parametrize("budget", ["static", "measured"])
def test_random_draft_is_exact(smollm2, random_draft, spec_bench_prompts, reference,
                               budget, monkeypatch):
    """Exact either way; the static budget verifies K nodes per drafting
    request, the measured one learns that this draft's nodes are never
    accepted and verifies next to none of them."""
    outputs, metrics, stats, penalised = _run(smollm2, random_draft, spec_bench_prompts,
                                              {"budget": budget}, monkeypatch)
    print(metrics, stats)
    assert outputs == reference[0]
    assert penalised == reference[1]
    if budget == "static":
        assert metrics["vllm:spec_decode_num_drafts"] > 0
        assert stats["nodes_per_request"] > K - 1
    else:
        assert stats["steps"] > 50
        assert stats["nodes_per_request"] < 1.0


def test_staged_needs_the_draft_model_method(smollm2):
    from benchmarks.common import Method, make_llm
    from vllm_lookahead.config import LookaheadConfigError

    bad = Method("bad", {"method": "ngram", "num_speculative_tokens": 4,
                         "prompt_lookup_max": 3}, {"staged": {}})
    with pytest.raises(LookaheadConfigError, match="draft_model"):
        make_llm(smollm2, bad)
    typo = Method("typo", {"method": "draft_model", "model": smollm2,
                           "num_speculative_tokens": 4}, {"staged": {"detph": 3}})
    with pytest.raises(LookaheadConfigError, match="detph"):
        make_llm(smollm2, typo)
