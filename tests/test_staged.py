"""Staged drafter without an engine: a toy draft model whose predictions
read its own (simulated) KV cache, so a drafter that resumes from stale KV
drafts wrong tokens."""

import numpy as np
import pytest
import torch
from conftest import batch_info

from vllm_lookahead.config import LookaheadConfigError, StagedConfig
from vllm_lookahead.proposers.budget import PROBE_DRAFTS
from vllm_lookahead.proposers.staged import StagedDrafter
from vllm_lookahead.tree.protocol import DraftInputs, DraftModel

VOCAB = 12


class ToyDraft:
    """Next token = f(previous two tokens), read from the KV cache; peaked
    or flat distributions. Records every forward."""

    def __init__(self, seed=0, sharpness=4.0, max_len=4096):
        gen = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(VOCAB, VOCAB, VOCAB, generator=gen)
        self.logits[torch.arange(VOCAB)[:, None], torch.arange(VOCAB),
                    torch.randint(0, VOCAB, (VOCAB, VOCAB), generator=gen)] += sharpness
        self.kv = {}
        self.max_len = max_len
        self.forwards = 0
        self.tree_forwards = 0

    def next_logits(self, prev2: int, prev1: int) -> torch.Tensor:
        return self.logits[prev2, prev1]

    def greedy(self, tokens: list[int], n: int) -> list[int]:
        out = list(tokens)
        for _ in range(n):
            out.append(int(self.next_logits(out[-2], out[-1]).argmax()))
        return out[len(tokens):]

    def __call__(self, rows, starts, tokens, num_logits, parents=None):
        """A ``DraftForward``; a row's guess tree (``parents``) is written
        to the KV at its flat positions, as vLLM's backends do, and each
        node reads its parent: a drafter that later trusts a tree node's
        KV off the greedy path reads a wrong token."""
        self.forwards += 1
        self.tree_forwards += parents is not None
        out = []
        for i, (row, start, toks, n) in enumerate(zip(rows, starts, tokens, num_logits)):
            tree = parents[i] if parents is not None and parents[i] is not None else []
            causal = len(toks) - len(tree)
            assert causal >= 1
            kv = self.kv.setdefault(int(row), np.full(self.max_len, -1, dtype=np.int64))
            assert start == 0 or kv[start - 1] >= 0, "read before any write"
            kv[start:start + len(toks)] = toks
            rows_out = [self.next_logits(int(kv[p - 1]) if p else 0, int(kv[p]))
                        for p in range(start, start + causal)]
            for j, parent in enumerate(tree):
                before = toks[causal + parent] if parent >= 0 else toks[causal - 1]
                rows_out.append(self.next_logits(int(before), int(toks[causal + j])))
            out.extend(rows_out[len(toks) - n:])
        return torch.stack(out)


def drafter(k=6, clock=None, **config):
    """A staged drafter; the static budget unless ``budget`` says otherwise
    (the measured one drafts nothing before it has timed a few steps)."""
    config.setdefault("budget", "static")
    return StagedDrafter(StagedConfig(**config), num_speculative_tokens=k,
                         max_model_len=4096, max_num_seqs=4, vocab_size=VOCAB,
                         **({"clock": clock} if clock else {}))


def draft(d, model, history, trees=True, draft_trees=False):
    """The drafter's tokens and parents (None: a chain) for one request
    (``draft_trees``: the draft forward takes stage-2 guess trees)."""
    tokens = np.zeros((1, 4096), dtype=np.int64)
    tokens[0, :len(history)] = history
    d.bind_batch(batch_info(["r"], trees_verified=trees))
    drafts = d.draft(DraftInputs([[history[-1]]], np.array([len(history)]), tokens,
                                 DraftModel(np.array([4096]), model, trees=draft_trees)))
    return drafts.tokens[0], drafts.parents[0]


def step(d, model, history, trees=True, draft_trees=False):
    return draft(d, model, history, trees, draft_trees)[0]


def chain_of(tokens, parents):
    chain = []
    for i, p in enumerate(parents):
        if p == i - 1 and len(chain) == i:
            chain.append(tokens[i])
    return chain


