"""Batch-1 latency of the default model: load time, 512-token prefill, greedy decode tokens/s; with --families,
each model family's decode step on a tiny random config against HF transformers' in the same run.

jaxgen (the pure `prefill` + jitted `decode` with the cache donated, kv_len bucket 1024) against HF
transformers `generate` (the same GGUF, greedy, EOS ignored) in the same run, for each dtype; and each
decode step against the memory-bandwidth floor: bytes read per step (every param, embedding/lm_head
included, plus the KV window attention reads) / a measured read bandwidth. llama.cpp (PyPI
`llama-cpp-python`, same GGUF, as many threads as cores) is added when it is installed.
Decode tokens/s is 1 / the median step time for both (each of HF's steps is stamped from inside
`generate`), since other processes on shared cores make means noisy; the loop average is printed too.

    python bench/decode.py [--dtypes float32,bfloat16] [--new-tokens 64] [--prompt-tokens 512]
                           [--kv-len 1024] [--repeats 3] [--skip-hf]
    python bench/decode.py --families [--new-tokens 64]

--families builds each family's tiny random HF model (tests/conftest.py's fixtures: d = 64, 2 layers, 6 for
Gemma 3; Phi-3 with LongRoPE, whose 64-token prompt is past its switch; 4 experts, 2 a token, for the MoE), loads it with our HF-directory loader and with transformers, and times both greedy decodes of the
same 64-token prompt at batch 1 (median step; a regression guard, not a race), checking the tokens agree.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxgen  # noqa: E402
from jaxgen.models import llama  # noqa: E402
from jaxgen.models.family import family_for  # noqa: E402
from jaxgen.models.loading import default_model_path  # noqa: E402

TEXT = ("The history of astronomy is the story of how people learned to read the sky, from the first "
        "calendars scratched on bone to telescopes that orbit the Sun a million miles from Earth. ") * 40


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model, cores, JAX backend (and device): the tag printed with every figure."""
    dev = jax.devices()[0]
    kind = f" ({dev.device_kind})" if dev.platform != "cpu" else ""
    return f"{cpu_name()}, {os.cpu_count()} cores, JAX {jax.__version__} {jax.default_backend()}{kind}"


def timed(fn, *args, **kwargs):
    """(result, seconds) with the result's device work finished."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ memory bandwidth

def read_bandwidth(mib: int = 256, repeats: int = 7) -> dict[str, float]:
    """Read bandwidth in GB/s: a NumPy sum and an XLA (jitted) sum over `mib` MiB of float32, best of `repeats`."""
    n = mib * 2**20 // 4
    a = np.random.default_rng(0).random(n, dtype=np.float32)
    out = {}
    best = min(timed(np.sum, a)[1] for _ in range(repeats))
    out["numpy sum"] = a.nbytes / best / 1e9
    x = jnp.asarray(a)
    fsum = jax.jit(jnp.sum)
    fsum(x).block_until_ready()
    best = min(timed(fsum, x)[1] for _ in range(repeats))
    out["XLA sum"] = a.nbytes / best / 1e9
    b = np.empty_like(a)
    best = min(timed(np.copyto, b, a)[1] for _ in range(repeats))
    out["numpy copy (read+write)"] = 2 * a.nbytes / best / 1e9
    return out


# ------------------------------------------------------------------ jaxgen

@functools.partial(jax.jit, static_argnames=("cfg",))
def prefill_first_token(params, cfg, tokens, lengths):
    """Prefill, then the greedy first token from the last prompt position: (kv, token [B])."""
    kv, hidden = llama.prefill(params, cfg, tokens, lengths)
    last = hidden[jnp.arange(tokens.shape[0]), lengths - 1]
    return kv, jnp.argmax(llama.lm_logits(params, cfg, last), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len"), donate_argnames=("cache",))
def greedy_step(params, cfg, cache, tokens, positions, kv_len):
    """One decode step of cfg's family (tokens, positions [S]) with the argmax on device: (next tokens [S], cache)."""
    family = family_for(cfg)
    hidden, cache = family.forward(params, cfg, cache, tokens[:, None], positions[:, None], kv_len)
    return jnp.argmax(family.lm_logits(params, cfg, hidden[:, 0]), axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("cfg", "kv_len"), donate_argnames=("cache",))
