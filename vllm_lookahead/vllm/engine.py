"""Engine configuration: this package's settings validated where vLLM builds
its config, and the CUDA graph mode and model runner that tree speculation
needs."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.config.compilation import CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs

from vllm_lookahead.config import LookaheadConfig, LookaheadConfigError, StagedConfig
from vllm_lookahead.tree.backends import adapter_for
from vllm_lookahead.vllm import Patch
from vllm_lookahead.vllm.attention import check_flex_on_cpu

logger = logging.getLogger(__name__)

TREE_UNSUPPORTED_FOR_V2 = "vllm_lookahead speculation (tree runtime and drafter patches)"


def uses_vllm_lookahead(vllm_config: Any) -> bool:
    """A proposer of this package drafts: custom_class ``vllm_lookahead.*``,
    or vLLM's draft_model method with ``additional_config["staged"]``."""
    spec = vllm_config.speculative_config
    if spec is None:
        return False
    if spec.method == "custom_class":
        return str(spec.model).startswith("vllm_lookahead.")
    return StagedConfig.section(vllm_config) is not None and spec.uses_draft_model()


def uses_tree_runtime(vllm_config: Any) -> bool:
    """Whether the tree runtime verifies this engine's drafts: lookahead in
    tree mode, the staged cascade with trees, the oracle test proposer."""
    if not uses_vllm_lookahead(vllm_config):
        return False
    spec = vllm_config.speculative_config
    if spec.method == "custom_class":
        if str(spec.model) == "vllm_lookahead.LookaheadProposer":
            return LookaheadConfig.from_vllm_config(vllm_config).mode == "tree"
        return True
    return StagedConfig.from_dict(StagedConfig.section(vllm_config)).tree


def _uses_tree_runtime_if_valid(vllm_config: Any) -> bool:
    """``uses_tree_runtime`` inside vLLM's config construction: a bad
    section is reported by ``EngineArgsPatch`` right after, naming the key
    (raised here it would come wrapped in pydantic's ValidationError)."""
    try:
        return uses_tree_runtime(vllm_config)
    except LookaheadConfigError:
        return False


def check_tree_supported(vllm_config: Any) -> None:
    """Fail at engine start, with what to change, where the tree runtime
    cannot verify trees (instead of failing a running step): the device, the
    dtype, the model's attention, and the attention backend's KV layout where
    it is known now (the selected backend; on CPU, the kernel vLLM will pick),
    decided per backend in ``tree.backends``. A backend vLLM picks later on
    CUDA is checked when the model runner binds its layers."""
    model = vllm_config.model_config
    device = vllm_config.device_config.device_type
    if device not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"tree speculation runs on vLLM's CPU and CUDA backends (this engine: {device}); "
            "use additional_config lookahead mode \"linear\"")
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise NotImplementedError(
            f"tree speculation needs a float32, bfloat16 or float16 model (got {model.dtype})")
    if model.get_sliding_window() is not None:
        raise NotImplementedError(
            "tree speculation does not support sliding-window attention models; "
            "use lookahead mode \"linear\"")
    backend = vllm_config.attention_config.backend
    if backend is not None and backend.name != "CPU_ATTN":
        adapter_for(backend.name)
    elif device == "cpu" and vllm_config.cache_config.block_size is not None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        adapter_for("CPU_ATTN", _get_attn_isa(model.dtype, vllm_config.cache_config.block_size,
                                              model.get_head_size()))


class EngineArgsPatch(Patch):
    """Validates this package's ``additional_config`` (and, where the tree
    runtime verifies, that it supports the device, dtype and model) in the
    process that builds the engine config, so a bad setting fails before any
    engine process starts, with the offending key named (instead of a worker
    traceback behind "Engine core initialization failed")."""

    target = EngineArgs

    def create_engine_config(self, *args, **kwargs):
        _staged_engine_args(self)
        original = EngineArgsPatch.original("create_engine_config")
        vllm_config = original(self, *args, **kwargs)
        check_flex_on_cpu(vllm_config)
        _check_staged(vllm_config)
        if uses_vllm_lookahead(vllm_config):
            spec = vllm_config.speculative_config
            if str(spec.model) == "vllm_lookahead.LookaheadProposer":
                LookaheadConfig.from_vllm_config(vllm_config)
            if uses_tree_runtime(vllm_config):
                check_tree_supported(vllm_config)
        return vllm_config


class VllmConfigPatch(Patch):
    """Tree speculation on CUDA: never a FULL CUDA graph, in which a batch
    whose requests all have 1 + num_speculative_tokens tokens replays as
    uniform decode and the tree runtime's attention never runs (tree rows
    would get causal attention); and the V1 model runner, which is where
    this package's drafter and runtime patches apply (vLLM's draft_model
    method would otherwise run on Model Runner V2)."""

    target = VllmConfig

    def _maybe_override_dynamic_sd_cudagraph_mode(self) -> None:
        VllmConfigPatch.original("_maybe_override_dynamic_sd_cudagraph_mode")(self)
        mode = self.compilation_config.cudagraph_mode
        if _uses_tree_runtime_if_valid(self) and mode is not None and mode.has_full_cudagraphs():
            logger.warning(
                "vllm_lookahead: tree speculation verifies trees in the attention "
                "backend, which FULL CUDA graphs skip; overriding cudagraph_mode %s "
                "to PIECEWISE", mode.name)
            self.compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE

    def _get_v2_model_runner_unsupported_features(self) -> list[str]:
        original = VllmConfigPatch.original("_get_v2_model_runner_unsupported_features")
        unsupported = original(self)
        if uses_vllm_lookahead(self):
            import vllm.envs as envs

            if envs.VLLM_USE_V2_MODEL_RUNNER:
                raise LookaheadConfigError(
                    "vllm_lookahead's proposers run on vLLM's V1 model runner; unset "
                    "VLLM_USE_V2_MODEL_RUNNER (or set it to 0)")
            unsupported.append(TREE_UNSUPPORTED_FOR_V2)
        return unsupported


def _staged_engine_args(engine_args: Any) -> None:
    """The staged drafter runs after each step's bookkeeping, on the
    CPU-side tokens: no asynchronous scheduling (as with vLLM's n-gram and
    custom-class drafters)."""
    additional = engine_args.additional_config
    if not isinstance(additional, dict) or "staged" not in additional:
        return
    if engine_args.async_scheduling:
        raise LookaheadConfigError(
            'additional_config["staged"] does not support async_scheduling; leave '
            "it unset")
    engine_args.async_scheduling = False


def _check_staged(vllm_config: Any) -> None:
    """``additional_config["staged"]``: valid, with the ``draft_model``
    method."""
    raw = StagedConfig.section(vllm_config)
    if raw is None:
        return
    StagedConfig.from_dict(raw)
    spec = vllm_config.speculative_config
    if spec is None or not spec.uses_draft_model():
        raise LookaheadConfigError(
            'additional_config["staged"] needs speculative_config {"method": '
            '"draft_model", "model": DRAFT_MODEL, "num_speculative_tokens": K}; got '
            f"method {getattr(spec, 'method', None)!r}")
