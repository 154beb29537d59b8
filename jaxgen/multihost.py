"""Serving from several processes (hosts) over one global mesh: process 0 decides, every process runs the steps.

`initialize` joins the process group through `jax.distributed.initialize` (CPU processes exchange collectives
with gloo). Process 0, the leader, runs the HTTP server and the engine's scheduler; before each device step its
engine `send`s the step (a name and its host inputs) to the others, which `follow`: receive each step and run
it on their own engine, so every process launches the same jitted programs over the global mesh in the same
order and scheduling happens once. Steps travel as compressed pickled bytes through
`jax.experimental.multihost_utils.broadcast_one_to_all`, i.e. JAX's own collectives: one broadcast of
FIRST_BYTES carries a step's length and most steps whole; a longer one sends the rest in a second.

A process that dies breaks the next collective; the survivors print what happened and exit (`PEER_LOST_EXIT`).
When process 0 dies, JAX's coordination client (its service runs in process 0) may end a follower first, with
its own message and SIGABRT.
An idle leader sends an empty step every `IDLE_TICK_S` seconds, so a lost follower is noticed while nothing
runs too, and JAX's coordination service ends a process whose peers stop sending heartbeats (`HEARTBEAT_S`).
"""
from __future__ import annotations

import os
import pickle
import sys
import zlib

import jax
import numpy as np

IDLE_TICK_S = 2.0  # an idle leader's keep-alive step
HEARTBEAT_S = 10  # JAX's coordination service declares a silent process dead after this long
PEER_LOST_EXIT = 3
FIRST_BYTES = 4096  # the first broadcast of every step: its length (4 bytes) and up to 4,092 bytes of it
MIN_REST_BYTES = 4096  # the rest of a longer step travels in power-of-two buckets: few broadcast shapes
STOP = "stop"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the process group; arguments left None come from what `jax.distributed.initialize` reads itself
    (its environment variables, a cluster's scheduler). Call before anything touches a device."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=HEARTBEAT_S)


def is_multiprocess() -> bool:
    """Whether this process is one of several sharing the mesh."""
    return jax.process_count() > 1


def is_leader() -> bool:
    """Whether this process schedules (and serves HTTP): process 0."""
    return jax.process_index() == 0


def send(op: str, args: tuple) -> None:
    """Leader: hand step `op(*args)` (host values only: numpy arrays, numbers, tuples) to every follower."""
    _broadcast(encode_step(op, args))


def receive() -> tuple[str, tuple]:
    """Follower: the leader's next step (blocks until it is sent)."""
    return decode_step(_broadcast(None))


def encode_step(op: str, args: tuple) -> bytes:
    """A step as the bytes that travel: pickled, compressed (a sampling row's vocabulary-long arrays are mostly
    zeros)."""
    return zlib.compress(pickle.dumps((op, args), protocol=pickle.HIGHEST_PROTOCOL), 1)


def decode_step(data: bytes) -> tuple[str, tuple]:
    """`encode_step`'s inverse."""
    return pickle.loads(zlib.decompress(data))


def follow(engine) -> int:
    """Follower: run the leader's steps on `engine` (`Engine.apply_step`) until it stops; -> exit status 0."""
    while True:
        op, args = receive()
        if op == STOP:
            return 0
        engine.apply_step(op, *args)


def rest_bucket(size: int) -> int:
    """The broadcast length carrying the `size` bytes a step has beyond its first broadcast: a power of two."""
    return max(MIN_REST_BYTES, 1 << max(0, size - 1).bit_length())


def _broadcast(payload: bytes | None) -> bytes:
    """Process 0's `payload` on every process (None elsewhere): its length and head in one broadcast of
    FIRST_BYTES, the rest, if any, in a second."""
    from jax.experimental import multihost_utils

    head = FIRST_BYTES - 4
    first = np.zeros(FIRST_BYTES, np.uint8)
    if payload is not None:
        first[:4] = np.frombuffer(np.int32(len(payload)).tobytes(), np.uint8)
        first[4:4 + min(len(payload), head)] = np.frombuffer(payload[:head], np.uint8)
    try:
        first = np.asarray(multihost_utils.broadcast_one_to_all(first))
        size = int(first[:4].view(np.int32)[0])
        if size <= head:
            return first[4:4 + size].tobytes()
        rest = np.zeros(rest_bucket(size - head), np.uint8)
        if payload is not None:
            rest[:size - head] = np.frombuffer(payload[head:], np.uint8)
        rest = np.asarray(multihost_utils.broadcast_one_to_all(rest))
        return first[4:].tobytes() + rest[:size - head].tobytes()
    except Exception as e:  # a peer is gone: the mesh cannot run another step
        abandon(f"a collective with the other processes failed ({e})")


def abandon(reason: str) -> None:
    """End this process at once: the process group is broken, so nothing it holds can be served."""
    print(f"jaxgen: process {jax.process_index()} of {jax.process_count()} stops: {reason}. The other processes "
          "stop too; restart them all together.", file=sys.stderr, flush=True)
    os._exit(PEER_LOST_EXIT)