@pytest.mark.parametrize("stage2,draft_trees", [("off", False), ("ngram", False),
                                                ("lookahead", False), ("lookahead", True)])
@pytest.mark.parametrize("target_seed", [0, 1])
def test_chain_is_the_drafts_greedy_chain(stage2, draft_trees, target_seed):
    """Over many steps, with a target that accepts part of each draft and
    then differs (or, seed 0, is the draft itself), every step's chain is
    exactly the draft's greedy continuation of the verified tokens (with
    stage-2 guess trees too, whose off-path KV the toy keeps)."""
    model, target = ToyDraft(seed=0), ToyDraft(seed=target_seed)
    d = drafter(k=6, tree=False, stage2=stage2)
    history = [3, 5, 7]
    for _ in range(40):
        draft = step(d, model, history, trees=False, draft_trees=draft_trees)
        assert draft == model.greedy(history, len(draft))
        assert len(draft) == 6
        # Target: its own greedy tokens, accepted while they match the draft.
        truth = target.greedy(history, len(draft) + 1)
        accepted = int(np.cumprod(np.equal(truth[:-1], draft)).sum())
        history += truth[:accepted + 1]
    # Guess trees were verified (the test must not pass by guessing chains).
    assert (model.tree_forwards > 0) == draft_trees
    assert (d.stats()["guess_tree_forwards"] > 0) == draft_trees


def test_stage2_saves_draft_forwards():
    """On a repetitive sequence stage 2 extends the chain by several tokens
    per draft forward; the chains are the same."""
    runs = {}
    for stage2 in (False, True):
        model = ToyDraft(seed=0)
        d = drafter(k=8, tree=False, stage2=stage2)
        history, drafts = [3, 5, 7], []
        for _ in range(30):
            draft = step(d, model, history, trees=False)
            drafts.append(draft)
            history += draft + model.greedy(history + draft, 1)
        runs[stage2] = (drafts, model.forwards)
    assert runs[True][0] == runs[False][0]
    assert runs[False][1] == 30 * 8
    assert runs[True][1] < runs[False][1] / 2


class PositionalDraft(ToyDraft):
    """A draft whose next token depends on the position alone (a fixed random
    text): its predictions past a wrong token are still its greedy chain,
    where a Jacobi iteration shines and an n-gram pool of a random text
    rarely guesses right."""

    def __init__(self, seed=0, max_len=4096):
        super().__init__(seed=seed, max_len=max_len)
        gen = torch.Generator().manual_seed(seed)
        self.text = torch.randint(0, VOCAB, (max_len + 1,), generator=gen).tolist()

    def greedy(self, tokens, n):
        return self.text[len(tokens):len(tokens) + n]

    def __call__(self, rows, starts, tokens, num_logits, parents=None):
        self.forwards += 1
        out = []
        for i, (start, toks, n) in enumerate(zip(starts, tokens, num_logits)):
            tree = parents[i] if parents is not None and parents[i] is not None else []
            causal = len(toks) - len(tree)
            positions = list(range(start, start + causal))
            depth = []
            for parent in tree:
                depth.append(1 + (depth[parent] if parent >= 0 else 0))
                positions.append(start + causal - 1 + depth[-1])
            for p in positions[len(toks) - n:]:
                logits = torch.zeros(VOCAB)
                logits[self.text[p + 1]] = 8.0
                out.append(logits)
        return torch.stack(out)


def test_jacobi_stage2_finds_the_chain_past_wrong_guesses():
    """Stage 2 "lookahead": the draft's predictions past a guess token that
    was wrong are the next guess (Jacobi iteration) where they found more
    chain tokens per guess than the pool lately. On a draft that reads
    only positions, they are its chain: same drafts as with the pool alone,
    far fewer draft forwards."""
    runs = {}
    for stage2 in ("ngram", "lookahead"):
        model = PositionalDraft(seed=2)
        d = drafter(k=8, tree=False, stage2=stage2)
        history, drafts = list(model.text[:3]), []
        for _ in range(20):
            draft = step(d, model, history, trees=False)
            assert draft == model.greedy(history, 8)
            drafts.append(draft)
            history += model.greedy(history, 9)
        runs[stage2] = (drafts, model.forwards, d.stats())
    assert runs["lookahead"][0] == runs["ngram"][0]
    assert runs["ngram"][2]["jacobi_tokens_per_request"] == 0
    assert runs["lookahead"][2]["jacobi_tokens_per_request"] > 2
    assert runs["lookahead"][1] < 0.6 * runs["ngram"][1]


