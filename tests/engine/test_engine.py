"""Engine behaviour on the tiny model: batch independence, stops, n, usage, cancellation, recompiles."""
from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from jaxgen.events import Admitted, ChoiceUpdate, Done
from jaxgen.errors import InvalidRequestError, QueueFullError
from jaxgen.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 80], list(range(40, 71)), [100, 101, 9, 250, 251, 7, 7, 7], list(range(3, 60, 2))]


def drain(handle):
    """Events of one request -> (tokens per choice, text per choice, finish per choice, Done)."""
    tokens, text, finish, done = {}, {}, {}, None
    for event in handle:
        if isinstance(event, ChoiceUpdate):
            tokens.setdefault(event.index, []).extend(t.token_id for t in event.tokens)
            text[event.index] = text.get(event.index, "") + event.text
            if event.finish_reason:
                finish[event.index] = event.finish_reason
        elif isinstance(event, Done):
            done = event
        elif not isinstance(event, Admitted):
            raise event
    return tokens, text, finish, done


def run_alone(llm, ids, params):
    return drain(llm.engine.submit(ids, params))


MIXED = [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=25, ignore_eos=True),
    SamplingParams(temperature=1.3, top_k=5, min_p=0.05, seed=3, max_tokens=12, ignore_eos=True,
                   repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),
    SamplingParams(temperature=0.7, seed=99, n=2, max_tokens=18, logit_bias={7: 5.0, 9: -100.0}, ignore_eos=True,
                   logprobs=True, top_logprobs=3),
]


def test_outputs_do_not_depend_on_batch_companions(engine_llm):
    alone = [run_alone(engine_llm, ids, p)[0] for ids, p in zip(PROMPTS, MIXED)]
    results = [None] * len(MIXED)

    def consume(i, handle):
        results[i] = drain(handle)[0]

    threads = []
    for i, (ids, p) in enumerate(zip(PROMPTS, MIXED)):  # staggered arrivals while others decode
        handle = engine_llm.engine.submit(ids, p)
        threads.append(threading.Thread(target=consume, args=(i, handle)))
        threads[-1].start()
        time.sleep(0.05 * i)
    noise = [engine_llm.engine.submit(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True))
             for _ in range(3)]
    for t in threads:
        t.join(60)
    for h in noise:
        drain(h)
    assert results == alone


def test_n_choices_use_seed_plus_index(engine_llm):
    params = SamplingParams(temperature=1.0, seed=40, n=3, max_tokens=10, ignore_eos=True)
    tokens, _, _, done = run_alone(engine_llm, PROMPTS[1], params)
    for i in range(3):
        single = SamplingParams(temperature=1.0, seed=40 + i, max_tokens=10, ignore_eos=True)
        assert run_alone(engine_llm, PROMPTS[1], single)[0][0] == tokens[i]
    assert len({tuple(t) for t in tokens.values()}) > 1
    assert done.completion_tokens == 30 and done.prompt_tokens == len(PROMPTS[1])


def greedy_text(llm, ids, n=30):
    tokens, text, finish, _ = run_alone(llm, ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    return text[0]


def test_stop_string_across_tokens_and_at_start(engine_llm):
    full = greedy_text(engine_llm, PROMPTS[2])
    assert len(full) > 12
    stop = full[5:9]  # spans whatever token boundary lies there
    _, text, finish, _ = run_alone(engine_llm, PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30,
                                                                          ignore_eos=True, stop=(stop, "\x00zz")))
    assert text[0] == full[: full.index(stop)] and finish[0] == "stop"
    _, text, finish, _ = run_alone(engine_llm, PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30,
                                                                          ignore_eos=True, stop=full[:2]))
    assert text[0] == "" and finish[0] == "stop"


def test_streamed_text_is_held_back_only_while_a_stop_could_begin(engine_llm):
    full = greedy_text(engine_llm, PROMPTS[3])
    never = full[3:6] + "\x01"  # begins like the output but never completes
    handle = engine_llm.engine.submit(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                                 stop=never))
    pieces = [e.text for e in handle if isinstance(e, ChoiceUpdate)]
    assert "".join(pieces) == full
    emitted = "".join(pieces[:-1])
    assert len(full) - len(emitted) <= len(never)  # at most a stop's length was ever held back


def test_max_tokens_and_context_full_end_with_length(engine_llm):
    _, _, finish, done = run_alone(engine_llm, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=7,
                                                                          ignore_eos=True))
    assert finish[0] == "length" and done.completion_tokens == 7
    limit = engine_llm.engine.context_limit
    ids = [5] * (limit - 4)
    tokens, _, finish, done = run_alone(engine_llm, ids, SamplingParams(temperature=0.0, max_tokens=50,
                                                                        ignore_eos=True))
    assert finish[0] == "length" and done.completion_tokens == 4


def test_eos_stops_unless_ignored(engine_llm):
    """A forced EOS ends the choice at once, as its one token (with no text); under ignore_eos it is a token."""
    eos = engine_llm.tokenizer.eos_token_id
    bias = {eos: 100.0}
    tokens, text, finish, done = run_alone(engine_llm, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5,
                                                                                  logit_bias=bias))
    assert finish[0] == "stop" and done.completion_tokens == 1 and text[0] == "" and tokens[0] == [eos]
    ((stopped,),) = engine_llm.generate(PROMPTS[0], max_tokens=5, logit_bias=bias)
    assert (stopped.token_ids, stopped.text, stopped.finish_reason) == ([eos], "", "stop")
    assert [info.token_id for info in stopped.logprobs] == [eos]
    tokens, _, finish, done = run_alone(engine_llm, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=5,
                                                                               logit_bias=bias, ignore_eos=True))
    assert finish[0] == "length" and tokens[0] == [eos] * 5