def prompt_into_cache(params, cfg, cache, tokens, kv_len):
    """cfg's family forward of one prompt tokens [1, T] from position 0 into the cache row 0, and the greedy
    first token: (token [1], cache)."""
    family = family_for(cfg)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    hidden, cache = family.forward(params, cfg, cache, tokens, positions, kv_len)
    return jnp.argmax(family.lm_logits(params, cfg, hidden[:, -1]), axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert0(cache, kv):
    return llama.insert(cache, kv, 0, jnp.int32(0))


def run_jaxgen(dtype, prompt_len: int, new_tokens: int, kv_len: int, repeats: int) -> dict:
    llm, load_s = timed(jaxgen.load, dtype=dtype)
    params, cfg = llm.params, llm.cfg
    prompt = llm.tokenizer.encode(TEXT)[:prompt_len]
    assert len(prompt) == prompt_len, "TEXT is too short for --prompt-tokens"
    tokens = jnp.asarray([prompt], jnp.int32)
    lengths = jnp.asarray([prompt_len], jnp.int32)

    (kv, first), compile_prefill_s = timed(prefill_first_token, params, cfg, tokens, lengths)
    prefill_times = [timed(prefill_first_token, params, cfg, tokens, lengths)[1] for _ in range(repeats)]

    # Compile the decode step ahead of time (its memory analysis comes with it), run it once on a throw-away cache.
    scratch = llama.init_cache(cfg, 1, kv_len, dtype)
    t0 = time.perf_counter()
    step = greedy_step.lower(params, cfg, scratch, first, lengths, kv_len).compile()
    compile_decode_s = time.perf_counter() - t0
    temp_bytes = step.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(params, scratch, first, lengths))

    cache = insert0(llama.init_cache(cfg, 1, kv_len, dtype), kv)
    jax.block_until_ready(cache)
    out = [int(first[0])]
    tok = first
    step_times = []
    t_loop = time.perf_counter()
    for i in range(new_tokens - 1):
        t0 = time.perf_counter()
        tok, cache = step(params, cache, tok, jnp.asarray([prompt_len + i], jnp.int32))
        out.append(int(tok[0]))  # one device-to-host read per step, as a streaming engine does
        step_times.append(time.perf_counter() - t0)
    loop_s = time.perf_counter() - t_loop

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_bytes = 2 * cfg.num_layers * kv_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
    return dict(load_s=load_s, compile_prefill_s=compile_prefill_s, prefill_s=statistics.median(prefill_times),
                compile_decode_s=compile_decode_s, step_s=statistics.median(step_times),
                decode_tok_s=(new_tokens - 1) / loop_s, tokens=out, prompt=prompt,
                param_bytes=param_bytes, kv_bytes=kv_bytes, temp_bytes=temp_bytes)


def run_family_decode(directory: str, prompt: list[int], new_tokens: int, kv_len: int = 128) -> dict:
    """Our greedy decode of `prompt` for the model in `directory` (HF loader, float32): median step time, tokens."""
    llm = jaxgen.load(directory, dtype=jnp.float32)
    params, cfg = llm.params, llm.cfg
    cache = family_for(cfg).init_cache(cfg, 1, kv_len, jnp.float32)
    tok, cache = prompt_into_cache(params, cfg, cache, jnp.asarray([prompt], jnp.int32), kv_len)
    out, times = [int(tok[0])], []
    step = greedy_step.lower(params, cfg, cache, tok, jnp.asarray([len(prompt)], jnp.int32), kv_len).compile()
    for i in range(new_tokens - 1):
        t0 = time.perf_counter()
        tok, cache = step(params, cache, tok, jnp.asarray([len(prompt) + i], jnp.int32))
        out.append(int(tok[0]))
        times.append(time.perf_counter() - t0)
    return dict(step_s=statistics.median(times), tokens=out, family=family_for(cfg).name)