def test_guess_trees_save_draft_forwards():
    """Stage 2 "lookahead" on a draft that takes trees: each draft forward
    verifies the Jacobi guess and several pool continuations at once, so
    where the pool's most recent continuation is not the draft's, the
    chains are the same in fewer forwards than with one guess."""
    runs = {}
    for draft_trees in (False, True):
        model = ToyDraft(seed=3, sharpness=3.0)
        d = drafter(k=8, tree=False, stage2="lookahead")
        history, drafts = [3, 5, 7], []
        for _ in range(30):
            draft = step(d, model, history, trees=False, draft_trees=draft_trees)
            assert draft == model.greedy(history, 8)
            drafts.append(draft)
            history += draft[:3] + model.greedy(history + draft[:3], 1)
        runs[draft_trees] = (drafts, model.forwards)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < 0.8 * runs[False][1]


def test_guess_trees_only_while_the_draft_forward_stays_cheap():
    """Measured budget: a round verifies guess trees while they at most
    double its time (a draft forward of 0.1 s plus 6 ms a token: one row's
    tree of 16 nodes, not eight rows' trees), and one row's trees only
    before the draft's forward is timed."""
    from vllm_lookahead.proposers.staged import _Guess

    d = drafter(k=8, tree=False, stage2="lookahead", budget="measured")
    chain = _Guess([(0, np.arange(3))], 3)
    tree = _Guess([(0, np.arange(3)), (0, np.arange(3, 6)), (0, np.arange(6, 9)),
                   (1, np.arange(9, 16))], 16)
    assert len(tree.tokens) == 16 and not tree.is_chain and chain.is_chain
    assert d._trees_pay(1, [chain], [tree])
    assert not d._trees_pay(2, [chain] * 2, [tree] * 2)
    for tokens in (1, 4, 16, 64):
        d.draft_cost.observe(tokens, 0.1 + 0.006 * tokens)
    d._reads[:] = (0.006 * 512, 512)
    assert d._trees_pay(1, [chain], [tree])
    assert not d._trees_pay(8, [chain] * 8, [tree] * 8)


def test_tree_layout():
    """Chain first, then alternatives (children of the chain node above,
    never the chain's own token), at most k nodes; a flat draft branches, a
    confident one does not."""
    for sharpness, branches in ((0.0, True), (60.0, False)):
        model = ToyDraft(seed=3, sharpness=sharpness)
        d = drafter(k=10, children=3, stage2=False)
        history = [1, 2, 3]
        tokens, parents = draft(d, model, history)
        parents = parents or list(range(-1, len(tokens) - 1))
        assert len(tokens) == 10 and len(parents) == 10
        chain = chain_of(tokens, parents)
        assert chain == model.greedy(history, len(chain))
        for i in range(len(chain), len(tokens)):
            assert -1 <= parents[i] < len(chain)
            depth = parents[i] + 1
            assert tokens[i] != chain[depth]
        assert (len(chain) < len(tokens)) == branches
        # The same batch that the runtime cannot verify: the chain alone.
        assert step(d, model, history, trees=False) == model.greedy(history, 10)


def test_requests_leaving_are_reread():
    model = ToyDraft(seed=0)
    d = drafter(k=4, tree=False)
    history = [3, 5, 7, 9, 2]
    step(d, model, history, trees=False)
    d.bind_batch(batch_info([]))  # the request left the batch
    model.kv.clear()  # ... and its blocks were freed
    assert step(d, model, history, trees=False) == model.greedy(history, 4)


