"""The engine core on the tiny model: chunked prefill mixed with decode, prefix caching (bit-identical on and
off), slots and prefixes accounted for after random traffic, per-request failures, close()."""
from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import textwrap
import threading

import numpy as np
import psutil
import pytest

import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.errors import InvalidRequestError, JaxgenError
from jaxgen.events import Admitted, ChoiceUpdate, Done
from jaxgen.prefix import chunk_end, shared_chunk_end
from jaxgen.sampling import SamplingParams
from server_helpers import wait_for

CORE = EngineConfig(num_slots=8, max_len=256, max_queue=512, seed=0, chunk=64, prefill_budget=256)
SYSTEM = list(range(3, 3 + 70))  # a shared "system prompt": four whole chunks and some


def tiny_engine_llm(tiny_llm, **changes):
    """A fresh LLM over the tiny model's weights with the CORE engine (changed by `changes`)."""
    import dataclasses
    config = dataclasses.replace(CORE, **changes)
    return jaxgen.LLM(tiny_llm.cfg, tiny_llm.params, tiny_llm.tokenizer, model_id="tiny", engine_config=config)


@pytest.fixture(scope="module")
def cached(tiny_llm):
    llm = tiny_engine_llm(tiny_llm)
    llm.engine.warmup()
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def uncached(tiny_llm):
    llm = tiny_engine_llm(tiny_llm, prefix_cache=False)
    llm.engine.warmup()
    yield llm
    llm.close()


def record(handle):
    """Every event of one request as plain comparable values (floats kept bit for bit): the prompt scores,
    each choice's updates in order, and the usage (choices interleave in any order, so they are kept apart)."""
    out = {"choices": {}}
    for event in handle:
        if isinstance(event, Admitted):
            out["admitted"] = (event.prompt_tokens, None if event.prompt_scores is None else
                               [(t.token_id, t.logprob, t.top) for t in event.prompt_scores])
        elif isinstance(event, ChoiceUpdate):
            out["choices"].setdefault(event.index, []).append(
                (event.text, [(t.token_id, t.logprob, t.top) for t in event.tokens], event.finish_reason))
        elif isinstance(event, Done):
            out["done"] = (event.prompt_tokens, event.completion_tokens)
        else:
            raise event
    return out


def split_floats(value, floats):
    """`value` with every float replaced by a marker, the floats appended to `floats` in order."""
    if isinstance(value, float):
        floats.append(value)
        return "<float>"
    if isinstance(value, dict):
        return {k: split_floats(v, floats) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [split_floats(v, floats) for v in value]
    return value


def assert_same(a, b, atol: float = 0.0):
    """Records equal in every token, text and finish reason, and in every log-prob to `atol` (0: bit for bit)."""
    fa, fb = [], []
    assert split_floats(a, fa) == split_floats(b, fb)
    assert np.allclose(fa, fb, rtol=0, atol=atol), np.abs(np.subtract(fa, fb)).max()


def workload(seed: int, count: int):
    """Requests sharing prefixes (the system prompt, a few-shot block), with greedy, seeded, n > 1, logprobs
    and scoring mixed."""
    rng = random.Random(seed)
    few_shot = SYSTEM + list(range(200, 240))
    out = []
    for i in range(count):
        base = rng.choice([SYSTEM, few_shot, []])
        ids = base + [rng.randrange(3, 380) for _ in range(rng.randrange(1, 40))]
        kind = i % 4
        params = [SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 12), ignore_eos=True),
                  SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=8, ignore_eos=True, logprobs=True,
                                 top_logprobs=2),
                  SamplingParams(temperature=0.8, seed=i, n=2, max_tokens=6, ignore_eos=True),
                  SamplingParams(max_tokens=0, loglikelihood=True, logprobs=True, top_logprobs=3)][kind]
        out.append((ids, params))
    return out


def test_prefix_cache_changes_no_bit_one_request_at_a_time(cached, uncached):
    """Greedy, seeded, n = 2, logprobs and prompt scores are the same bits with the cache on and off, and the
    cache did serve most of the shared prefixes."""
    hits_before = cached.engine.stats()["prefix_cache_hit_tokens_total"]
    for ids, params in workload(seed=1, count=24):
        assert_same(record(cached.engine.submit(ids, params)), record(uncached.engine.submit(ids, params)))
    hits = cached.engine.stats()["prefix_cache_hit_tokens_total"] - hits_before
    assert hits >= 10 * 64  # most requests reuse whole chunks of the shared prefixes
    assert uncached.engine.stats()["prefix_cache_hit_tokens_total"] == 0


