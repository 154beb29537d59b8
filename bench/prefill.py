"""Prompt-side latency of the default model: long prompts, prefix reuse, scoring, and streams under arrivals.

In one run, same weights (the default GGUF, float32), a warmed-up engine of 32 slots × 2048 positions:
- a lone 1,000-token prompt: jaxgen's time to first token against HF transformers' (one forward + argmax);
- the same request again with its 1,000-token prefix cached, against the same request cold;
- lm-eval-style scoring: one 500-token context with four continuations submitted together, as plain scoring
  requests and through `LLM.score` (which splits each pair's chunks at its context's last token, as
  `jaxgen.eval` does): prompt tokens run against prompt tokens submitted;
- the inter-token latency (p50, p99) of 8 running streams, alone and while 2,000-token prompts arrive.

    python bench/prefill.py [--skip-hf]

It restarts itself with glibc's huge-page tunable, as `jaxgen serve` does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jaxgen  # noqa: E402
from jaxgen.cli import cache_root, restart_with_huge_pages  # noqa: E402
from jaxgen.engine import EngineConfig  # noqa: E402
from jaxgen.events import ChoiceUpdate  # noqa: E402
from jaxgen.sampling import SamplingParams  # noqa: E402

from throughput import load_hf, machine, system_prompt  # noqa: E402


def ttft(llm, ids: list[int]) -> float:
    """Seconds from submit to the first generated token of one greedy request."""
    start = time.perf_counter()
    for event in llm.engine.submit(ids, SamplingParams(temperature=0.0, max_tokens=1)):
        if isinstance(event, ChoiceUpdate):
            return time.perf_counter() - start
    raise RuntimeError("no token")


def hf_ttft(model, ids: list[int]) -> float:
    """HF: one forward over the prompt and the argmax of its last logits."""
    import torch

    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        model(x).logits[0, -1].argmax()
    return time.perf_counter() - start


def distinct(llm, seed: int, length: int) -> list[int]:
    """A `length`-token prompt no other request shares (a numbered line of the licence text)."""
    return llm.tokenizer.encode(f"Copy {seed}. ")[:8] + system_prompt(llm, length)[: length - 8]


def inter_token_gaps(llm, streams: int, new_tokens: int, arrivals: list[list[int]]) -> list[float]:
    """ITL of `streams` running greedy streams (all gaps), while `arrivals` are submitted once they run."""
    gaps: list[float] = []
    running = threading.Barrier(streams + 1)

    def consume(i):
        last = None
        handle = llm.engine.submit(distinct(llm, 1000 + i, 40), SamplingParams(temperature=0.0, max_tokens=new_tokens,
                                                                              ignore_eos=True))
        for event in handle:
            if isinstance(event, ChoiceUpdate):
                now = time.perf_counter()
                if last is None:
                    running.wait()
                else:
                    gaps.append(now - last)
                last = now
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    running.wait()
    drain_all([llm.engine.submit(ids, SamplingParams(temperature=0.0, max_tokens=1)) for ids in arrivals])
    for t in threads:
        t.join()
    return gaps


def drain_all(handles) -> None:
    """Read every event of requests submitted together."""
    for handle in handles:
        for _ in handle:
            pass


def prompt_tokens_run(llm, work) -> tuple[int, int]:
    """(prompt tokens prefilled, prompt tokens submitted) by the engine while `work()` runs."""
    before = llm.engine.stats()
    work()
    after = llm.engine.stats()
    return (after["prefill_tokens_total"] - before["prefill_tokens_total"],
            after["prompt_tokens_total"] - before["prompt_tokens_total"])


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of xs."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    restart_with_huge_pages([sys.executable, *sys.argv])  # the environment `jaxgen serve` runs in
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    print(machine())
    llm = jaxgen.load(engine_config=EngineConfig(num_slots=32, max_len=2048,
                                                 executable_cache=os.path.join(cache_root(), "executables")))
    t0 = time.perf_counter()
    llm.engine.warmup()
    print(f"warm-up (compile) {time.perf_counter() - t0:.1f} s")
    ttft(llm, distinct(llm, 0, 1000))  # first use of every program at this length

    cold = statistics.median(ttft(llm, distinct(llm, 1 + i, 1000)) for i in range(3))
    if not args.skip_hf:
        hf = load_hf(llm.path)
        ours = distinct(llm, 10, 1000)
        theirs = statistics.median(hf_ttft(hf, ours) for _ in range(3))
        print(f"lone 1,000-token prompt: TTFT jaxgen {cold * 1e3:.0f} ms, HF {theirs * 1e3:.0f} ms, "
              f"ratio {cold / theirs:.2f}")
    else:
        print(f"lone 1,000-token prompt: TTFT jaxgen {cold * 1e3:.0f} ms")

    head = system_prompt(llm, 1000)
    ttft(llm, head + llm.tokenizer.encode(" First question?"))  # now cached
    warm = statistics.median(ttft(llm, head + llm.tokenizer.encode(f" Question {i}?")) for i in range(3))
    print(f"1,000-token prefix cached: TTFT {warm * 1e3:.0f} ms against {cold * 1e3:.0f} ms cold: "
          f"{warm / cold:.3f}x")

    context = distinct(llm, 77, 500)
    continuations = [llm.tokenizer.encode(f" answer {c}") for c in "ABCD"]
    ran, submitted = prompt_tokens_run(llm, lambda: drain_all([
        llm.engine.submit(context + c, SamplingParams(max_tokens=0, loglikelihood=True)) for c in continuations]))
    print(f"4 continuations of a 500-token context as plain requests: {ran} prompt tokens run of {submitted} "
          f"submitted ({1 - ran / submitted:.0%} saved)")
    context = distinct(llm, 78, 500)
    ran, submitted = prompt_tokens_run(llm, lambda: llm.score([(context, c) for c in continuations]))
    print(f"4 continuations of a 500-token context through LLM.score (lm-eval's path): {ran} prompt tokens run "
          f"of {submitted} submitted ({1 - ran / submitted:.0%} saved; the context alone is {len(context)})")

    inter_token_gaps(llm, 8, 8, [])  # the first run of the 8-row decode programs pays their one-time start
    quiet = inter_token_gaps(llm, 8, 64, [])
    loaded = inter_token_gaps(llm, 8, 64, [distinct(llm, 500 + i, 2000) for i in range(3)])
    print(f"ITL of 8 streams: alone p50 {percentile(quiet, 50) * 1e3:.0f} ms p99 {percentile(quiet, 99) * 1e3:.0f} ms; "
          f"with 2,000-token arrivals p50 {percentile(loaded, 50) * 1e3:.0f} ms p99 "
          f"{percentile(loaded, 99) * 1e3:.0f} ms ({percentile(loaded, 99) / percentile(quiet, 99):.2f}x)")


if __name__ == "__main__":
    main()
