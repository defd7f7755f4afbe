"""vLLM's rejection sampler: greedy rows of a batch that mixes greedy and
sampled requests are re-verified exactly."""

from __future__ import annotations

from vllm.v1.sample.rejection_sampler import GREEDY_TEMPERATURE, RejectionSampler

from vllm_lookahead.tree.runtime import raw_argmax_is_greedy, verify_greedy_chains
from vllm_lookahead.vllm import Patch


class RejectionSamplerPatch(Patch):
    """vLLM 0.32's CPU verification of a batch mixing greedy and sampled
    requests changes greedy requests' tokens (measured: outputs differ from
    plain vLLM); the greedy rows are redone by the tree runtime's chain
    verification. (Tree steps never reach this sampler: the model runner
    hands them to the runtime.)"""

    target = RejectionSampler

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
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
