"""vLLM's rejection sampler: greedy rows of a batch that mixes greedy and
sampled requests are re-verified exactly, and the per-token sampling
parameters of chain steps are expanded correctly on CPU."""

from __future__ import annotations

import torch
from vllm.v1.sample import rejection_sampler
from vllm.v1.sample.rejection_sampler import GREEDY_TEMPERATURE, RejectionSampler

from vllm_lookahead.tree.runtime import raw_argmax_is_greedy, verify_greedy_chains
from vllm_lookahead.vllm import Patch


class RejectionSamplerPatch(Patch):
    """Steps without drafts are sampled by vLLM's plain sampler. vLLM 0.32's
    CPU verification of a batch mixing greedy and sampled requests changes
    greedy requests' tokens (measured: outputs differ from plain vLLM); the
    greedy rows are redone by the tree runtime's chain verification. (Tree
    steps never reach this sampler: the model runner hands them to the
    runtime.)"""

    target = RejectionSampler

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        if (metadata.max_spec_len == 0 and sampling_metadata.max_num_logprobs is None
                and sampling_metadata.no_penalties
                and not sampling_metadata.bad_words_token_ids):
            # vLLM 0.32 sends every step of a speculative engine through this
            # sampler, drafts or not; a step without drafts is plain
            # sampling of one row per request (its bonus tokens), which
            # costs a third as much (measured: 1.4 -> 0.35 ms a step at
            # batch 16 on CPU).
            return self.sampler(logits=logits, sampling_metadata=sampling_metadata)
        original = RejectionSamplerPatch.original("forward")
        output = original(self, metadata, draft_probs, logits, sampling_metadata)
        if (sampling_metadata.all_greedy or sampling_metadata.all_random
                or not raw_argmax_is_greedy(sampling_metadata)):
            return output
        greedy = (sampling_metadata.temperature == GREEDY_TEMPERATURE).cpu()
        ours = verify_greedy_chains(metadata.draft_token_ids,
                                    list(metadata.num_draft_tokens), logits)
        output.sampled_token_ids[greedy.to(output.sampled_token_ids.device)] = \
            ours[greedy.to(ours.device)].to(output.sampled_token_ids.dtype)
        return output


class ExpandBatchToTokensPatch(Patch):
    """vLLM 0.32's CPU stand-in for the Triton ``expand_kernel`` converts its
    output to int64 and fills that copy (vLLM issue #55005, fix in PR #55006,
    unmerged): the float32 temperature / top-p and int32 top-k that the
    rejection sampler expands per draft token stay uninitialised memory, so
    every CPU chain step with a sampled request divides logits by garbage
    (a wrong distribution) or crashes ``apply_top_k_top_p`` with an
    out-of-range top-k. CPU tensors are expanded here at their own dtype;
    other devices keep vLLM's kernel."""

    target = rejection_sampler

    def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                               replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
        if x.device.type != "cpu":
            return ExpandBatchToTokensPatch.original("expand_batch_to_tokens")(
                x, cu_num_tokens, num_tokens, replace_from, replace_to)
        assert cu_num_tokens.shape[0] == x.shape[0]
        cu = cu_num_tokens.to(torch.int64)
        counts = torch.diff(cu, prepend=cu.new_zeros(1))
        x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
        return torch.repeat_interleave(x, counts.to(x.device), output_size=num_tokens)
