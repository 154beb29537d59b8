"""Aggregate decode throughput and time to first token under concurrency, against HF transformers.

For 1, 8 and 32 concurrent requests (mixed prompt lengths, 128 new tokens each, greedy, EOS ignored):
jaxgen's engine (continuous batching) and HF `generate` on a left-padded batch of the same prompts,
same weights (the default GGUF, float32), in the same run. Then the same at 8 and 32 with every prompt
behind a shared 1,000-token system prompt (what prefix caching serves). Also: 16 concurrent streams
against the same 16 requests run one after another.

    python bench/throughput.py [--concurrency 1,8,32] [--new-tokens 128] [--skip-hf]

It restarts itself with glibc's huge-page tunable, as `jaxgen serve` does (HF runs in the same process).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

import jaxgen
from jaxgen.cli import cache_root, restart_with_huge_pages
from jaxgen.engine import EngineConfig
from jaxgen.events import ChoiceUpdate
from jaxgen.sampling import SamplingParams

PROMPT_LENGTHS = (24, 60, 130, 250, 500)


def machine() -> str:
    """CPU model, core count and JAX backend, printed with every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, JAX {jax.__version__} backend={jax.default_backend()}, "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")


def prompts(llm, count: int) -> list[list[int]]:
    """`count` prompts cycling through PROMPT_LENGTHS, cut from a long real text."""
    text = " ".join(["The history of astronomy is the story of how people learned to read the sky,"
                     " from the first calendars to space telescopes."] * 60)
    ids = llm.tokenizer.encode(text)
    return [ids[i: i + PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]] for i in range(count)]


def system_prompt(llm, length: int = 1000) -> list[int]:
    """A `length`-token system prompt (licence-like text) shared by every request of a workload."""
    text = " ".join(["Permission is hereby granted, free of charge, to any person obtaining a copy of this software"
                     " and associated documentation files, to deal in the software without restriction."] * 80)
    return llm.tokenizer.encode(text)[:length]


def shared_prefix_prompts(llm, count: int) -> list[list[int]]:
    """`count` prompts: the shared system prompt, then a distinct short question."""
    head = system_prompt(llm)
    return [head + llm.tokenizer.encode(f" Question {i}: what does clause {i % 7} allow?") for i in range(count)]


def run_jaxgen(llm, batch: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
    """All requests submitted at once; -> (wall seconds, time to first token of each)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ttft = [0.0] * len(batch)
    start = time.perf_counter()

    def consume(i, handle):
        for event in handle:
            if isinstance(event, ChoiceUpdate) and not ttft[i]:
                ttft[i] = time.perf_counter() - start

    threads = [threading.Thread(target=consume, args=(i, llm.engine.submit(ids, params)))
               for i, ids in enumerate(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, ttft


def run_hf(model, batch: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """HF `generate` on the left-padded batch; -> wall seconds."""
    import torch

    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - start


def load_hf(path: str):
    """The same GGUF through transformers, float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def main() -> None:
    restart_with_huge_pages([sys.executable, *sys.argv])  # the environment `jaxgen serve` runs in
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    print(machine())
    llm = jaxgen.load(engine_config=EngineConfig(num_slots=max(max(levels), 16), max_len=2048,
                                                 executable_cache=os.path.join(cache_root(), "executables")))
    t0 = time.perf_counter()
    llm.engine.warmup()
    print(f"warm-up (compile) {time.perf_counter() - t0:.1f} s, {len(llm.engine.program_keys())} programs")
    hf = None if args.skip_hf else load_hf(llm.path)
    print(f"{'workload':>16} {'concurrent':>10} {'jaxgen tok/s':>13} {'HF tok/s':>9} {'ratio':>6} {'TTFT p50 ms':>12} "
          f"{'TTFT max ms':>12}")
    workloads = [("mixed prompts", prompts, levels), ("shared 1k system", shared_prefix_prompts, [c for c in levels if c > 1])]
    for name, make, counts in workloads:
        for c in counts:
            batch = make(llm, c)
            wall, ttft = run_jaxgen(llm, batch, args.new_tokens)
            ours = c * args.new_tokens / wall
            theirs = (c * args.new_tokens / run_hf(hf, batch, args.new_tokens, llm.tokenizer.pad_token_id or 0)
                      if hf else float("nan"))
            print(f"{name:>16} {c:>10} {ours:>13.1f} {theirs:>9.1f} {ours / theirs:>6.2f} "
                  f"{statistics.median(ttft) * 1e3:>12.0f} {max(ttft) * 1e3:>12.0f}")
    batch = prompts(llm, 16)
    together, _ = run_jaxgen(llm, batch, args.new_tokens)
    one_by_one = sum(run_jaxgen(llm, [p], args.new_tokens)[0] for p in batch)
    print(f"16 concurrent streams: {together:.1f} s; the same 16 one after another: {one_by_one:.1f} s; "
          f"speed-up {one_by_one / together:.2f}x")


if __name__ == "__main__":
    main()
