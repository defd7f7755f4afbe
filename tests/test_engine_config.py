"""What tree speculation changes in vLLM's engine config, on the config
objects (no engine): never a FULL CUDA graph, always the V1 model runner."""

from types import SimpleNamespace

import pytest
from vllm.config.compilation import CUDAGraphMode

from vllm_lookahead import vllm as vllm_patches
from vllm_lookahead.config import LookaheadConfigError

LOOKAHEAD = "vllm_lookahead.LookaheadProposer"


@pytest.fixture(autouse=True)
def plugin_applied():
    vllm_patches.apply_all()


def config(method="custom_class", model=LOOKAHEAD, additional=None,
           cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE):
    spec = SimpleNamespace(method=method, model=model, num_speculative_tokens=8,
                           uses_dynamic_speculative_decoding=lambda: False,
                           uses_draft_model=lambda: method == "draft_model",
                           parallel_drafting=False)
    return SimpleNamespace(
        speculative_config=spec, additional_config=additional or {},
        compilation_config=SimpleNamespace(cudagraph_mode=cudagraph_mode),
        use_v2_model_runner=False,
        parallel_config=SimpleNamespace(distributed_executor_backend="mp",
                                        pipeline_parallel_size=1, use_ubatching=False))


def override_cudagraph_mode(vllm_config):
    from vllm.config import VllmConfig

    VllmConfig._maybe_override_dynamic_sd_cudagraph_mode(vllm_config)
    return vllm_config.compilation_config.cudagraph_mode


@pytest.mark.parametrize("mode", [CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL,
                                  CUDAGraphMode.FULL_DECODE_ONLY])
@pytest.mark.parametrize("vllm_config", [
    lambda m: config(additional={"lookahead": {"mode": "tree"}}, cudagraph_mode=m),
    lambda m: config(model="vllm_lookahead.proposers.oracle.OracleTreeProposer",
                     cudagraph_mode=m),
    lambda m: config("draft_model", "draft", {"staged": {"tree": True}}, cudagraph_mode=m),
], ids=["lookahead-tree", "oracle", "staged-tree"])
def test_tree_speculation_never_replays_full_cuda_graphs(vllm_config, mode):
    assert override_cudagraph_mode(vllm_config(mode)) == CUDAGraphMode.PIECEWISE


@pytest.mark.parametrize("vllm_config", [
    config(additional={"lookahead": {"mode": "linear"}}),
    config("draft_model", "draft", {"staged": {"tree": False}}),
    config("ngram", None),
], ids=["lookahead-linear", "staged-chain", "vllm-ngram"])
def test_chains_keep_full_cuda_graphs(vllm_config):
    assert override_cudagraph_mode(vllm_config) == CUDAGraphMode.FULL_AND_PIECEWISE


def test_piecewise_and_none_stay():
    for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE):
        assert override_cudagraph_mode(config(cudagraph_mode=mode)) == mode


def v2_unsupported(vllm_config):
    from vllm.config import VllmConfig

    return VllmConfig._get_v2_model_runner_unsupported_features(vllm_config)


@pytest.mark.parametrize("vllm_config", [
    config(),
    config(additional={"lookahead": {"mode": "linear"}}),
    config("draft_model", "draft", {"staged": {}}),
    config("draft_model", "draft", {"staged": {"tree": False}}),
], ids=["lookahead", "lookahead-linear", "staged-tree", "staged-chain"])
def test_our_proposers_run_on_the_v1_model_runner(vllm_config):
    from vllm_lookahead.vllm.engine import TREE_UNSUPPORTED_FOR_V2

    assert TREE_UNSUPPORTED_FOR_V2 in v2_unsupported(vllm_config)


def test_other_methods_leave_the_model_runner_choice_to_vllm():
    from vllm_lookahead.vllm.engine import TREE_UNSUPPORTED_FOR_V2

    assert TREE_UNSUPPORTED_FOR_V2 not in v2_unsupported(config("draft_model", "draft"))
    assert TREE_UNSUPPORTED_FOR_V2 not in v2_unsupported(config("ngram", None))


def test_forcing_model_runner_v2_is_refused(monkeypatch):
    import vllm.envs as envs

    monkeypatch.setattr(envs, "VLLM_USE_V2_MODEL_RUNNER", True, raising=False)
    with pytest.raises(LookaheadConfigError, match="VLLM_USE_V2_MODEL_RUNNER"):
        v2_unsupported(config("draft_model", "draft", {"staged": {}}))


def test_every_touch_point_is_a_declared_patch():
    """The patch layer's classes, as ``grep "class .*Patch"`` lists them,
    are the ones applied."""
    import re
    from pathlib import Path

    import vllm_lookahead.vllm as package

    declared = set()
    for module in Path(package.__file__).parent.glob("*.py"):
        declared |= set(re.findall(r"^class (\w+Patch)\(Patch\)", module.read_text(), re.M))
    applied = {patch.__name__ for patch in vllm_patches._applied.values()}
    assert declared == applied == {"EngineArgsPatch", "VllmConfigPatch", "GPUModelRunnerPatch",
                                   "RejectionSamplerPatch", "ExpandBatchToTokensPatch",
                                   "CpuPlatformPatch",
                                   "FlexAttentionMetadataPatch"}