def test_prompt_logprobs_match_log_softmax_of_logits(engine_llm):
    ids = PROMPTS[1]
    handle = engine_llm.engine.submit(ids, SamplingParams(max_tokens=0, loglikelihood=True, logprobs=True,
                                                          top_logprobs=5))
    admitted = next(iter(handle))
    logits = engine_llm.logits(ids).astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = logp[np.arange(len(ids) - 1), ids[1:]]
    got = np.array([t.logprob for t in admitted.prompt_scores])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    top = admitted.prompt_scores[0].top
    assert len(top) == 5 and top[0][0] == int(np.argmax(logp[0]))


def test_validation_errors_are_raised_at_submit(engine_llm):
    with pytest.raises(InvalidRequestError) as e:
        engine_llm.engine.submit([1] * engine_llm.engine.context_limit, SamplingParams(max_tokens=1))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as e:
        engine_llm.engine.submit([1, 2], SamplingParams(n=9))
    assert e.value.param == "n"
    with pytest.raises(InvalidRequestError) as e:
        engine_llm.engine.submit([1, 2], SamplingParams(temperature=3.0))
    assert e.value.param == "temperature"


def wait_idle(engine, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = engine.stats()
        if stats["running_slots"] == 0 and stats["queue_depth"] == 0:
            return stats
        time.sleep(0.01)
    return engine.stats()


def test_cancel_frees_slots(engine_llm):
    handle = engine_llm.engine.submit(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=100, n=2,
                                                                 ignore_eos=True))
    it = iter(handle)
    while not isinstance(next(it), ChoiceUpdate):
        pass
    assert engine_llm.engine.stats()["running_slots"] == 2
    handle.cancel()
    assert wait_idle(engine_llm.engine)["running_slots"] == 0


def test_queue_full_is_refused(tiny_llm):
    import jaxgen
    from jaxgen.engine import EngineConfig

    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                     engine_config=EngineConfig(num_slots=1, max_len=64, max_queue=2))
    handles = []
    with pytest.raises(QueueFullError):
        for _ in range(10):
            handles.append(llm.engine.submit(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True)))
    assert 2 <= len(handles) <= 3  # two waiting, plus at most one already in the single slot
    for h in handles:
        h.cancel()
    assert wait_idle(llm.engine)["running_slots"] == 0


def test_random_requests_with_cancellations_leave_every_slot_free(engine_llm):
    rng = random.Random(0)
    handles = []
    for _ in range(300):
        params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 6), n=rng.randint(1, 3),
                                ignore_eos=rng.random() < 0.5, seed=rng.randint(0, 9))
        ids = [rng.randrange(3, 380) for _ in range(rng.randint(1, 40))]
        handles.append(engine_llm.engine.submit(ids, params))
        if rng.random() < 0.3:
            rng.choice(handles).cancel()
    finished = 0
    for h in handles:
        if not h.cancelled.is_set():
            finished += drain(h)[3] is not None
    stats = wait_idle(engine_llm.engine)
    assert stats["running_slots"] == 0 and stats["queue_depth"] == 0
    assert finished > 150


def test_mixed_workload_triggers_no_recompile(engine_llm, compile_counter):
    rng = random.Random(1)
    before = compile_counter.count
    handles = []
    for i in range(40):
        ids = [rng.randrange(3, 380) for _ in range(rng.randint(1, 120))]
        params = SamplingParams(
            temperature=rng.choice([0.0, 0.5, 1.5]), top_p=rng.choice([1.0, 0.7]), top_k=rng.choice([0, 3]),
            min_p=rng.choice([0.0, 0.1]), presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
            repetition_penalty=rng.choice([1.0, 1.2]), logit_bias={rng.randrange(384): rng.uniform(-5, 5)},
            max_tokens=rng.randint(1, 8) if len(ids) < 120 else 1, n=rng.randint(1, 3), seed=rng.choice([None, 5]),
            logprobs=bool(i % 2), top_logprobs=(i % 2) * rng.randint(0, 20), loglikelihood=i % 3 == 0,
            stop=rng.choice([(), ("a",)]), ignore_eos=bool(i % 2))
        handles.append(engine_llm.engine.submit(ids, params))
    for h in handles:
        drain(h)
    engine_llm.chat([{"role": "user", "content": "Hi there"}], max_tokens=3, logprobs=True, top_logprobs=2)
    assert compile_counter.count == before


# ---- LLM.generate

def test_generate_refuses_params_mixed_with_fields(engine_llm):
    """Fields beside `params` would be silently ignored: refused, naming them."""
    with pytest.raises(TypeError, match="max_tokens, temperature"):
        engine_llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), temperature=1.0, max_tokens=5)
    (only,) = engine_llm.generate(PROMPTS[0], max_tokens=3, ignore_eos=True)  # fields alone still apply
    assert len(only[0].token_ids) == 3


def test_generate_queues_all_prompts_or_none(tiny_llm, monkeypatch):
    """When the queue fills part-way through a batch, the prompts already queued are cancelled."""
    import jaxgen
    from jaxgen.engine import EngineConfig

    llm = jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny",
                     engine_config=EngineConfig(num_slots=1, max_len=64, max_queue=2))
    queued, submit = [], llm.engine.submit
    monkeypatch.setattr(llm.engine, "submit", lambda *a, **k: queued.append(submit(*a, **k)) or queued[-1])
    with pytest.raises(QueueFullError):
        llm.generate([PROMPTS[0]] * 10, SamplingParams(max_tokens=50, ignore_eos=True))
    assert 2 <= len(queued) <= 3 and all(h.cancelled.is_set() for h in queued)
    stats = wait_idle(llm.engine)
    assert stats["running_slots"] == 0 and stats["queue_depth"] == 0