def run_families(new_tokens: int, repeats: int) -> None:
    """Each family's tiny model: our decode step against HF `generate`'s, in this run."""
    import sys
    import tempfile

    import torch
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from conftest import build_tiny_hf_model

    tag = f"[{machine()}]"
    print(f"machine: {machine()}; HF transformers {transformers.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.2f}")
    prompt = np.random.default_rng(0).integers(3, 384, 64).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"):
            directory = build_tiny_hf_model(os.path.join(tmp, arch), arch)
            j = run_family_decode(directory, prompt, new_tokens)
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                                       attn_implementation="eager").eval()
            model.generation_config.eos_token_id = None
            h = run_hf(model, "float32", prompt, new_tokens, repeats)
            same = "identical" if j["tokens"] == h["tokens"] else "DIFFER"
            print(f"{arch:12s} ({j['family']:9s}) decode step: jaxgen {j['step_s'] * 1e3:6.2f} ms | HF generate "
                  f"{h['step_s'] * 1e3:6.2f} ms | HF/jaxgen {h['step_s'] / j['step_s']:5.1f}x | greedy tokens {same}"
                  f"  {tag}")


# ------------------------------------------------------------------ HF transformers

def load_hf():
    import torch
    import transformers

    path = default_model_path()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None  # EOS never stops (or masks) greedy decoding
    return model, time.perf_counter() - t0


def run_hf(model, dtype_name: str, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """HF `generate` timed per step: a stopping criterion that never stops stamps the clock after each token,
    so decode speed is the median step (robust to other processes' bursts on shared cores), as for jaxgen."""
    import torch
    import transformers

    class StepClock(transformers.StoppingCriteria):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model = model.to(getattr(torch, dtype_name))
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def prefill():
        with torch.no_grad():
            return model(ids, attention_mask=mask, use_cache=True).logits[0, -1].argmax()

    def generate(n, clock):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                  pad_token_id=0, stopping_criteria=transformers.StoppingCriteriaList([clock]))

    prefill()  # warm-up
    prefill_s = statistics.median(timed(prefill)[1] for _ in range(repeats))
    generate(2, StepClock())  # warm-up
    clock = StepClock()
    out, gen_s = timed(generate, new_tokens, clock)
    steps = np.diff(clock.stamps)
    return dict(prefill_s=prefill_s, generate_s=gen_s, tokens=out[0, len(prompt):].tolist(),
                step_s=float(np.median(steps)), decode_tok_s=len(steps) / (clock.stamps[-1] - clock.stamps[0]))


# ------------------------------------------------------------------ llama.cpp (optional)

