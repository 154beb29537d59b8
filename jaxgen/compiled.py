"""The engine's compiled programs: compiled ahead of time by shape key, never by a request.

Each key (a decode or prefill shape) is lowered and compiled once, or loaded from an on-disk cache of
serialized executables (`jax.experimental.serialize_executable`), which skips tracing as well as XLA (JAX's
own persistent cache still traces every program to find its key). The scheduler asks for the best ready
program among those that fit; a background thread can compile the rest while the first requests are
served by larger ones, so a server answers early and still never compiles for a request.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pickle
import threading
import weakref
from typing import Callable, Hashable, Sequence

import jax
from jax.experimental import serialize_executable

import jaxgen
import jaxgen.models
import jaxgen.sampling
from jaxgen.models import native

# Executables alive in this process, by digest: engines of the same shapes share them, and an executable is
# never deserialized into a process that already holds it (XLA CPU then fails to find its functions). Weak:
# an executable goes when the last table holding it closes (each one keeps a few memory maps, and a process
# creating many engines would otherwise reach the kernel's limit on them and crash).
_BUILT: "weakref.WeakValueDictionary[str, Callable]" = weakref.WeakValueDictionary()
_BUILT_LOCK = threading.Lock()

# Executables read from disk ahead of the engine that runs them (`preload`), by digest, until a table takes
# them; a table that needs one waits for it instead of reading it again. Preloading happens only in a process
# that has built nothing yet, so no executable is ever read twice.
_PRELOADED: dict[str, concurrent.futures.Future] = {}
_BUILDS_STARTED = threading.Event()

# Whether this thread's compile in progress came out of JAX's persistent cache (see ProgramTable._compile).
_COMPILING = threading.local()


def _note_jax_cache_hit(event: str, **_) -> None:
    """JAX's monitoring hook: a persistent-cache hit, recorded on the compiling thread, marks that compile."""
    if event == "/jax/compilation_cache/cache_hits" and getattr(_COMPILING, "active", False):
        _COMPILING.hit = True


jax.monitoring.register_event_listener(_note_jax_cache_hit)