def test_prefix_cache_changes_no_bit_under_concurrency(cached, uncached):
    """The same mixed workload, submitted at once with cancellations: the survivors' prompt scores and tokens
    are the same bits with the cache on and off."""
    requests = workload(seed=2, count=16)

    def run(llm):
        handles = [llm.engine.submit(ids, p) for ids, p in requests]
        handles[5].cancel()
        return [None if i == 5 else record(h) for i, h in enumerate(handles)]

    on, off = run(cached), run(uncached)
    for i, (a, b) in enumerate(zip(on, off)):
        if a is not None:
            assert_same(a, b)


SCORE = SamplingParams(max_tokens=0, loglikelihood=True, logprobs=True, top_logprobs=2)


def score_together(llm, prompts, split=None):
    """Submit every prompt at once for its prompt scores; -> (records, prompt tokens the engine ran)."""
    before = llm.engine.stats()["prefill_tokens_total"]
    handles = [llm.engine.submit(ids, SCORE, split=split) for ids in prompts]
    records = [record(h) for h in handles]
    return records, llm.engine.stats()["prefill_tokens_total"] - before


def test_scoring_continuations_of_a_chunk_aligned_context(cached, uncached):
    """One context of two whole chunks, four continuations submitted together: the context runs once, and every
    continuation's scores are a cold run's bits, its first token's included (that one is scored from the
    context's last logits, so it is not the reused prompt's)."""
    context = list(range(100, 100 + 128))
    prompts = [context + [300 + k, 301 + k] for k in range(4)]
    on, ran = score_together(cached, prompts)
    off, _ = score_together(uncached, prompts)
    for a, b in zip(on, off):
        assert_same(a, b)
    assert ran == 128 + 4 * 2 + 3 * 64  # the first runs all; the others reuse one chunk (token 128 differs)


@pytest.mark.parametrize("context_len", [37, 100, 128])
def test_split_context_runs_once_and_changes_no_bit(cached, uncached, context_len):
    """With `split` at the context's last token, four continuations run the context once, whatever its length
    (not a whole number of chunks), and every score equals a cold run's with the same split, bit for bit."""
    context = np.random.default_rng(context_len).integers(3, 290, context_len).tolist()  # not cached before
    prompts = [context + [300 + k, 301 + k, 302] for k in range(4)]
    on, ran = score_together(cached, prompts, split=context_len - 1)
    off, _ = score_together(uncached, prompts, split=context_len - 1)
    for a, b in zip(on, off):
        assert_same(a, b)
    assert ran == context_len + 3 + 3 * (1 + 3)  # then each reruns the context's last token and its own three
    plain, _ = score_together(uncached, prompts)
    for a, b in zip(on, plain):  # a different chunking is the same model, to float rounding
        assert_same(a, b, atol=1e-4)


def test_a_split_outside_the_prompt_is_refused(cached):
    for split in (0, 3, -1):
        with pytest.raises(InvalidRequestError, match="split"):
            cached.engine.submit([5, 6, 7], SCORE, split=split)


def test_chunk_plans_with_splits():
    """Chunks end at multiples of the chunk length and at the split; reuse stops where two plans part."""
    assert [chunk_end(s, 150, 64, None) for s in (0, 64, 128)] == [64, 128, 150]
    assert [chunk_end(s, 150, 64, 99) for s in (0, 64, 99, 128)] == [64, 99, 128, 150]
    assert shared_chunk_end(140, 64, 99, 99) == 128  # same plan: any end of it
    assert shared_chunk_end(120, 64, 99, 99) == 99
    assert shared_chunk_end(140, 64, 99, None) == 64  # the plans part at 99
    assert shared_chunk_end(140, 64, 99, 70) == 64
    assert shared_chunk_end(140, 64, 128, None) == 128  # a split on a chunk end changes nothing


