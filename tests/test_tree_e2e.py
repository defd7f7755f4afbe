"""Tree speculation end to end on the real SmolLM2-135M-Instruct (fp32):
an oracle proposes random trees with the true greedy continuation planted to
a random depth among decoys. Output must equal plain vLLM's token for token,
and exactly the planted depth must be accepted every step."""

import json

import pytest

from benchmarks.common import Method, make_llm

pytestmark = pytest.mark.slow

K = 8


def test_oracle_trees_are_exact_and_accept_the_planted_depth(smollm2, spec_bench_prompts,
                                                             tmp_path):
    from vllm import SamplingParams

    prompts = spec_bench_prompts[:10]
    params = [SamplingParams(temperature=0.0, max_tokens=16 + 8 * (i % 5))
              for i in range(len(prompts))]
    plain = make_llm(smollm2, Method("plain"), max_num_seqs=4)
    reference = plain.generate(prompts, params, use_tqdm=False)
    del plain
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in reference]
    (tmp_path / "reference.json").write_text(json.dumps(sequences))
    log = tmp_path / "planted.txt"

    oracle = Method(
        "oracle-tree",
        {"method": "custom_class",
         "model": "vllm_lookahead.proposers.oracle.OracleTreeProposer",
         "num_speculative_tokens": K},
        {"oracle": {"reference": str(tmp_path / "reference.json"), "seed": 1,
                    "log": str(log)}},
    )
    # max_num_seqs < prompts: requests join and leave (continuous batching).
    llm = make_llm(smollm2, oracle, max_num_seqs=4)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    accepted = int(sum(m.value for m in llm.get_metrics()
                       if m.name == "vllm:spec_decode_num_accepted_tokens"))
    planted_before = len(log.read_text().split())
    # A sampled request in the batch: tree steps fall back to verifying the
    # same drafts as chains with vLLM's rejection sampler, still exact.
    mixed = llm.generate(prompts[:3] + prompts[:1],
                         params[:3] + [SamplingParams(temperature=0.8, seed=3, max_tokens=16)],
                         use_tqdm=False)
    del llm

    assert [list(o.outputs[0].token_ids) for o in mixed[:3]] == \
        [list(o.outputs[0].token_ids) for o in reference[:3]]
    assert [list(o.outputs[0].token_ids) for o in outputs] == \
        [list(o.outputs[0].token_ids) for o in reference]
    planted = [int(d) for d in log.read_text().split()]
    print(f"oracle trees: {accepted} tokens accepted over {planted_before} tree "
          f"proposals ({accepted / planted_before:.2f} per tree)")
    assert sum(planted) > 20
    # Counted before the mixed batch, whose plantings also land in the log.
    assert accepted == sum(planted[:planted_before])
