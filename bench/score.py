"""Multiple-choice scoring throughput: the in-process `jaxgen` lm-eval model against lm-eval's own `hf` backend.

In one run, same weights (the default GGUF, float32) and the same requests: `contexts` contexts (a few sentences,
40-120 tokens) with 4 continuations each (a few words), handed to each backend's `loglikelihood` as the harness
hands them. Prints pairs scored per second for both, the ratio, the worst per-pair difference, and the prompt
tokens jaxgen ran against those submitted (what sharing each context saved).

    python bench/score.py [--contexts 200] [--batch 32]
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jaxgen  # noqa: E402
from jaxgen.cli import cache_root  # noqa: E402
from jaxgen.engine import EngineConfig  # noqa: E402

from throughput import machine  # noqa: E402

WORDS = ("the river town market winter stone bridge farmer grain boat harbour summer rain road school bell "
         "children mill wheel forest path hill wind lamp night window bread kitchen letter friend morning").split()


def sentence(rng: random.Random, words: int) -> str:
    """A plain sentence of `words` words."""
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return body[0].upper() + body[1:] + "."


def workload(contexts: int, choices: int = 4, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs: each context a few sentences, then `choices` short endings."""
    rng = random.Random(seed)
    pairs = []
    for i in range(contexts):
        context = f"Story {i}. " + " ".join(sentence(rng, rng.randrange(6, 14)) for _ in range(rng.randrange(3, 8)))
        pairs += [(context + " Then", " " + sentence(rng, rng.randrange(2, 6))) for _ in range(choices)]
    return pairs


def instances(pairs):
    from lm_eval.api.instance import Instance
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def timed(lm, requests) -> tuple[float, list[tuple[float, bool]]]:
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32, help="jaxgen slots and hf batch size")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    from lm_eval.models.huggingface import HFLM

    from jaxgen.eval import EVAL_CHUNK, JaxgenLM
    from jaxgen.models.loading import default_model_path

    pairs = workload(args.contexts)
    print(f"machine: {machine()}")
    config = EngineConfig(num_slots=args.batch, max_len=512, seed=0, chunk=EVAL_CHUNK,
                          executable_cache=os.path.join(cache_root(), "executables"))
    llm = jaxgen.load(engine_config=config)
    start = time.perf_counter()
    llm.engine.warmup()
    print(f"jaxgen warm-up (compile or load programs): {time.perf_counter() - start:.1f} s")
    ours_lm = JaxgenLM(llm=llm)
    timed(ours_lm, instances(workload(4, seed=1)))  # first-use costs (grammar-free, but tokenizer caches etc.)
    before = llm.engine.stats()
    ours_s, ours = timed(ours_lm, instances(pairs))
    after = llm.engine.stats()
    submitted = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    ran = after["prefill_tokens_total"] - before["prefill_tokens_total"]
    print(f"{len(pairs)} pairs ({args.contexts} contexts x 4): jaxgen {ours_s:.1f} s, {len(pairs) / ours_s:.1f} pairs/s; "
          f"prompt tokens run {ran} of {submitted} submitted ({1 - ran / submitted:.0%} saved by sharing contexts)")
    if args.skip_hf:
        return
    path = default_model_path()
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        llm.tokenizer.save(tokenizer_dir)
        hf_lm = HFLM(pretrained=os.path.dirname(path), gguf_file=os.path.basename(path), tokenizer=tokenizer_dir,
                     dtype="float32", device="cpu", batch_size=args.batch)
        timed(hf_lm, instances(workload(4, seed=1)))
        hf_s, ref = timed(hf_lm, instances(pairs))
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours, ref))
    same_greedy = sum(a[1] == b[1] for a, b in zip(ours, ref))
    print(f"hf backend (batch {args.batch}): {hf_s:.1f} s, {len(pairs) / hf_s:.1f} pairs/s")
    print(f"jaxgen / hf pairs per second: {hf_s / ours_s:.2f}x; worst per-pair |log-likelihood diff| {worst:.2e}; "
          f"greedy flags equal {same_greedy}/{len(pairs)}")
    llm.close()


if __name__ == "__main__":
    main()
