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
    log, verified = tmp_path / "planted.txt", tmp_path / "verified.txt"
    log.write_text("")
    verified.write_text("")
    return Method(
        "oracle-tree",
        {"method": "custom_class",
         "model": "vllm_lookahead.proposers.oracle.OracleTreeProposer",
         "num_speculative_tokens": K},
        {"oracle": {"reference": str(tmp_path / "reference.json"), "seed": seed,
                    "log": str(log), "verified_log": str(verified)}},
    ), log, verified


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
    oracle, log, _ = oracle_method(tmp_path, plain)
    outputs, accepted, _ = run(smollm2, oracle, prompts, params, **FLEX_ENGINE)
    planted = [int(d) for d in log.read_text().split()]
    assert token_ids(outputs) == token_ids(plain)
    assert sum(planted) > 20 and accepted == sum(planted)

    lookahead = lookahead_method(k=16, window=3, guesses=3, budget="static")
    outputs, accepted, _ = run(smollm2, lookahead, prompts, params, **FLEX_ENGINE)
    assert token_ids(outputs) == token_ids(plain)
    assert accepted > 0


@pytest.fixture
def without_amx(monkeypatch):
    """Engines in this process (engine core and worker in-process), which
    take vLLM's CPU attention kernel of a CPU without AMX: on an AMX CPU,
    vLLM's bf16 CPU_ATTN kernel is 'amx', whose packed keys the tree
    runtime does not read (refused at startup: test_config), so the bf16
    CPU_ATTN layout the runtime does read is tested as on other CPUs."""
    import torch

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("attention", [{}, FLEX_ENGINE], ids=["cpu-attn", "flex"])
def test_bf16_tree_mode(smollm2, workload, tmp_path, attention, request):
    """bf16 on CPU_ATTN and FLEX. The output may differ from plain bf16
    vLLM's: a tree step has other batch shapes than a plain decoding step
    (more query rows; the tree rows attended by the runtime's op, bf16 inputs
    with fp32 accumulation), and bf16 rounding differs with the shapes, which
    flips argmaxes at near-ties; plain bf16 vLLM differs from itself the same
    way between batch sizes (printed: max_num_seqs 1 vs 4). What holds
    exactly: at every step the oracle's planted continuation is accepted
    whole until the target first disagrees with it, at most once per request
    (the request then leaves the reference), never beyond it; a request that
    never disagrees keeps plain's output."""
    prompts, params = workload
    if not attention:
        request.getfixturevalue("without_amx")
    engine = {"dtype": "bfloat16", **attention}
    plain, _, _ = run(smollm2, Method("plain"), prompts, params, **engine)
    plain_alone = token_ids(make_llm(smollm2, Method("plain"), max_num_seqs=1,
                                     enforce_eager=True, **engine)
                            .generate(prompts, params, use_tqdm=False))
    oracle, log, verified = oracle_method(tmp_path, plain)
    outputs, accepted, _ = run(smollm2, oracle, prompts, params, **engine)

    steps = [line.split() for line in verified.read_text().splitlines()]
    short: dict[str, list[tuple[int, int]]] = {}
    for req_id, planted, taken in steps:
        if int(taken) != int(planted):
            short.setdefault(req_id, []).append((int(planted), int(taken)))
    differ = sum(o != p for o, p in zip(token_ids(outputs), token_ids(plain)))
    print(f"bf16 {'flex' if attention else 'cpu-attn'}: tree mode {len(prompts) - differ}/"
          f"{len(prompts)} outputs identical to plain bf16 (plain bf16 at max_num_seqs 1: "
          f"{sum(a == p for a, p in zip(plain_alone, token_ids(plain)))}/{len(prompts)}); "
          f"{len(steps)} planted steps, {sum(len(v) for v in short.values())} cut short "
          f"by a bf16 disagreement; {accepted} tokens accepted")
    assert len(steps) > 20 and sum(int(p) for _, p, _ in steps) > 20
    assert all(len(cut) == 1 and cut[0][1] < cut[0][0] for cut in short.values())
    assert len(short) <= differ
    assert accepted >= sum(int(a) for _, _, a in steps)
