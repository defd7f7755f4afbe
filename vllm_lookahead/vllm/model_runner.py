"""vLLM's model runner: the drafts of a :class:`TreeDrafter` go through the
tree runtime, which the runner owns (one per runner)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_lookahead.tree.backends import adapter_for
from vllm_lookahead.tree.protocol import BatchInfo, DraftInputs, TreeDrafter
from vllm_lookahead.tree.runtime import TreeRuntime, raw_argmax_is_greedy, tree_eligible
from vllm_lookahead.vllm import Patch, draft_model
from vllm_lookahead.vllm.attention import TreeAttention

logger = logging.getLogger(__name__)
@dataclass(frozen=True)
class RunnerSpeculation:
    """What this package adds to a model runner (kept in its instance dict,
    built on first use): the drafter when it is one of this package's, its
    tree runtime, and whether it is the staged drafter (which runs next to
    vLLM's draft-model proposer, using its model and KV cache)."""

    drafter: TreeDrafter | None
    runtime: TreeRuntime | None
    staged: bool

    @classmethod
    def of(cls, runner: Any) -> RunnerSpeculation:
        state = runner.__dict__.get(_STATE)
        if state is None:
            drafter = draft_model.make_staged_drafter(runner)
            staged = drafter is not None
            if not staged and isinstance(runner.__dict__.get("drafter"), TreeDrafter):
                drafter = runner.drafter
            state = runner.__dict__[_STATE] = cls(
                drafter, TreeRuntime(drafter) if drafter is not None else None, staged)
        return state


_STATE = "_vllm_lookahead_speculation"


def tree_drafter(runner: Any) -> TreeDrafter | None:
    return RunnerSpeculation.of(runner).drafter


def tree_runtime(runner: Any) -> TreeRuntime | None:
    return RunnerSpeculation.of(runner).runtime


def staged_stats(worker: Any) -> dict[str, float]:
    """``LLM.collective_rpc`` target: the staged drafter's counters in a
    worker (``proposers.staged.StagedDrafter.stats``)."""
    return tree_drafter(worker.model_runner).stats()


def trees_verifiable(input_batch: Any, params: list[Any]) -> bool:
    """Whether the tree runtime can verify this batch: every request's target
    tokens are plain argmax / temperature, top-k, top-p samples, and no
    logits processor beyond vLLM's built-in ones (min-p, logit bias, min
    tokens, which act only through the SamplingParams fields
    ``runtime.tree_eligible`` checks) is loaded."""
    metadata = input_batch.sampling_metadata
    builtin = "vllm.v1.sample.logits_processor.builtin"
    return bool(not input_batch.num_logprobs
                and all(tree_eligible(p) for p in params)
                and raw_argmax_is_greedy(metadata)
                and all(type(proc).__module__ == builtin
                        for proc in metadata.logitsprocs.all))


def _bind_attention_layers(runner: Any, runtime: TreeRuntime) -> None:
    """Give every attention layer's impl the runtime; an attention layer
    whose backend has no tree adapter stops the engine here (its tree rows
    would otherwise get causal attention)."""
    for layer in runner.compilation_config.static_forward_context.values():
        impl = getattr(layer, "impl", None)
        backend = getattr(layer, "attn_backend", None)
        if impl is None or backend is None:
            continue
        if not isinstance(impl, TreeAttention):
            adapter_for(backend.get_name())  # raises, naming the backend
            raise NotImplementedError(
                f"tree speculation: the {backend.get_name()} attention backend of this "
                "engine is not vllm_lookahead's subclass; another plugin overrides it")
        impl.tree_runtime = runtime


def _draft_tree_runtime(runner: Any) -> TreeRuntime | None:
    """The runtime, its attention layers bound, where the staged drafter
    verifies guess trees with the draft (stage 2 "lookahead"); None where
    it does not, or where an attention layer has no tree adapter (the
    drafter then guesses chains)."""
    state = RunnerSpeculation.of(runner)
    runtime = state.runtime
    if not state.staged or not state.drafter.wants_draft_trees or runtime is None:
        return None
    if not runtime.layers_bound:
        try:
            _bind_attention_layers(runner, runtime)
        except NotImplementedError as e:
            state.drafter.wants_draft_trees = False
            logger.warning("vllm_lookahead: stage 2 guesses chains, not trees: %s", e)
            return None
        runtime.layers_bound = True
    return runtime


class GPUModelRunnerPatch(Patch):
    """Tells a TreeDrafter its batch (``bind_batch``: rows are reordered as
    requests join and leave, and vLLM's custom-class ``propose`` receives rows
    only), hands its drafts to vLLM and their parents to the runtime, sets up
    each tree step after vLLM prepared the inputs, and verifies tree steps
    with the runtime instead of vLLM's rejection sampler. Batches the runtime
    cannot verify (penalties, logprobs, ...) verify the same drafts as chains
    with vLLM's own rejection sampler (exact too)."""

    target = GPUModelRunner

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                *args, **kwargs):
        drafter = tree_drafter(self)
        if drafter is None:
            original = GPUModelRunnerPatch.original("propose_draft_token_ids")
            return original(self, scheduler_output, sampled_token_ids, sampling_metadata,
                            *args, **kwargs)
        if not isinstance(sampled_token_ids, list):
            raise RuntimeError("vllm_lookahead drafters need the sampled tokens as lists "
                               "(disable_padded_drafter_batch, set at engine start)")
        batch = self.input_batch
        num_reqs = batch.num_reqs
        req_ids = list(batch.req_ids[:num_reqs])
        params = [self.requests[r].sampling_params for r in req_ids]
        # A decode row schedules its last token and its drafts; more is a
        # prompt chunk.
        spec = scheduler_output.scheduled_spec_decode_tokens
        prefill_tokens = sum(n for r, n in scheduler_output.num_scheduled_tokens.items()
                             if n > 1 + len(spec.get(r, ())))
        drafter.bind_batch(BatchInfo(
            req_ids=req_ids, greedy=[r in batch.greedy_reqs for r in req_ids],
            trees_verified=trees_verifiable(batch, params),
            prompt_lens=batch.num_prompt_tokens[:num_reqs].tolist(),
            extra_args=[p.extra_args for p in params],
            scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
            max_tokens=[p.max_tokens for p in params], prefill_tokens=prefill_tokens))
        drafts = drafter.draft(DraftInputs(
            sampled_token_ids=sampled_token_ids,
            num_tokens=batch.num_tokens_no_spec[:num_reqs],
            token_ids=batch.token_ids_cpu,
            draft_model=(draft_model.draft_model(self, num_reqs, _draft_tree_runtime(self))
                         if RunnerSpeculation.of(self).staged else None)))
        return tree_runtime(self).set_drafts(req_ids, drafts)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        """A tree step starts where the drafter's trees were scheduled and
        the batch is verifiable."""
        drafter = tree_drafter(self)
        if drafter is not None:
            drafter.step_started()
        original = GPUModelRunnerPatch.original("_prepare_inputs")
        result = original(self, scheduler_output, num_scheduled_tokens)
        runtime = tree_runtime(self)
        if runtime is None:
            return result
        runtime.end_step()
        if not runtime.has_pending_trees or not scheduler_output.scheduled_spec_decode_tokens:
            runtime.discard_drafts()
            return result
        num_reqs = self.input_batch.num_reqs
        req_ids = list(self.input_batch.req_ids[:num_reqs])
        params = [self.requests[r].sampling_params for r in req_ids]
        if not trees_verifiable(self.input_batch, params):
            runtime.discard_drafts()
            return result
        if not runtime.layers_bound:
            _bind_attention_layers(self, runtime)
            runtime.layers_bound = True
        kv_caches = self.kv_caches
        block_table = self.input_batch.block_table.block_tables[0]
        runtime.begin_step(
            req_ids=req_ids,
            scheduled_drafts=scheduler_output.scheduled_spec_decode_tokens,
            sampling_rows=runtime.batch_sampling(req_ids, params),
            num_computed=self.input_batch.num_computed_tokens_cpu[:num_reqs],
            query_start=self.query_start_loc.np[: num_reqs + 1],
            positions=self.positions,
            slot_mapping=block_table.slot_mapping.gpu,
            block_table=block_table.get_device_tensor(num_reqs),
            kv_caches=list(kv_caches.values()) if isinstance(kv_caches, dict)
            else list(kv_caches),
        )
        return result

    def _sample(self, logits, spec_decode_metadata):
        runtime = tree_runtime(self)
        if runtime is None or logits is None:
            return GPUModelRunnerPatch.original("_sample")(self, logits, spec_decode_metadata)
        if runtime.current is None or spec_decode_metadata is None:
            if runtime.drafter.prediction_ranks:
                runtime.observe_sampled_step(logits, _logits_input_tokens(
                    self, spec_decode_metadata))
            return GPUModelRunnerPatch.original("_sample")(self, logits, spec_decode_metadata)
        sampled = runtime.accept_and_compact(
            spec_decode_metadata.draft_token_ids,
            list(spec_decode_metadata.num_draft_tokens), logits,
            _logits_input_tokens(self, spec_decode_metadata)
            if runtime.drafter.prediction_ranks else None)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)


def _logits_input_tokens(runner: Any, spec_decode_metadata: Any) -> Any:
    """The input token of every logits row of the step (vLLM's
    ``logits_indices``: per request its last token, or with drafts its
    root and draft rows)."""
    if spec_decode_metadata is not None:
        indices = spec_decode_metadata.logits_indices
    else:
        num_reqs = runner.input_batch.num_reqs
        indices = runner.query_start_loc.gpu[1:num_reqs + 1] - 1
    return runner.input_ids.gpu[indices]
