"""The native CPU kernels (`kernels/*.cc`, XLA FFI custom calls): one library built with the machine's C++
compiler (`$CXX`, else `c++`) on first use and kept under $JAXGEN_CACHE_DIR (else ~/.cache/jaxgen)/kernels, keyed
by its sources, flags, compiler, JAX and CPU, then registered with XLA once per process.

Each kernel has its own module, which says where it applies: `native_attention` (cached attention) and
`native_matmul` (a decode step's projections and LM head, over float32 weights or a GGUF file's blocks). Each can be
switched off alone (`switched_on`); where the build fails (with a warning) or off the CPU, XLA's own operations
run instead.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax

from jaxgen.paths import cache_root

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCES = tuple(sorted(glob.glob(os.path.join(KERNELS, "*.cc"))))
HEADERS = tuple(sorted(glob.glob(os.path.join(KERNELS, "*.h"))))
# FFI target -> the handler symbol the library exports, and the variable that switches it off ("0").
TARGETS = {"jaxgen_attention": ("JaxgenAttention", "JAXGEN_NATIVE_ATTENTION"),
           "jaxgen_matmul": ("JaxgenMatmul", "JAXGEN_NATIVE_MATMUL"),
           "jaxgen_matmul_q4_1": ("JaxgenMatmulQ41", "JAXGEN_NATIVE_Q4_1"),
           "jaxgen_matmul_q8_0": ("JaxgenMatmulQ80", "JAXGEN_NATIVE_Q8_0")}
# CPU features (Linux's /proc/cpuinfo flags) a kernel is written for; elsewhere its source builds to a handler
# that refuses, and the kernel counts as off.
CPU_FEATURES = dict.fromkeys(("jaxgen_matmul_q4_1", "jaxgen_matmul_q8_0"), ("avx512f", "f16c"))  # matmul_blocks.cc
# fast-math lets the compiler call glibc's vector exp/tanh; nothing here relies on inf, NaN or signed zeros. It is
# given to the compile step alone: linked with it, the library would carry crtfastmath's constructor, which sets
# flush-to-zero for the whole process on load (numpy's subnormals, and every other library's, would read 0).
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-std=c++17", "-fPIC", "-w")
LINK_FLAGS = ("-shared",)
_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def _cpu_description() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them, else the machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), platform.machine())
    except OSError:
        return platform.machine()


def _build_key(compiler: str) -> str:
    """A hash of everything the built library depends on."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    parts = [" ".join(FLAGS + LINK_FLAGS).encode(), version.encode(), jax.__version__.encode(),
             _cpu_description().encode()]
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            parts.append(os.path.basename(path).encode() + b"\0" + f.read())
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _library() -> str:
    """The path of the built kernel library, compiling it first when this machine has none (built in a temporary
    directory beside it and renamed into place, so processes building at once never load half a file)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    path = os.path.join(cache_root(), "kernels", f"kernels-{_build_key(compiler)}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as work:
            objects = [os.path.join(work, os.path.basename(source)[:-3] + ".o") for source in SOURCES]
            _compile_all(compiler, SOURCES, objects)
            lib = os.path.join(work, "kernels.so")
            subprocess.run([compiler, *LINK_FLAGS, *objects, "-o", lib], check=True, capture_output=True, text=True)
            os.replace(lib, path)
    return path


def _compile_all(compiler: str, sources, objects) -> None:
    """Compile each source to its object file, all at once (the build is on a cold start's path: ~7 s for the
    three sources one after another on 2 cores, ~4 s side by side); raises CalledProcessError for the first that
    fails."""
    compiles = [subprocess.Popen([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", "-c", source, "-o", obj],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for source, obj in zip(sources, objects)]
    results = [(proc, *proc.communicate()) for proc in compiles]
    for proc, out, err in results:
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)


def switched_on(target: str) -> bool:
    """Whether kernel `target` may run here: on the CPU, one with the features it needs, and not switched off by
    its variable."""
    return (os.environ.get(TARGETS[target][1], "1") != "0" and jax.default_backend() == "cpu"
            and set(CPU_FEATURES.get(target, ())) <= set(_cpu_description().split()))


def available(target: str) -> bool:
    """Whether kernel `target` is switched on, built and registered with XLA (built on the first call)."""
    return switched_on(target) and registered_library() is not None


def fingerprint() -> str:
    """What a compiled program's native calls are: the library's file name (its build key) and the kernels
    switched on, or "xla"."""
    on = [target for target in TARGETS if switched_on(target)]
    library = registered_library() if on else None
    return f"{library}:{','.join(on)}" if library else "xla"


def registered_library() -> str | None:
    """The file name of the kernel library registered in this process, or None where it cannot be built (or no
    kernel is switched on); built and registered on the first call."""
    if not any(switched_on(target) for target in TARGETS):
        return None
    with _LOCK:
        return _register_once()


@functools.cache
def _register_once() -> str | None:
    """`_register`, once per process (callers hold _LOCK, so no two threads build at once)."""
    return _register()


def _register() -> str | None:
    """Build (or find) the library and register every kernel's handler -> its file name; None where it cannot be
    built (with a warning)."""
    try:
        path = _library()
        library = ctypes.cdll.LoadLibrary(path)
        for target, (symbol, _) in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:
        detail = e.stderr[-2000:] if isinstance(e, subprocess.CalledProcessError) else e
        log.warning("native kernels unavailable, using XLA's operations instead: %s", detail)
        return None
    return os.path.basename(path)