def source_fingerprint() -> str:
    """A hash of the JAX build, the device, the native kernels in use and this installation's Python sources: an
    executable built from other code is never loaded."""
    h = hashlib.sha256(f"{jax.__version__}|{jax.default_backend()}|{jax.devices()[0].device_kind}|"
                       f"{native.fingerprint()}".encode())
    for package in (jaxgen, jaxgen.models, jaxgen.sampling):
        directory = os.path.dirname(os.path.abspath(package.__file__))
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                with open(os.path.join(directory, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()[:20]


def read_executable(path: str) -> Callable | None:
    """The executable serialized at `path`, or None (absent, damaged or foreign: rebuilt, never fatal). The
    native kernels it may call are registered first."""
    native.registered_library()
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # a damaged or foreign entry is rebuilt, never fatal
        return None


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename, so a reader never sees half of it; a failure
    (a full or read-only disk) is ignored: the cache only saves work."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


def first_programs_file(cache_dir: str, start: str) -> str:
    """The file that lists the digests of the programs a start described by `start` made ready first."""
    return os.path.join(cache_dir, f"first-{hashlib.sha256(start.encode()).hexdigest()[:24]}.json")


def preload(cache_dir: str, start: str) -> None:
    """Read, in a thread, the executables that the last start described by `start` (its model file and sizes)
    made ready first (`ProgramTable.remember_first`), while the caller loads the model: deserializing releases
    the GIL, and on 2 CPU cores the default model's covering programs (3.3 s for 9) load beside its weights (5 s).
    A stale list costs only the reading: tables take executables by digest, which names all they depend on.
    The thread first builds the native kernels where this machine has none yet (`native`, ~4 s).
    Reads nothing in a process that has started building programs."""
    try:
        with open(first_programs_file(cache_dir, start), encoding="utf-8") as f:
            listed = json.load(f)
    except (OSError, ValueError):
        listed = []
    with _BUILT_LOCK:
        if _BUILDS_STARTED.is_set() or not isinstance(listed, list):
            listed = []
        futures = {d: concurrent.futures.Future() for d in dict.fromkeys(listed)
                   if isinstance(d, str) and d.isalnum() and d not in _PRELOADED}
        _PRELOADED.update(futures)

    def run():
        native.registered_library()
        for digest, future in futures.items():
            future.set_result(read_executable(os.path.join(cache_dir, f"{digest}.xla")))
    threading.Thread(target=run, name="jaxgen-preload", daemon=True).start()


class ProgramTable:
    """Compiled executables by key. `lower(key)` returns the `jax.stages.Lowered` of a key's program;
    `identity` (a string) names everything else an executable depends on (model config, dtype, engine sizes),
    so a disk entry is found again only under the same one."""

    def __init__(self, lower: Callable[[Hashable], "jax.stages.Lowered"], identity: str, cache_dir: str | None):
        self.lower = lower
        self.cache_dir = cache_dir
        self.identity = hashlib.sha256(f"{source_fingerprint()}|{identity}".encode()).hexdigest()[:24]
        self.ready: dict[Hashable, Callable] = {}
        self.lock = threading.Lock()
        self.background: threading.Thread | None = None
        self.stop = threading.Event()
        self.compiled_count = 0  # compiled here
        self.loaded_count = 0  # loaded from disk
        self.preloaded_count = 0  # of those, read ahead by `preload`
        self.shared_count = 0  # already built in this process

    def get(self, key: Hashable) -> Callable:
        """The executable of `key`, compiling (or loading) it now if it is not ready."""
        with self.lock:
            program = self.ready.get(key)
        return program if program is not None else self._build(key)

    def first_ready(self, keys: Sequence[Hashable]) -> tuple[Hashable, Callable] | None:
        """(key, executable) of the first ready key of `keys` (best first), or None."""
        with self.lock:
            return next(((k, self.ready[k]) for k in keys if k in self.ready), None)

    def build_all(self, keys: Sequence[Hashable]) -> None:
        """Make every key ready, in order (a warm-up)."""
        for key in keys:
            if self.stop.is_set():
                return
            with self.lock:
                done = key in self.ready
            if not done:
                self._build(key)

    def build_in_background(self, keys: Sequence[Hashable], on_error: Callable[[BaseException], None]) -> None:
        """Start a thread that makes `keys` ready in order; `on_error` hears of a failure."""
        def run():
            try:
                self.build_all(keys)
            except BaseException as e:  # reported to the engine, which tells whoever waits for it
                on_error(e)
        self.background = threading.Thread(target=run, name="jaxgen-compile", daemon=True)
        self.background.start()

    def wait(self) -> None:
        """Block until the background compilation (if any) has finished."""
        if self.background is not None:
            self.background.join()

    def close(self) -> None:
        """Stop background compiling and drop every executable."""
        self.stop.set()
        self.wait()
        with self.lock:
            self.ready.clear()

    def remember_first(self, keys: Sequence[Hashable], start: str) -> None:
        """List `keys`' digests, the programs just made ready first, for the next start described by `start` to
        read ahead (`preload`; a failure to write only costs that start the overlap). What this start read ahead
        and did not take is dropped: a stale list's executables are not held for the process's life."""
        with _BUILT_LOCK:
            _PRELOADED.clear()
        if self.cache_dir is not None:
            write_atomically(first_programs_file(self.cache_dir, start),
                             json.dumps([self._digest(k) for k in keys]).encode())

    def _digest(self, key: Hashable) -> str:
        """The name of key's executable: everything it depends on, hashed."""
        return hashlib.sha256(f"{self.identity}|{key!r}".encode()).hexdigest()[:32]

    def _path(self, key: Hashable) -> str | None:
        """Where key's serialized executable lives on disk (None without a cache directory)."""
        return None if self.cache_dir is None else os.path.join(self.cache_dir, f"{self._digest(key)}.xla")

    def _build(self, key: Hashable) -> Callable:
        """Key's executable: built already in this process, else loaded from disk (or taken from `preload`), else
        lowered, compiled and stored."""
        digest = self._digest(key)
        with _BUILT_LOCK:
            _BUILDS_STARTED.set()
            program = _BUILT.get(digest)
            preloaded = _PRELOADED.pop(digest, None)
        if program is not None:
            self.shared_count += 1
        else:
            program = preloaded.result() if preloaded is not None else self._load(key)
            if program is not None:
                self.loaded_count += 1
                self.preloaded_count += preloaded is not None
            else:
                program, from_jax_cache = self._compile(key)
                if not from_jax_cache:
                    self._store(key, program)
                self.compiled_count += 1
            with _BUILT_LOCK:
                program = _BUILT.setdefault(digest, program)
        with self.lock:
            self.ready[key] = program
        return program

    def _compile(self, key: Hashable) -> tuple[Callable, bool]:
        """Lower and compile key's program: (executable, whether JAX's persistent cache supplied it). On XLA
        CPU an executable that JAX loaded from its cache serializes without its kernels (a later process
        running it fails: "Function copy_gather_fusion not found"), so such a one is never stored. JAX
        decides once per process whether its cache is used, so it cannot be switched off for one compile;
        `jaxgen serve` leaves it off, and the executable cache is its only one."""
        _COMPILING.active, _COMPILING.hit = True, False
        try:
            return self.lower(key).compile(), _COMPILING.hit
        finally:
            _COMPILING.active = False

    def _load(self, key: Hashable) -> Callable | None:
        """The deserialized executable of `key`, or None (no cache, no entry, or an unreadable one)."""
        path = self._path(key)
        return None if path is None else read_executable(path)

    def _store(self, key: Hashable, compiled) -> None:
        """Write key's executable to disk atomically (a failure only costs the next start a compile)."""
        path = self._path(key)
        if path is not None:
            write_atomically(path, pickle.dumps(serialize_executable.serialize(compiled)))
