"""Command line: `jaxgen [chat] [MESSAGE]` streams an answer; `jaxgen serve` starts the HTTP server;
`jaxgen eval --tasks ...` runs lm-evaluation-harness tasks on the model in process."""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

from jaxgen.paths import cache_root

DEFAULT_MESSAGE = "What is the capital of France? Answer in one sentence."


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, shared by every subcommand."""
    parser.add_argument("--model", default=None, help="GGUF file, HF directory or jaxgen checkpoint "
                        "(default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="weights dtype (default: float32 on CPU, bfloat16 on accelerators)")


def lora_arg(value: str) -> tuple[str, str]:
    """`--lora ID=PATH` -> (ID, PATH)."""
    adapter_id, sep, path = value.partition("=")
    if not sep or not adapter_id or not path:
        raise argparse.ArgumentTypeError(f"expected ID=PATH, got {value!r}")
    return adapter_id, path


def positive_int(value: str) -> int:
    """An argument that must be an integer >= 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return int(value)


def join_process_group(args) -> str | None:
    """Join the multi-process group the serve options name (-> None), or say what is wrong with them."""
    if args.coordinator is None and args.num_processes is None and args.process_id is None and not args.distributed:
        return None
    if args.process_id is not None and (args.process_id < 0 or args.process_id >= (args.num_processes or math.inf)):
        last = "N-1" if args.num_processes is None else args.num_processes - 1
        return f"--process-id {args.process_id} must be in 0 .. {last} (--num-processes)"
    from jaxgen import multihost

    try:
        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, RuntimeError) as e:  # nothing to detect, an unreachable coordinator, a timeout
        return f"could not join the process group: {e}"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The `jaxgen` argument parser."""
    parser = argparse.ArgumentParser(prog="jaxgen", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    chat = sub.add_parser("chat", help="stream a greedy answer to one chat message (the default command)")
    chat.add_argument("message", nargs="?", default=DEFAULT_MESSAGE)
    chat.add_argument("--max-tokens", type=int, default=512)
    chat.add_argument("--temperature", type=float, default=0.0)
    add_model_args(chat)
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-slots", type=int, default=32, help="sequences decoded together")
    serve.add_argument("--max-len", type=int, default=2048, help="context length per slot (prompt + output)")
    serve.add_argument("--max-queue", type=int, default=256, help="requests that may wait; more get 429")
    serve.add_argument("--api-key", default=os.environ.get("JAXGEN_API_KEY"),
                       help="require this bearer key (default: $JAXGEN_API_KEY; none = open)")
    serve.add_argument("--prompt-log", default=None, help="file that receives prompts of log_prompt requests")
    serve.add_argument("--lora", action="append", default=[], metavar="ID=PATH", type=lora_arg,
                       help="serve the HF PEFT LoRA adapter in directory PATH as model/peft id ID (repeatable)")
    serve.add_argument("--no-warmup", action="store_true", help="compile lazily instead of at start-up")
    serve.add_argument("--mesh", default=None, metavar="data=D,model=M",
                       help="shard over a D × M device mesh: slots on data, heads, MLP columns and vocabulary on "
                            "model (D·M devices of those JAX sees; default: one device)")
    serve.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="serve from several processes (hosts) over one mesh: process 0's address, which every "
                            "process gives (jax.distributed); process 0 serves HTTP, the others follow its steps")
    serve.add_argument("--num-processes", type=positive_int, default=None, help="processes in the group")
    serve.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    serve.add_argument("--distributed", action="store_true",
                       help="join a process group JAX detects itself (a TPU pod slice, SLURM, or "
                            "$JAX_COORDINATOR_ADDRESS), as the three options above do")
    serve.add_argument("--allow-additional-properties", action="store_true",
                       help="JSON schemas without additionalProperties accept undeclared keys, as JSON Schema "
                            "says (default: strict, they refuse them)")
    evaluate = sub.add_parser("eval", help="run lm-evaluation-harness tasks on the model, in process "
                                           "(needs the [eval] extra)")
    add_model_args(evaluate)
    evaluate.add_argument("--tasks", required=True, help="comma-separated task names (or groups)")
    evaluate.add_argument("--model-args", default="", metavar="K=V,...",
                          help="more arguments of the jaxgen model (jaxgen.eval.JaxgenLM), e.g. max_len=1024,lora=DIR")
    evaluate.add_argument("--num-fewshot", type=int, default=None)
    evaluate.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    evaluate.add_argument("--batch-size", default=None, help="sequences run together (the engine's slots)")
    evaluate.add_argument("--include-path", default=None, help="a directory of task YAML files of your own")
    evaluate.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", default=None, help="also write the results as JSON to this file")
    return parser


def enable_compile_cache() -> None:
    """Keep compiled programs on disk (JAX's persistent cache), so a second start skips most compiling. Not
    for `serve`: its engine keeps its own executables (ProgramTable), which JAX's cache would keep from
    being stored."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_root(), "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_chat(args) -> int:
    """Load the model and stream its answer to stdout."""
    import jaxgen

    enable_compile_cache()
    llm = jaxgen.load(args.model, dtype=args.dtype)
    print(f"> {args.message}", flush=True)
    for chunk in llm.chat([{"role": "user", "content": args.message}], stream=True,
                          max_tokens=args.max_tokens, temperature=args.temperature):
        for choice in chunk["choices"]:
            print(choice["delta"].get("content") or "", end="", flush=True)
    print()
    return 0


def run_serve(args) -> int:
    """Load the model, warm the engine up and serve HTTP until interrupted."""
    ids = [adapter_id for adapter_id, _ in args.lora]
    if len(set(ids)) != len(ids):
        print(f"error: --lora: an adapter id is given twice ({', '.join(ids)})", file=sys.stderr)
        return 2
    problem = join_process_group(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    import jaxgen
    from jaxgen import multihost
    from jaxgen.engine import EngineConfig
    from jaxgen.server import serve

    config = EngineConfig(num_slots=args.max_slots, max_len=args.max_len, max_queue=args.max_queue,
                          executable_cache=os.path.join(cache_root(), "executables"),
                          strict_schemas=not args.allow_additional_properties)
    from jaxgen.errors import ModelLoadError

    try:
        llm = jaxgen.load(args.model, dtype=args.dtype, engine_config=config, prompt_log=args.prompt_log,
                          adapters=dict(args.lora), mesh=args.mesh)
        llm.engine  # started now: it checks the mesh against its slots
    except (ValueError, ModelLoadError) as e:  # a mesh that does not fit the devices, the model or the slots
        if not args.mesh:
            raise
        print(f"error: --mesh {args.mesh}: {e}", file=sys.stderr)
        return 2
    if not args.no_warmup:
        print("compiling the programs that serve every shape (cached on disk for the next start)...", flush=True)
        start = time.perf_counter()
        llm.engine.warmup_in_background()
        print(f"ready to serve in {time.perf_counter() - start:.0f} s; the remaining shapes compile in the "
              "background (GET /health says \"warming\" until they are done)", flush=True)
    if not multihost.is_leader():
        print("following process 0, which serves HTTP", flush=True)
        return multihost.follow(llm.engine)
    serve(llm, host=args.host, port=args.port, api_key=args.api_key)
    return 0


def run_eval(args) -> int:
    """Evaluate the model on lm-evaluation-harness tasks with `jaxgen.eval` and print the harness's table."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table, simple_parse_args_string
    except ImportError:
        print("error: jaxgen eval needs lm-evaluation-harness: pip install 'jaxgen[eval]'", file=sys.stderr)
        return 2
    import json

    import jaxgen.eval  # noqa: F401  (registers the `jaxgen` model)

    enable_compile_cache()
    model_args = {"path": args.model, "dtype": args.dtype, "seed": args.seed,
                  **simple_parse_args_string(args.model_args)}
    results = lm_eval.simple_evaluate(
        model="jaxgen", model_args={k: v for k, v in model_args.items() if v is not None},
        tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
        task_manager=TaskManager(include_path=args.include_path), apply_chat_template=args.apply_chat_template,
        random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({k: results[k] for k in ("results", "configs", "versions", "n-shot") if k in results}, f,
                      indent=2, default=str)
    return 0


HUGE_PAGES = "glibc.malloc.hugetlb"  # glibc's tunable: 1 = malloc asks for transparent huge pages (madvise)


def huge_pages_environment(environ: dict[str, str], libc: str) -> dict[str, str] | None:
    """The environment to re-run this process in so glibc's malloc asks for transparent huge pages, or None when
    it is already set (by us, or by a user's own `GLIBC_TUNABLES`, `=0` opting out) or the C library is not glibc.
    On XLA CPU the KV cache (3 GB for the default engine) is malloc'ed memory that every decode step reads; with
    huge pages (the kernel's usual `madvise` setting) a 32-row step at a 1,024-position window ran in 206-279 ms
    against 225-367 ms on the development VM (fewer TLB misses; docs/architecture.md)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if libc != "glibc" or HUGE_PAGES in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{HUGE_PAGES}=1"]))}


def this_process_huge_pages_environment() -> dict[str, str] | None:
    """`huge_pages_environment` of this process's environment and C library."""
    return huge_pages_environment(dict(os.environ), platform.libc_ver()[0])


def restart_with_huge_pages(command: list[str]) -> None:
    """Replace this process by `command` (argv, `sys.executable` first) run in `huge_pages_environment`, when
    that differs from this one's; otherwise return. The new image sees the tunable set, so it runs on."""
    environ = this_process_huge_pages_environment()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, environ)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxgen` console script and `python -m jaxgen`. Run as a process (no `argv`), it first
    restarts itself once with huge pages for large buffers (`huge_pages_environment`)."""
    if argv is None:
        restart_with_huge_pages([sys.executable, "-m", "jaxgen", *sys.argv[1:]])
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("chat", "serve", "eval", "-h", "--help"):
        argv = ["chat", *argv]
    args = build_parser().parse_args(argv)
    return {"serve": run_serve, "eval": run_eval}.get(args.command, run_chat)(args)