def test_long_arrival_delays_a_running_stream_by_one_call_at_a_time(cached):
    """A 200-token prompt arriving while a stream decodes is run in calls of `prefill_budget` tokens, with a
    decode step of the running stream between every two."""
    running = cached.engine.submit([7, 8, 9], SamplingParams(max_tokens=200, ignore_eos=True))
    events, seen = [], threading.Event()

    def consume():
        for event in running:
            if isinstance(event, ChoiceUpdate):
                events.append("token")
                seen.set()
    threading.Thread(target=consume, daemon=True).start()
    seen.wait(30)
    long = cached.engine.submit([random.Random(5).randrange(3, 380) for _ in range(200)], SamplingParams(max_tokens=1))
    for event in long:
        if isinstance(event, Admitted):
            events.append("admitted")
    running.cancel()
    start = events.index("token")
    tokens_before_admitted = events[start:events.index("admitted")].count("token")
    assert tokens_before_admitted >= 200 // 64 - 1  # 4 chunks, at most a call each while the stream decodes


def test_random_traffic_leaves_every_slot_free_or_cached(cached):
    """300 random requests (arrivals, cancellations, n > 1, scoring): at the end no slot is held, nothing waits,
    and every idle slot writes only the spare column."""
    rng = random.Random(3)
    handles = []
    for i in range(300):
        ids = rng.choice([SYSTEM, []]) + [rng.randrange(3, 380) for _ in range(rng.randrange(1, 30))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=i, n=rng.choice([1, 1, 2]),
                                max_tokens=rng.choice([0, 1, 5]) if i % 3 == 0 else rng.choice([1, 5]), ignore_eos=True,
                                loglikelihood=i % 3 == 0)
        handles.append(cached.engine.submit(ids, params))
        if rng.random() < 0.2:
            handles[rng.randrange(len(handles))].cancel()
    for h in handles:
        if not h.cancelled.is_set():  # a cancelled request hears nothing more
            for event in h:
                assert not isinstance(event, JaxgenError), event
    engine = cached.engine
    for _ in range(200):  # cancellations are applied by the engine thread's next turn
        if not engine.waiting and not engine.prefills and not any(engine.choices):
            break
        threading.Event().wait(0.05)
    assert not engine.waiting and not engine.prefills and not any(engine.choices)
    assert (np.asarray(engine.state.positions) == engine.spare).all()


def test_prefix_memory_is_the_slot_cache(tiny_llm):
    """1,000 requests with distinct prefixes: the device holds the same arrays before and after (the prefix
    cache lives in the slots), and the host index holds one prefix per slot."""
    llm = tiny_engine_llm(tiny_llm)
    engine = llm.engine
    shapes = [(x.shape, x.dtype) for x in jax_leaves(engine.state)]
    rng = random.Random(4)
    for wave in range(5):
        handles = [engine.submit([i % 300 + 3] + [rng.randrange(3, 380) for _ in range(20)],
                                 SamplingParams(max_tokens=1)) for i in range(200)]
        for h in handles:
            record(h)
    assert [(x.shape, x.dtype) for x in jax_leaves(engine.state)] == shapes
    assert len(engine.prefix.slots) == CORE.num_slots
    llm.close()


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


# ---- failures stay with their request

def clean_run(llm, requests):
    handles = [llm.engine.submit(ids, p) for ids, p in requests]
    return [record(h) for h in handles]


FAULT_REQUESTS = [([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)),
                  ([9, 9, 9, 9], SamplingParams(temperature=0.9, seed=4, max_tokens=12, ignore_eos=True)),
                  ([11, 12], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True,
                                            top_logprobs=2))]
FAULTY = [40, 41, 42, 43]