@pytest.mark.parametrize("extra_args,disabled", [
    ({"staged": {"disable": True}}, True), ({"staged_disable": 1}, True),
    ({"staged": {"disable": False}}, False), ({"staged_disable": 0}, False),
    ({"staged": {"disabel": True}}, False), ({"staged_disable": "yes"}, False),
    (None, False),
])
def test_a_request_switches_the_cascade_off(extra_args, disabled, caplog):
    """A disabled request gets no draft and no draft forward; a malformed
    switch is ignored with a warning."""
    import dataclasses

    model = ToyDraft(seed=0)
    d = drafter(k=4, tree=False)
    history = [3, 5, 7, 9, 2]
    tokens = np.zeros((1, 4096), dtype=np.int64)
    tokens[0, :len(history)] = history
    d.bind_batch(dataclasses.replace(batch_info(["r"]), extra_args=[extra_args]))
    drafts = d.draft(DraftInputs([[history[-1]]], np.array([len(history)]), tokens,
                                 DraftModel(np.array([4096]), model)))
    assert (drafts.tokens[0] == []) == disabled
    assert (model.forwards == 0) == disabled
    malformed = extra_args is not None and not disabled and 0 not in extra_args.values() \
        and {"disable": False} not in extra_args.values()
    assert ("ignoring extra_args" in caplog.text) == malformed


def test_config_errors():
    with pytest.raises(LookaheadConfigError, match="depth"):
        StagedConfig(depth=0)
    with pytest.raises(LookaheadConfigError, match="unknown key"):
        StagedConfig.from_dict({"tre": True})
    with pytest.raises(LookaheadConfigError, match="stage2"):
        StagedConfig(stage2="yes")


