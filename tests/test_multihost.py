"""Serving from two processes over one mesh: `jaxgen serve --coordinator ... --num-processes 2 --process-id I`
on loopback (jax.distributed, gloo CPU collectives), two host devices per process.

Process 0 serves HTTP and sends each device step to process 1; the answers must equal one process serving the
same mesh on four devices, bit for bit (the mesh is data=2 × model=2 with each process holding one data row,
so no sum crosses processes), and a process that dies must end the other within seconds.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

MESH = "data=2,model=2"
EXIT_WITHIN_S = 30
REQUESTS = [
    {"messages": [{"role": "user", "content": "Hello, world! How are you?"}], "max_tokens": 12,
     "temperature": 0, "logprobs": True, "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 10, "temperature": 0.9,
     "seed": 5, "n": 2},
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model, cache: str, devices: int, port: int | None = None, group: tuple[int, int, int] | None = None):
    """`jaxgen serve` on `devices` host devices; `group` = (coordinator port, processes, this process's id)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "JAXGEN_CACHE_DIR": cache}
    command = [sys.executable, "-u", "-m", "jaxgen", "serve", "--model", str(model), "--mesh", MESH,
               "--max-slots", "2", "--max-len", "128", "--no-warmup", "--port", str(port or free_port())]
    if group is not None:
        command += ["--coordinator", f"127.0.0.1:{group[0]}", "--num-processes", str(group[1]),
                    "--process-id", str(group[2])]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(process, port: int, seconds: float = 240) -> str:
    """Poll GET /health until it answers; -> the base URL (fails with the server's output if it died)."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} within {seconds} s")


def answers(url: str) -> list[dict]:
    """Each of REQUESTS' choices: content and log-probs."""
    out, name = [], httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    for body in REQUESTS:
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": name, **body}, timeout=120)
        assert reply.status_code == 200, reply.text
        out.append([(c["message"]["content"], c["logprobs"]) for c in reply.json()["choices"]])
    return out


def exits_within(process, seconds: float) -> tuple[int, str]:
    """Wait for `process` to end (-> its status and output); fail if it is still running after `seconds`."""
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"still running {seconds} s after its peer died")
    return process.returncode, output


def stop(*processes) -> None:
    """Kill whichever of `processes` still run, and reap them."""
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def model(make_tiny_hf_model):
    return make_tiny_hf_model("llama")


def test_two_processes_serve_what_one_process_serves_and_end_together(model, tmp_path):
    port = free_port()
    single = launch(model, str(tmp_path / "single"), 4, port)
    try:
        expected = answers(wait_ready(single, port))
    finally:
        stop(single)

    port, coordinator = free_port(), free_port()
    leader = launch(model, str(tmp_path / "group"), 2, port, (coordinator, 2, 0))
    follower = launch(model, str(tmp_path / "group"), 2, None, (coordinator, 2, 1))
    try:
        url = wait_ready(leader, port)
        assert answers(url) == expected
        assert answers(url) == expected  # and again, with the prefix cache holding the prompts
        follower.send_signal(signal.SIGKILL)
        status, output = exits_within(leader, EXIT_WITHIN_S)
        assert status != 0 and "stops" in output, output[-3000:]
    finally:
        stop(leader, follower)


# What JAX's coordination client prints as it ends a process whose coordination service (in process 0) is gone
COORDINATOR_LOST = "Terminating process because the JAX distributed service detected fatal errors"


def test_the_follower_ends_when_the_leader_dies(model, tmp_path):
    """The follower exits with an error saying why: its own line when the broken broadcast is noticed first, or
    JAX's, whose coordination client ends every process once process 0 (which runs the coordination service) is
    gone; which of the two comes first is a race."""
    port, coordinator = free_port(), free_port()
    leader = launch(model, str(tmp_path / "group"), 2, port, (coordinator, 2, 0))
    follower = launch(model, str(tmp_path / "group"), 2, None, (coordinator, 2, 1))
    try:
        wait_ready(leader, port)
        leader.send_signal(signal.SIGKILL)
        status, output = exits_within(follower, EXIT_WITHIN_S)
        assert status != 0 and ("stops" in output or COORDINATOR_LOST in output), output[-3000:]
    finally:
        stop(leader, follower)


@pytest.mark.parametrize("size", [0, 1, 4091, 4092, 4093, 5000, 70_000])
def test_steps_travel_whole_whatever_their_length(size):
    """The framing of `multihost._broadcast` (one process: the broadcast returns its own bytes)."""
    from jaxgen import multihost

    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert multihost._broadcast(payload) == payload


def test_a_sampling_row_travels_small_and_whole():
    import jax
    import numpy as np

    from jaxgen import multihost
    from jaxgen.sampling import SamplingParams, make_row

    row = make_row(SamplingParams(temperature=0.7, logit_bias=((5, 2.0),)), [1, 2, 3], np.arange(2), 49_152)
    data = multihost.encode_step("start", (0, 3, 17, row, 0))
    assert len(data) < 4092  # one broadcast, though the row holds ~450 KB of arrays
    op, (index, slot, position, back, adapter) = multihost.decode_step(multihost._broadcast(data))
    assert (op, index, slot, position, adapter) == ("start", 0, 3, 17, 0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(back)))


def test_process_group_options_are_checked(capsys):
    from jaxgen.cli import main

    assert main(["serve", "--num-processes", "2", "--process-id", "2"]) == 2
    assert "--process-id 2 must be in 0 .. 1" in capsys.readouterr().err
    assert main(["serve", "--process-id", "-1"]) == 2
    assert "--process-id -1 must be in 0 .. N-1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--num-processes", "0"])
    env = {k: v for k, v in os.environ.items() if k != "JAX_COORDINATOR_ADDRESS"}
    alone = subprocess.run([sys.executable, "-m", "jaxgen", "serve", "--distributed"], env=env, capture_output=True,
                           text=True, timeout=120)  # nothing here for JAX to detect
    assert alone.returncode == 2 and "could not join the process group" in alone.stderr, alone.stderr


def test_a_follower_refuses_requests(tiny_llm, monkeypatch):
    """Only process 0 schedules: a request given to a follower's engine is refused at once, never left waiting."""
    from jaxgen import multihost
    from jaxgen.errors import JaxgenError
    from jaxgen.sampling import SamplingParams

    engine = tiny_llm.engine
    monkeypatch.setattr(multihost, "is_leader", lambda: False)
    with pytest.raises(JaxgenError, match="only process 0 takes requests"):
        engine.submit([3, 4, 5], SamplingParams(max_tokens=2))