def run_with_fault(llm, timeout=60):
    """Submit FAULT_REQUESTS and the faulty request together; -> (the others' records, the faulty one's events)."""
    handles = [llm.engine.submit(ids, p) for ids, p in FAULT_REQUESTS]
    faulty = llm.engine.submit(FAULTY, SamplingParams(max_tokens=10, ignore_eos=True))
    results = [None] * (len(handles) + 1)

    def consume(i, h):
        try:
            results[i] = record(h)
        except JaxgenError as e:
            results[i] = e
    threads = [threading.Thread(target=consume, args=(i, h), daemon=True) for i, h in enumerate(handles + [faulty])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a client was left waiting"
    return results[:-1], results[-1]


@pytest.mark.parametrize("where", ["advance", "start"])
def test_a_host_fault_fails_only_its_request(cached, monkeypatch, where):
    """A host-side exception while advancing (detokenizer, grammar) or starting one request fails that request
    alone; the others' outputs are byte-identical to a clean run."""
    clean = clean_run(cached, FAULT_REQUESTS)
    engine = cached.engine
    if where == "advance":
        real = engine._advance

        def advance(choice, info):
            if choice.request.prompt_ids == FAULTY:
                raise RuntimeError("injected detokenizer fault")
            return real(choice, info)
        monkeypatch.setattr(engine, "_advance", advance)
    else:
        import jaxgen.engine as engine_module
        real_row = engine_module.make_row

        def make_row(params, ids, key, vocab):
            if list(ids) == FAULTY:
                raise RuntimeError("injected fault while starting")
            return real_row(params, ids, key, vocab)
        monkeypatch.setattr(engine_module, "make_row", make_row)
    others, faulty = run_with_fault(cached)
    assert others == clean
    assert isinstance(faulty, JaxgenError) and "injected" in str(faulty)


def test_a_device_fault_resets_and_tells_everyone(cached, monkeypatch):
    """An exception from a device program leaves the state unknown: every running request and the one being
    started hear of it (nobody hangs), and the engine serves the next requests as before."""
    clean = clean_run(cached, FAULT_REQUESTS)
    table = cached.engine.programs
    real_get = table.get
    calls = {"n": 0}

    def get(key):
        program = real_get(key)
        if key[0] != "start":
            return program

        def start_choice(*args):
            calls["n"] += 1
            if calls["n"] == 4:  # the faulty request's start, after the three others started
                raise RuntimeError("injected device fault")
            return program(*args)
        return start_choice
    monkeypatch.setattr(table, "get", get)
    others, faulty = run_with_fault(cached)
    assert isinstance(faulty, JaxgenError)
    assert all(isinstance(o, JaxgenError) or o == c for o, c in zip(others, clean))
    monkeypatch.setattr(table, "get", real_get)
    assert clean_run(cached, FAULT_REQUESTS) == clean


# ---- close

def test_close_frees_the_engine_and_memory_stays_flat(tiny_llm):
    """Loading and closing an engine five times: the thread ends, later submits are refused, RSS stays flat."""
    rss = []
    for _ in range(5):
        with tiny_engine_llm(tiny_llm) as llm:
            record(llm.engine.submit([5, 6, 7], SamplingParams(max_tokens=4)))
            engine = llm.engine
        assert not engine.thread.is_alive() and engine.state is None
        with pytest.raises(JaxgenError):
            engine.submit([5], SamplingParams(max_tokens=1))
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    assert rss[-1] - rss[1] < 64 * 2**20, [r // 2**20 for r in rss]


def test_a_script_ends_quietly_without_close(make_tiny_hf_model, tmp_path):
    """load, two chats and a completion, end of file: the process exits 0 with nothing on stderr from JAX."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import jaxgen
        llm = jaxgen.load({str(make_tiny_hf_model("llama"))!r})
        llm.chat([{{"role": "user", "content": "hi"}}], max_tokens=5)
        llm.chat([{{"role": "user", "content": "again"}}], max_tokens=5)
        print(llm.complete("abc", max_tokens=3)["choices"][0]["text"] is not None)
    """))
    for _ in range(3):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "terminate called" not in proc.stderr and "FATAL" not in proc.stderr
        assert proc.stdout.strip().endswith("True")


# ---- compiled programs

def test_background_warmup_serves_at_once_and_then_never_compiles(tiny_llm, compile_counter):
    """`warmup_in_background` returns once the covering programs are ready: requests are served (by larger
    programs) while the rest compile, with the same tokens; once done, a mixed workload traces nothing."""
    with tiny_engine_llm(tiny_llm) as reference, tiny_engine_llm(tiny_llm) as llm:
        reference.engine.warmup()
        expected = [record(reference.engine.submit(ids, p)) for ids, p in workload(seed=6, count=8)]
        engine = llm.engine
        engine.warmup_in_background()
        assert engine.stats()["compiled_programs"] >= 3
        served = [record(engine.submit(ids, p)) for ids, p in workload(seed=6, count=8)]
        for a, b in zip(served, expected):
            assert_same(a, b)
        engine.programs.wait()
        stats = engine.stats()
        assert stats["warming"] == 0 and stats["compiled_programs"] == stats["programs"]
        before = compile_counter.count
        for ids, p in workload(seed=7, count=12):
            record(engine.submit(ids, p))
        assert compile_counter.count == before


