"""`LLM.score` and `LLM.perplexity`: equal to log-softmax of `LLM.logits` at the same positions, the same bits
whether a context was cached or not, each shared context run once, windows as lm-evaluation-harness cuts them."""
from __future__ import annotations

import numpy as np
import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.errors import InvalidRequestError
from jaxgen.scoring import encode_pair, rolling_windows

ENGINE = EngineConfig(num_slots=8, max_len=128, max_queue=64, seed=0, chunk=32, prefill_budget=128)
ATOL = 1e-4  # chunked prefill against one whole-prompt forward, float32


def engine_llm(tiny_llm, **changes):
    import dataclasses
    return jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                      engine_config=dataclasses.replace(ENGINE, **changes))


@pytest.fixture(scope="module")
def llm(tiny_llm):
    with engine_llm(tiny_llm) as llm:
        yield llm


def log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def reference(llm, context, continuation):
    """Log-probs of the continuation's tokens from one `LLM.logits` forward, and the greedy flag."""
    ids = list(context) + list(continuation)
    logp = log_softmax(llm.logits(ids).astype(np.float64))[len(context) - 1:-1]
    chosen = logp[np.arange(len(continuation)), continuation]
    return chosen, bool((logp.argmax(-1) == np.asarray(continuation)).all())


def mc_pairs(rng, contexts=3, choices=4):
    """Multiple-choice style token pairs: each context with `choices` continuations of 1-5 tokens."""
    out = []
    for _ in range(contexts):
        context = rng.integers(3, 380, rng.integers(5, 70)).tolist()
        out += [(context, rng.integers(3, 380, rng.integers(1, 6)).tolist()) for _ in range(choices)]
    return out


def test_score_equals_log_softmax_of_logits(llm):
    pairs = mc_pairs(np.random.default_rng(0))
    scores = llm.score(pairs)
    assert len(scores) == len(pairs)
    for (context, continuation), ids, lp, total in zip(pairs, scores.token_ids, scores.token_logprobs, scores.sums):
        ref, _ = reference(llm, context, continuation)
        assert ids.tolist() == continuation
        np.testing.assert_allclose(lp, ref, rtol=0, atol=ATOL)
        assert total == pytest.approx(ref.sum(), abs=ATOL * len(ref))


def test_greedy_flag_is_the_argmax_continuation(llm):
    context = [5, 17, 29, 41, 53, 65, 77]
    greedy = []
    for _ in range(4):  # the greedy continuation, token by token
        greedy.append(int(llm.logits(context + greedy)[-1].argmax()))
    other = greedy[:2] + [(greedy[2] + 1) % 380 + 3] + greedy[3:]
    scores = llm.score([(context, greedy), (context, other), (context, greedy[:1])])
    assert scores.greedy.tolist() == [True, False, True]
    assert scores.greedy.tolist() == [reference(llm, context, c)[1] for c in (greedy, other, greedy[:1])]


@pytest.mark.parametrize("chunk", [16, 32])
def test_cached_contexts_give_the_same_bits_and_run_once(tiny_llm, chunk):
    """Scored twice (the second time every context is cached) and on a fresh engine: the same bits; shared
    contexts run once (each further continuation reruns only the context's last token). With 16-token chunks
    too, whose calls take four or more chunks (a lone one would round differently)."""
    pairs = mc_pairs(np.random.default_rng(1))
    with engine_llm(tiny_llm, chunk=chunk) as llm, engine_llm(tiny_llm, chunk=chunk) as fresh:
        before = llm.engine.stats()["prefill_tokens_total"]
        first = llm.score(pairs)
        ran = llm.engine.stats()["prefill_tokens_total"] - before
        contexts = {tuple(c) for c, _ in pairs}
        assert ran == sum(len(c) for c in contexts) + sum(len(x) for _, x in pairs) + len(pairs) - len(contexts)
        again = llm.score(pairs)
        alone = [fresh.score([pair]) for pair in pairs[:3]]  # one at a time: calls of one chunk and padding
        cold = fresh.score(pairs)
    for a, b in zip(first.token_logprobs, [x.token_logprobs[0] for x in alone]):
        assert a.tobytes() == b.tobytes()
    for other in (again, cold):
        for a, b in zip(first.token_logprobs, other.token_logprobs):
            assert a.tobytes() == b.tobytes()
        assert first.greedy.tolist() == other.greedy.tolist()


def test_text_pairs_split_like_the_harness(llm):
    tok = llm.tokenizer
    context, continuation = "The capital of France is ", "Paris"
    ctx_ids, cont_ids = encode_pair(tok, context, continuation, llm.prefix_token_id)
    assert ctx_ids == tok.encode("The capital of France is")  # the trailing space moves to the continuation
    assert ctx_ids + cont_ids == tok.encode("The capital of France is Paris")
    by_text, by_ids = llm.score([(context, continuation)]), llm.score([(ctx_ids, cont_ids)])
    assert by_text.token_logprobs[0].tobytes() == by_ids.token_logprobs[0].tobytes()
    empty = encode_pair(tok, "", "Paris", llm.prefix_token_id)
    assert empty == ([llm.prefix_token_id], tok.encode("Paris"))


@pytest.mark.parametrize("length", [1, 5, 126, 127, 128, 300])
def test_rolling_windows_are_the_harness_windows(length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    ids = list(range(10, 10 + length))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 2, 127, 1)]
    assert rolling_windows(ids, 2, 127) == [(list(a), list(b)) for a, b in theirs]


def test_perplexity_over_windows_equals_the_logits(llm):
    """A text longer than the engine's context is scored over disjoint windows: each token's log-prob equals
    log-softmax of `LLM.logits` over its window's prompt."""
    rng = np.random.default_rng(2)
    short, long = rng.integers(3, 380, 40).tolist(), rng.integers(3, 380, 300).tolist()
    scores = llm.perplexity([short, long])
    for ids, lp in zip((short, long), scores.token_logprobs):
        expected = np.concatenate([reference(llm, c, x)[0]
                                   for c, x in rolling_windows(ids, llm.prefix_token_id, llm.engine.context_limit - 1)])
        assert len(lp) == len(ids)
        np.testing.assert_allclose(lp, expected, rtol=0, atol=ATOL)
    assert scores.counts.tolist() == [40, 300]
    np.testing.assert_allclose(scores.perplexities, np.exp(-scores.sums / scores.counts))
    text = llm.perplexity(["The capital of France is Paris."])
    assert text.counts[0] == len(llm.tokenizer.encode("The capital of France is Paris."))


def test_bad_pairs_are_refused(llm):
    with pytest.raises(InvalidRequestError, match="continuation"):
        llm.score([([5, 6], [])])
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.score([([5, 6], [10**6])])
    with pytest.raises(InvalidRequestError, match="no room"):
        llm.score([([5], list(range(3, 3 + llm.engine.context_limit)))])
    long_context = llm.score([(list(range(3, 303)), [7, 8])])  # cut from the left to fit
    ref, _ = reference(llm, list(range(3, 303))[-(llm.engine.context_limit - 2):], [7, 8])
    np.testing.assert_allclose(long_context.token_logprobs[0], ref, rtol=0, atol=ATOL)