def run_llama_cpp(prompt: list[int], new_tokens: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    t0 = time.perf_counter()
    model = llama_cpp.Llama(default_model_path(), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - t0
    model.reset()
    t0 = time.perf_counter()
    model.eval(prompt)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, _ in enumerate(model.generate(prompt, temp=0.0, reset=False)):
        if i + 1 >= new_tokens:
            break
    return dict(load_s=load_s, prefill_s=prefill_s, decode_tok_s=new_tokens / (time.perf_counter() - t0))


# ------------------------------------------------------------------ report

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--kv-len", type=int, default=1024, help="cache length and static attention bucket")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills (median)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--families", action="store_true", help="each family's tiny model against HF, then exit")
    args = ap.parse_args()
    if args.families:
        run_families(args.new_tokens, args.repeats)
        return
    if args.prompt_tokens + args.new_tokens > args.kv_len:
        ap.error("--prompt-tokens + --new-tokens must fit in --kv-len")

    tag = f"[{machine()}]"
    print(f"machine: {machine()}; model: {os.path.basename(default_model_path())}; "
          f"load average at start {os.getloadavg()[0]:.2f} (other processes share these cores)")
    if not args.skip_hf:
        import torch
        print(f"HF transformers baseline: torch {torch.__version__}, {torch.get_num_threads()} threads")
    bw = read_bandwidth()
    print("memory read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()) + f"  {tag}")
    results = []

    hf_model = hf_load_s = None
    if not args.skip_hf:
        hf_model, hf_load_s = load_hf()

    for dtype_name in args.dtypes.split(","):
        dtype = jnp.dtype(dtype_name)
        print(f"\n== {dtype_name}, batch 1, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
              f"kv_len {args.kv_len} ==  {tag}")
        j = run_jaxgen(dtype, args.prompt_tokens, args.new_tokens, args.kv_len, args.repeats)
        h = None if hf_model is None else run_hf(hf_model, dtype_name, j["prompt"], args.new_tokens, args.repeats)

        def ratio(a, b):
            return f"{a / b:.2f}x" if a and b else "n/a"

        line = f"load (GGUF -> params)   jaxgen {j['load_s']:6.2f} s"
        if h:
            cast = "" if dtype_name == "float32" else f", then cast to {dtype_name}"
            line += f" | HF {hf_load_s:6.2f} s (float32{cast}) | HF/jaxgen {ratio(hf_load_s, j['load_s'])}"
        print(f"{line}  {tag}")
        line = (f"prefill {args.prompt_tokens} (to 1st token) jaxgen {j['prefill_s'] * 1e3:7.1f} ms "
                f"(first call, compiling: {j['compile_prefill_s']:.1f} s)")
        if h:
            line += f" | HF {h['prefill_s'] * 1e3:7.1f} ms | HF/jaxgen {ratio(h['prefill_s'], j['prefill_s'])}"
        print(f"{line}  {tag}")
        line = (f"decode batch 1           jaxgen {1 / j['step_s']:6.1f} tok/s (median step {j['step_s'] * 1e3:.1f} ms; "
                f"{j['decode_tok_s']:.1f} tok/s over the loop; compile {j['compile_decode_s']:.1f} s)")
        if h:
            line += (f" | HF generate {1 / h['step_s']:6.1f} tok/s (median step {h['step_s'] * 1e3:.1f} ms; "
                     f"{h['decode_tok_s']:.1f} over the loop) | jaxgen/HF {ratio(h['step_s'], j['step_s'])}")
        print(f"{line}  {tag}")
        results.append((dtype_name, j))
        if h:
            same = j["tokens"] == h["tokens"]
            first = next((i for i, (a, b) in enumerate(zip(j["tokens"], h["tokens"])) if a != b), None)
            print(f"greedy tokens identical to HF: {'yes' if same else f'no (first differs at {first})'}")

    # The floor: bytes read per step / the best read bandwidth seen (measured again now: shared cores make
    # any single measurement low).
    again = read_bandwidth()
    print("\nmemory read bandwidth again: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in again.items()) + f"  {tag}")
    bound_bw = max(bw["numpy sum"], bw["XLA sum"], again["numpy sum"], again["XLA sum"])
    for dtype_name, j in results:
        weights_s = j["param_bytes"] / (bound_bw * 1e9)
        total_s = (j["param_bytes"] + j["kv_bytes"]) / (bound_bw * 1e9)
        print(f"floor {dtype_name}: {j['param_bytes'] / 1e6:.0f} MB weights + {j['kv_bytes'] / 1e6:.0f} MB KV read "
              f"per step -> {weights_s * 1e3:.1f} ms (weights) / {total_s * 1e3:.1f} ms (weights+KV) at "
              f"{bound_bw:.1f} GB/s; jaxgen median step {j['step_s'] * 1e3:.1f} ms = {j['step_s'] / weights_s:.2f}x / "
              f"{j['step_s'] / total_s:.2f}x the floor; the step also allocates {j['temp_bytes'] / 1e6:.0f} MB of "
              f"XLA temp buffers per call  {tag}")

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama.cpp: llama-cpp-python is not installed (skipped)")
    else:
        c = run_llama_cpp(j["prompt"], args.new_tokens)
        print(f"\nllama.cpp ({os.path.basename(default_model_path())}, {os.cpu_count()} threads): load "
              f"{c['load_s']:.2f} s, prefill {c['prefill_s'] * 1e3:.0f} ms, decode {c['decode_tok_s']:.1f} tok/s  "
              f"{tag}")

if __name__ == "__main__":
    main()