LOAD_SCRIPT = """
import json, sys
import jax.numpy as jnp
import jaxgen
from jaxgen.engine import EngineConfig
from jaxgen.sampling import SamplingParams
config = EngineConfig(**json.loads(sys.argv[2]))
with jaxgen.load(sys.argv[1], dtype=jnp.float32, engine_config=config) as llm:
    llm.engine.warmup()
    programs = llm.engine.programs
    out = [[t.token_id for e in llm.engine.submit(ids, SamplingParams(temperature=0.0, max_tokens=6))
            if hasattr(e, "tokens") for t in e.tokens] for ids in ([5, 6, 7], list(range(3, 90)))]
    print(json.dumps({"compiled": programs.compiled_count, "loaded": programs.loaded_count,
                      "preloaded": programs.preloaded_count, "covering": len(llm.engine._covering_program_keys()),
                      "out": out}))
"""


def test_executables_load_from_disk(make_tiny_hf_model, tmp_path):
    """A fresh process with the same executable cache loads every program instead of compiling it
    (bench/startup.py measures the start-up that saves) and gives the same tokens, the covering programs read
    ahead of the model's load (`compiled.preload`) from the list the last start like it left; a damaged entry
    is rebuilt, not fatal. JAX's persistent cache is on: after an upgrade (the executables gone, JAX's cache
    still holding every program) the programs JAX supplies are not stored, since such an executable would
    not run in a later process, and what is stored still runs."""
    import dataclasses
    import json
    import shutil
    config = {k: v for k, v in dataclasses.asdict(CORE).items() if k != "executable_cache"}
    cache = str(tmp_path / "executables")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def start(executable_cache):
        proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(make_tiny_hf_model("llama")),
                               json.dumps({**config, "executable_cache": executable_cache})],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    reference = start(None)  # fills JAX's cache with every program
    upgraded = start(cache)
    count = upgraded["compiled"]

    def executables():
        return sorted(name for name in os.listdir(cache) if name.endswith(".xla")) if os.path.isdir(cache) else []

    assert count > 0 and upgraded["loaded"] == 0 and executables() == []
    shutil.rmtree(tmp_path / "xla")
    first = start(cache)
    assert (first["compiled"], first["loaded"], first["preloaded"]) == (count, 0, 0) and len(executables()) == count
    again = start(cache)
    assert (again["compiled"], again["loaded"], again["preloaded"]) == (0, count, again["covering"])
    assert 0 < again["covering"] < count
    with open(os.path.join(cache, executables()[0]), "wb") as f:
        f.write(b"not an executable")
    second = start(cache)
    assert (second["compiled"], second["loaded"]) == (1, count - 1)
    assert second["out"] == again["out"] == first["out"] == upgraded["out"] == reference["out"]


