"""Tree speculation on each KV-cache layout, end to end on SmolLM2-135M:

- LBNHC, the layout of vLLM's CUDA backends, through vLLM's FLEX_ATTENTION
  backend run on CPU (``attention_config={"backend": "FLEX_ATTENTION"}``):
  oracle trees and lookahead's static tree token-identical to plain vLLM on
  the same backend in float32, with continuous batching;
- bfloat16 on the CPU backend and under FLEX: the oracle's planted depth
  accepted at every step, and the output compared with plain bf16 vLLM on
  the same backend (see ``test_bf16_tree_mode``).
"""

import json

import pytest

from benchmarks.common import Method, lookahead_method, make_llm

pytestmark = pytest.mark.slow

# A 16-token cache block with 128-token mask blocks: FLEX then builds its
# block mask the generic way (Inductor's CPU code cannot lower the direct one).
FLEX = {"backend": "FLEX_ATTENTION", "flex_attn_kv_block_size": 128}
FLEX_ENGINE = {"attention_config": FLEX, "block_size": 16}
K = 8


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def counter(llm, name):
    return int(sum(m.value for m in llm.get_metrics() if m.name == name))


def oracle_method(tmp_path, reference_outputs, seed=1):
    sequences = [list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
                 for o in reference_outputs]
    (tmp_path / "reference.json").write_text(json.dumps(sequences))
    log = tmp_path / "planted.txt"
    log.write_text("")
    return Method(
        "oracle-tree",
        {"method": "custom_class",
         "model": "vllm_lookahead.proposers.oracle.OracleTreeProposer",
         "num_speculative_tokens": K},
        {"oracle": {"reference": str(tmp_path / "reference.json"), "seed": seed,
                    "log": str(log)}},
    ), log


def run(model, method, prompts, params, **engine):
    # max_num_seqs < prompts: requests join and leave (continuous batching).
    llm = make_llm(model, method, max_num_seqs=4, enforce_eager=True, **engine)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    accepted = counter(llm, "vllm:spec_decode_num_accepted_tokens")
    backend = llm.llm_engine.vllm_config.attention_config.backend
    del llm
    return outputs, accepted, backend


@pytest.fixture(scope="module")
def workload(spec_bench_prompts):
    from vllm import SamplingParams

    prompts = spec_bench_prompts[:8]
    params = [SamplingParams(temperature=0.0, max_tokens=16 + 8 * (i % 4))
              for i in range(len(prompts))]
    return prompts, params


def test_flex_attention_on_cpu_is_the_lbnhc_layout(smollm2, workload, tmp_path):
    """The LBNHC adapter under vLLM's FLEX_ATTENTION backend on CPU, fp32:
    oracle trees accept exactly the planted depth; oracle and lookahead tree
    outputs are those of plain vLLM with the same backend."""
    prompts, params = workload
    plain, _, backend = run(smollm2, Method("plain"), prompts, params, **FLEX_ENGINE)
    assert str(backend).endswith("FLEX_ATTENTION")
    oracle, log = oracle_method(tmp_path, plain)
    outputs, accepted, _ = run(smollm2, oracle, prompts, params, **FLEX_ENGINE)
    planted = [int(d) for d in log.read_text().split()]
    assert token_ids(outputs) == token_ids(plain)
    assert sum(planted) > 20 and accepted == sum(planted)

    lookahead = lookahead_method(k=16, window=3, guesses=3, budget="static")
    outputs, accepted, _ = run(smollm2, lookahead, prompts, params, **FLEX_ENGINE)
    assert token_ids(outputs) == token_ids(plain)
    assert accepted > 0


@pytest.mark.parametrize("attention", [{}, FLEX_ENGINE], ids=["cpu-attn", "flex"])
def test_bf16_tree_mode(smollm2, workload, tmp_path, attention):
    """bf16: the tree rows' attention is the runtime's (bf16 inputs, fp32
    accumulation), the other rows vLLM's kernel's, and a tree step's batch
    has other shapes than plain decoding, so bf16 rounding may flip an
    argmax at a near-tie and a continuation may then differ from plain bf16
    vLLM's; what must hold exactly: every planted oracle node whose path the
    target agrees with is accepted (acceptance == planted depth while the
    output follows the reference), and most outputs match plain bf16."""
    prompts, params = workload
    engine = {"dtype": "bfloat16", **attention}
    plain, _, _ = run(smollm2, Method("plain"), prompts, params, **engine)
    oracle, log = oracle_method(tmp_path, plain)
    outputs, accepted, _ = run(smollm2, oracle, prompts, params, **engine)
    planted = [int(d) for d in log.read_text().split()]
    same = sum(o == p for o, p in zip(token_ids(outputs), token_ids(plain)))
    print(f"bf16 {'flex' if attention else 'cpu-attn'}: {same}/{len(prompts)} outputs "
          f"identical to plain bf16, {accepted} accepted of {sum(planted)} planted")
    assert sum(planted) > 20
    assert same >= len(prompts) - 1
    if same == len(prompts):
        assert accepted == sum(planted)