class Clock:
    """A fake ``time.perf_counter`` the simulated engine advances."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class TimedToy(ToyDraft):
    """A ToyDraft whose every forward takes ``seconds`` (and ``per_token``
    per token fed) on ``clock``."""

    def __init__(self, clock, seconds, per_token=0.0, **kwargs):
        super().__init__(**kwargs)
        self.clock, self.seconds, self.per_token = clock, seconds, per_token

    def __call__(self, rows, starts, tokens, num_logits):
        self.clock.t += self.seconds + self.per_token * sum(map(len, tokens))
        return super().__call__(rows, starts, tokens, num_logits)


def serve(d, model, target, clock, steps, trees, step_seconds=(0.1, 0.001), requests=1,
          prompt_len=16, max_tokens=None, knee=(0, 0.0)):
    """``requests`` requests (``prompt_len`` prompt tokens, ``max_tokens``
    told to the drafter) through ``steps`` simulated engine steps: each
    target forward of n tokens takes a + b * n seconds (``step_seconds``),
    and h more per token past m (``knee`` = (m, h)), and accepts each
    request's draft nodes along the target's greedy path (``target``'s).
    Checks that every draft's chain is the draft model's greedy chain;
    returns per step the draft nodes and draft forwards (summed over
    requests) and each request's tokens."""
    ids = [f"r{i}" for i in range(requests)]
    histories = [[3 + i, 5, 7] + [(i * j) % VOCAB for j in range(prompt_len - 3)]
                 for i in range(requests)]
    new = [[h[-1]] for h in histories]
    tokens = np.zeros((requests, 4096), dtype=np.int64)
    pending = [([], []) for _ in ids]
    log = []
    for step in range(steps):
        d.step_started()
        # The first step is the prompts' prefill (the fit then tells a
        # step's fixed cost from a token's).
        scheduled = (sum(map(len, histories)) if step == 0
                     else sum(1 + len(p) for p, _ in pending))
        clock.t += (step_seconds[0] + step_seconds[1] * scheduled
                    + knee[1] * max(scheduled - knee[0], 0) * (step > 0))
        for i, (draft, parents) in enumerate(pending):
            node, new[i] = -1, []
            while True:  # the target verifies the last draft (or none)
                truth = target.greedy(histories[i] + new[i], 1)[0]
                node = next((j for j in range(node + 1, len(draft))
                             if parents[j] == node and draft[j] == truth), None)
                new[i].append(truth)
                if node is None:
                    break
            histories[i] += new[i] if step else []
            tokens[i, :len(histories[i])] = histories[i]
        d.bind_batch(batch_info(ids, trees_verified=trees, scheduled_tokens=scheduled,
                                prompt_lens=[prompt_len] * requests,
                                max_tokens=max_tokens and [max_tokens] * requests,
                                prefill_tokens=scheduled if step == 0 else 0))
        forwards = model.forwards
        drafts = d.draft(DraftInputs(new, np.array([len(h) for h in histories]), tokens,
                                     DraftModel(np.full(requests, 4096), model)))
        for i in range(requests):
            draft = drafts.tokens[i]
            parents = drafts.parents[i] or list(range(-1, len(draft) - 1))
            chain = chain_of(draft, parents)
            assert chain == model.greedy(histories[i], len(chain))
            pending[i] = (draft, parents)
        log.append((sum(len(t) for t in drafts.tokens), model.forwards - forwards))
    return np.array(log), histories


@pytest.mark.parametrize("trees", [False, True])
def test_measured_budget_drafts_what_pays(trees):
    """Simulated engine, one request, the draft model as the target (every
    chain token is accepted): with a draft forward at 5% of a target step
    the measured budget drafts (nearly) the static budget's full chains;
    at 2.5 target steps (a draft round costs more than any token it can
    add) it stops drafting after its first probes and drafts nothing
    more until it probes again (REPROBE_STEPS later)."""
    from vllm_lookahead.proposers.budget import REPROBE_STEPS

    k = 6
    for seconds, drafts in ((0.005, True), (0.25, False)):
        clock = Clock()
        model = TimedToy(clock, seconds, seed=0, sharpness=8.0)
        d = drafter(k=k, clock=clock, budget="measured", tree=trees, stage2=False)
        log, _ = serve(d, model, ToyDraft(seed=0, sharpness=8.0), clock, 60, trees)
        assert log[:3, 0].sum() == 0  # no draft before the step time is fitted
        late = log[20:]
        if drafts:
            assert late[:, 0].mean() >= k - 1, late
        else:
            assert late.sum() == 0, log
            assert log[:20, 1].sum() >= 1  # it did probe
    assert 60 < REPROBE_STEPS


def test_measured_budget_learns_a_draft_that_the_target_rejects():
    """A confident draft that the target disagrees with: the calibration
    learns that its confident nodes are rejected, and the cascade stops
    paying for long chains (static: 6 forwards and nodes every step)."""
    clock = Clock()
    model = TimedToy(clock, 0.005, seed=0, sharpness=8.0)
    d = drafter(k=6, clock=clock, budget="measured", tree=False, stage2=False)
    log, _ = serve(d, model, ToyDraft(seed=5, sharpness=8.0), clock, 120, trees=False)
    late = log[60:]
    assert late[:, 1].mean() <= 1.5 and late[:, 0].mean() <= 1.5, late
    assert d.calibration.of(np.array([0.99]))[0] < 0.5


def test_budget_config():
    assert StagedConfig().budget == "measured"
    with pytest.raises(LookaheadConfigError, match="budget"):
        StagedConfig(budget="fixed")


def test_measured_budget_drafts_for_a_loaded_batch():
    """Eight requests whose draft forward (0.25 s) costs half a target step
    (0.5 s): no single request's chain pays for it, all of them together
    do (a perfect draft: 6 tokens per request for 6 forwards and a few
    more target tokens), so the budget must not learn only from a few
    probing requests (it once probed with 2, never paid, never drafted)."""
    clock = Clock()
    model = TimedToy(clock, 0.25, seed=0, sharpness=8.0)
    d = drafter(k=6, clock=clock, budget="measured", tree=False, stage2=False)
    log, histories = serve(d, model, ToyDraft(seed=0, sharpness=8.0), clock, 40, False,
                           step_seconds=(0.45, 0.005), requests=8)
    late = log[15:]
    assert late[:, 0].mean() >= 8 * 3, late
    # And more tokens per second than plain steps (0.49 s for 8 tokens).
    produced = sum(len(h) - 16 for h in histories)
    assert produced / clock.t > 1.2 * 8 / 0.49


def test_measured_budget_drafts_a_loaded_batch_past_the_knee():
    """Eight requests; the target's step costs 0.49 s plain and 24 ms more
    per token past 8 (its compute), a draft round 0.12 s + 7 ms a token: a
    perfect draft's chains of 6 pay (about 20 tokens/s against plain's 16).
    Every drafting step has 8 trees of about the same size, so the fit
    cannot tell a tree's cost from its nodes'; it once put it all on the
    tree (0.16 s each), the first node then never paid for it, and a batch
    of 8 on Qwen 1.5B / 0.5B stopped drafting after a few steps."""
    clock = Clock()
    model = TimedToy(clock, 0.12, per_token=0.007, seed=0, sharpness=8.0)
    d = drafter(k=6, clock=clock, budget="measured", tree=False, stage2=False)
    log, histories = serve(d, model, ToyDraft(seed=0, sharpness=8.0), clock, 120, False,
                           step_seconds=(0.45, 0.005), requests=8, knee=(8, 0.024))
    late = log[30:]
    assert (late[:, 0] > 0).mean() > 0.9, late
    produced = sum(len(h) - 16 for h in histories)
    assert produced / clock.t > 1.1 * 8 / 0.49


def test_draft_round_costs_at_least_its_tokens_read():
    """The draft's forward time is a line fitted through small rounds (weight
    reads: 0.1 s whatever the tokens); a round of 64 tokens costs at least
    what the draft measured per token reading long spans (10 ms), not the
    line's 0.1 s."""
    d = drafter(k=6, budget="measured")
    for tokens in (2, 2, 3, 2, 4, 2):
        d.draft_cost.observe(tokens, 0.1)
    d._reads = np.array([10.0, 1000.0])
    assert d._draft_seconds(2) == pytest.approx(0.1, rel=0.05)
    assert d._draft_seconds(64) == pytest.approx(0.64, rel=0.01)


def test_a_forgotten_draft_cost_is_not_refitted_from_one_catch_up_read():
    """Drafting paused long enough that the draft's cost is probed again;
    the first forward measured afresh reads 200 tokens left unread meanwhile
    (0.12 s + 7 ms a token): a usual round of 16 tokens is still priced
    near its 0.23 s, not as a 1.5 s forward."""
    from vllm_lookahead.proposers.budget import DraftCostModel

    cost = DraftCostModel()
    for tokens in (2, 8, 16, 4, 8, 12, 2, 16) * 4:
        cost.observe(tokens, 0.12 + 0.007 * tokens)
    cost.forget()
    assert not cost.known and cost.predict(16) == 0.0  # probed again
    cost.observe(200, 0.12 + 0.007 * 200)
    assert cost.known
    assert cost.predict(16) == pytest.approx(0.12 + 0.007 * 16, rel=0.2)


def test_measured_budget_reads_a_prompt_only_where_it_pays():
    """Eight requests with 300-token prompts and a draft that reads a token
    in 2 ms (a prompt: 0.65 s, more than the 0.49 s target step of the
    batch). With 4 tokens left per request no drafting can save that: the
    prompts are never read into the draft, beyond the few probing rows
    that time the draft while its cost is unknown. With thousands left
    they are read and drafted (perfect draft)."""
    for max_tokens in (4, None):
        clock = Clock()
        model = TimedToy(clock, 0.05, per_token=0.002, seed=0, sharpness=8.0)
        d = drafter(k=6, clock=clock, budget="measured", tree=False, stage2=False)
        log, _ = serve(d, model, ToyDraft(seed=0, sharpness=8.0), clock, 30, False,
                       step_seconds=(0.45, 0.005), requests=8, prompt_len=300,
                       max_tokens=max_tokens)
        if max_tokens:
            assert len(model.kv) <= PROBE_DRAFTS, model.kv.keys()
            assert d.stats()["rows_not_read"] > 0
        else:
            assert len(model.kv) == 8
            assert log[15:, 0].mean() >= 8 * 3, log