def test_turn_clock_caps_prefill_to_the_allowed_slowdown():
    """Decode-only turns of 0.125 s, then one with 64 prompt tokens at window 2048 taking 0.625 s (7.8 ms a
    token): a turn may then prefill (3 - 1) x 0.125 s / 7.8 ms = 32 tokens at that window beside that decode
    program; before both are measured, at a window never measured and beside a decode program never timed alone,
    nothing beyond one chunk. With more prompts waiting than streams running, the prefill time grows by their
    ratio."""
    from jaxgen.engine import TurnClock
    times = iter([0.0, 0.125, 0.25, 0.375, 1.0, 1.5, 2.5, 3.0])
    clock = TurnClock(slowdown=3.0, smoothing=1.0, now=lambda: next(times))
    small, large = ("decode", 8, 256), ("decode", 32, 1024)
    assert clock.budget(512, 2048, small) == 0 and not clock.knows(small)
    for tokens in [0, 0, 0, 0]:
        clock.turn_read(tokens, 0, small)
    clock.turn_read(64, 2048, small)
    assert clock.knows(small) and not clock.knows(large)
    assert clock.budget(512, 2048, small) == 32
    assert clock.budget(16, 2048, small) == 16
    assert clock.budget(512, 128, small) == 0  # nothing narrower measured to price it from
    assert clock.budget(512, 4096, small) == 16  # priced from window 2048, twice the cost a token
    assert clock.budget(512, 2048, large) == 0
    assert clock.budget(512, 2048, small, waiting=24, running=8) == 96  # 3 waiting a stream: 3x the prefill time
    assert clock.budget(512, 2048, small, waiting=3, running=8) == 32  # fewer waiting than running: the cap
    assert clock.budget(512, 2048, small, waiting=40, running=1) == 512  # never more than one call's budget
    clock.turn_read(64, 2048, large)  # beside a decode program never timed alone: teaches nothing
    assert clock.budget(512, 2048, small) == 32
    clock.turn_read(0, 0, large)  # 1 s alone
    assert clock.knows(large) and clock.budget(512, 2048, large) == 256
    clock.turn_read(64, 128, large)  # a turn no longer than the decode step alone: its prompt cost is not known
    assert clock.budget(512, 128, large) == 0


def test_a_decode_program_not_timed_yet_runs_one_turn_alone(tiny_llm):
    """While a stream decodes, a long prompt's first turn is the decode step alone (timing it); every later
    turn of the same decode program has a budget, and the prompt runs."""
    long = list(range(3, 103))
    with tiny_engine_llm(tiny_llm, chunk=16) as llm:
        engine = llm.engine
        turns, prefill = [], engine._prefill

        def recording_prefill():
            beside_a_stream = any(engine.choices) and bool(engine.prefills)
            if beside_a_stream and not turns:  # as if the stream had not decoded alone before the prompt came
                engine.clock.decode_s.clear()
            known = beside_a_stream and engine.clock.knows(engine._clock_key(engine._decode_key()))
            ran = prefill()
            if beside_a_stream:
                turns.append((known, ran[0]))
            return ran
        engine._prefill = recording_prefill
        stream = engine.submit([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True))
        assert wait_for(lambda: any(engine.choices), 30.0)
        record(engine.submit(long, SamplingParams(max_tokens=1)))
        record(stream)
    assert turns[0] == (False, 0.0)
    assert {tokens for known, tokens in turns if not known} == {0.0}  # untimed decode programs: no prompt work
    assert sum(tokens for known, tokens in turns if known) >= len(long)


def test_a_decode_step_runs_the_live_slots_in_the_fewest_rows(tiny_llm):
    """Once the two requests in slots 0 and 1 have finished, the stream left in slot 2 decodes as one row
    (`decode_step` gathers slot 2), not in the 8 rows that reach its slot; its tokens are those it decodes
    alone, and its log-probs agree to rounding (the 8-row steps it shared round differently)."""
    prompt, params = [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=True)
    with tiny_engine_llm(tiny_llm) as llm:
        alone = record(llm.engine.submit(prompt, params))
    with tiny_engine_llm(tiny_llm) as llm:
        engine, steps = llm.engine, []
        step = engine._step

        def recording_steps(op, *args):
            if op == "decode":
                steps.append((args[0][1], None if args[1] is None else args[1].tolist()))
            return step(op, *args)
        engine._step = recording_steps
        short = [engine.submit([9 + i, 10, 11], SamplingParams(max_tokens=2, ignore_eos=True)) for i in range(2)]
        stream = engine.submit(prompt, params)
        for handle in short:
            record(handle)
        shared = record(stream)
    assert steps[0] == (8, [0, 1, 2, 3, 4, 5, 6, 7])  # three live, padded with the idle slots
    assert steps[-1] == (1, [2]) and steps.count((1, [2])) >= 20
    assert_same(shared, alone, atol=1e-5)


def test_the_background_warmup_builds_each_sampler_before_its_decode_steps(tiny_llm):
    """A decode step is two programs, its rows' sampler and the model; while programs compile, a step runs on
    any ready model program (`_decode_key`), so the warm-up makes a row bucket's sampler ready before any of
    its models: the covering pair at once, the rest in background order, every program once (32 slots: row
    buckets 1, 8, 16 and 32)."""
    with tiny_engine_llm(tiny_llm, num_slots=32) as llm:
        engine, order = llm.engine, []
        engine.programs.build_in_background = lambda keys, on_error: order.extend(keys)
        engine.warmup_in_background()
        ready = set(engine.programs.ready)
        assert {k for k in engine._covering_program_keys() if k[0] in ("sample", "decode")} <= ready
        built = set(ready)
        for key in order:
            assert key[0] != "decode" or ("sample", key[1]) in built, key
            built.add(key)
        assert len(order) == len(set(order)) and built == set(engine.program_keys())


def test_every_model_call_runs_the_native_kernels_where_they_apply(tiny_llm):
    """On one CPU device in float32 every program that runs the model (decode steps, prefill chunks, layer spans)
    attends through the native attention kernel, once per layer, and a decode step of 2 rows or more runs its
    four projections a layer (Q/K/V, output, gate/up, down) through the native product; a lone row's step and
    prompt chunks use XLA's (the custom calls in the lowered programs)."""
    import shutil

    from jaxgen.models import native_attention, native_matmul

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    with tiny_engine_llm(tiny_llm) as llm:
        keys = llm.engine.program_keys()
        for kind, rows in (("decode", 1), ("decode", 8), ("prefill", None), ("span", None)):
            key = next(k for k in keys if k[0] == kind and rows in (None, k[1]))
            text = llm.engine._lower(key).as_text()
            layers = range(*llm.engine.layer_span_bounds()[key[1]]) if kind == "span" else range(llm.cfg.num_layers)
            assert text.count(f"@{native_attention.TARGET}(") == len(layers), key
            products = 4 * len(layers) if kind == "decode" and rows > 1 else 0
            assert text.count(f"@{native_matmul.TARGET}(") == products, key


def test_a_decode_step_that_has_grown_is_timed_again(tiny_llm):
    """Decode rows read only their own cache blocks, so a stream's step grows as it does: the clock keys one
    decode program by the blocks its rows read too (steps of sqrt(2)), and a longer stream's step is a
    program not timed yet."""
    from jaxgen.models.layers import ROW_BLOCK

    with tiny_engine_llm(tiny_llm) as llm:
        engine, keys = llm.engine, []
        dispatch = engine._dispatch

        def recording_dispatch():
            position = next(c.position for c in engine.choices if c is not None)
            out = dispatch()
            keys.append((position, out[2]))
            return out
        engine._dispatch = recording_dispatch
        record(engine.submit([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=ROW_BLOCK + 60, ignore_eos=True)))
    assert len({key[:3] for _, key in keys}) == 1  # one decode program, its row at 1 block then 2
    assert {position: key[3] for position, key in keys} == {p: 0 if p < ROW_BLOCK else 2 for p, _ in keys}


@pytest.mark.parametrize("layers, spans, bounds", [(30, 3, [(0, 10), (10, 20), (20, 30)]),
                                                   (5, 3, [(0, 2), (2, 3), (3, 5)]), (2, 3, [(0, 1), (1, 2)]),
                                                   (30, 1, [])])
def test_layer_spans_cut_the_layers_evenly_and_one_span_means_whole_chunks(tiny_llm, layers, spans, bounds):
    """`layer_span_bounds` covers every layer once, in order, in at most `layer_spans` spans of one layer or more;
    with one span there are no span programs at all."""
    import dataclasses

    import jax

    from jaxgen.engine import Engine
    from jaxgen.models import llama

    cfg = dataclasses.replace(tiny_llm.cfg, num_layers=layers)
    params = llama.init_params(cfg, jax.random.key(0))
    engine = Engine(cfg, params, tiny_llm.tokenizer, EngineConfig(num_slots=1, max_len=32, chunk=16,
                                                                  prefill_budget=64, layer_spans=spans))
    try:
        assert engine.layer_span_bounds() == bounds
        assert len([k for k in engine.program_keys() if k[0] == "span"]) == len(bounds) * len(engine.kv_buckets())
    finally:
        engine.close()


def run_beside_a_stream(tiny_llm, layer_spans: int, **changes):
    """A 7-chunk prompt and a 2-chunk one arrive while a stream decodes, with no prefill allowed beyond the
    minimum; then a prompt sharing 6 chunks of the first (the engine also changed by `changes`). -> (the long
    prompt's and the later one's records, the prompt lengths of each prefill call, the ops of every device step)."""
    long, short = list(range(3, 103)), list(range(110, 140))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=3)
    with tiny_engine_llm(tiny_llm, chunk=16, layer_spans=layer_spans, **changes) as llm:
        engine = llm.engine
        engine.clock.budget = lambda *shapes_and_load: 0
        calls, ops = [], []
        run_chunks, step = engine._run_chunks, engine._step

        def recording_chunks(rows):
            calls.append([len(p.ids) for p, _, _ in rows])
            return run_chunks(rows)

        def recording_steps(op, *args):
            ops.append(op)
            return step(op, *args)
        engine._run_chunks, engine._step = recording_chunks, recording_steps
        stream = engine.submit([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True))
        assert wait_for(lambda: any(engine.choices), 30.0)
        handles = [engine.submit(ids, p) for ids, p in ((long, params), (short, SamplingParams(max_tokens=1)))]
        ran = record(handles[0])
        record(handles[1])
        later = record(engine.submit(long[:96] + [7, 8, 9], params))
        assert any(engine.choices), "the stream ended before the prompts ran"
        record(stream)
    return ran, later, calls, ops


def test_long_prompts_run_a_layer_span_a_turn_while_streams_decode_with_the_bits_of_whole_chunks(tiny_llm):
    """While a stream decodes, each chunk of a 7-chunk prompt runs as layer spans (its last two chunks are not
    "short" either), never two without a decode step between, while a 2-chunk prompt arriving with it runs whole
    in one call. Its tokens and log-probs, and those of a later prompt reusing its cached K/V, are the bits of
    the same run with whole chunks (one a turn)."""
    spanned, spanned_later, calls, ops = run_beside_a_stream(tiny_llm, layer_spans=3)
    whole, whole_later, whole_calls, whole_ops = run_beside_a_stream(tiny_llm, layer_spans=1)
    assert spanned == whole and spanned_later == whole_later
    assert [c for c in calls if 100 in c] == [] and ops.count("span") == 7 * 2  # the tiny model: 2 layers, 2 spans
    turns = "".join(op[0] for op in ops if op in ("span", "decode"))
    assert "ss" not in turns, turns
    assert [c.count(30) for c in calls if 30 in c] == [2]
    assert [c.count(100) for c in whole_calls if 100 in c] == [1] * 7 and "span" not in whole_ops


def test_engines_of_different_layer_spans_never_share_a_span_program(tiny_llm, tmp_path):
    """Span programs on disk are told apart by their layer bounds: on a 4-layer model an engine of 2 spans, then
    one of 4 (whose span 1 is not a last span) with the same executable cache, each run the long prompt beside a
    stream with the bits of whole chunks."""
    import dataclasses
    import types

    import jax

    from jaxgen.models import llama

    cfg = dataclasses.replace(tiny_llm.cfg, num_layers=4)
    four = types.SimpleNamespace(cfg=cfg, params=llama.init_params(cfg, jax.random.key(1)),
                                 tokenizer=tiny_llm.tokenizer)
    whole = run_beside_a_stream(four, layer_spans=1)
    for spans in (2, 4):
        ran, later, _, ops = run_beside_a_stream(four, layer_spans=spans, executable_cache=str(tmp_path))
        assert (ran, later) == whole[:2] and ops.count("span") == 7 * spans


@pytest.mark.parametrize("max_len", [64, 32])
def test_small_contexts_warm_up_and_serve(tiny_llm, max_len):
    """A context smaller than the smallest attention bucket and than a chunk (`jaxgen serve --max-len 64`)
    compiles every program and serves prompts up to the limit, scored or not."""
    with tiny_engine_llm(tiny_llm, max_len=max_len) as llm:
        llm.engine.warmup()
        out = record(llm.engine.submit(list(range(3, max_len - 2)), SamplingParams(max_tokens=5, ignore_eos=True)))
        assert out["done"] == (max_len - 5, 5)  # the context is full after 5 tokens
        scored = record(llm.engine.submit(list(range(3, 3 + max_len)),
                                          SamplingParams(max_tokens=0, loglikelihood=True)))
        assert len(scored["admitted"][1]) == max_len - 1
