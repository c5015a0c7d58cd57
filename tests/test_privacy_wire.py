"""A device without the cluster key, on the same network, gets nothing: it cannot join, cannot read a
prompt or a hidden state off the wire, and cannot inject a frame.

A real 2-node tiny-Llama cluster on loopback, split over both nodes by ``--memory-limit`` so that a
hidden state really crosses the peer link. While a prompt runs through it, ``tcpdump`` captures the
loopback traffic of the peer ports; the capture must contain neither the prompt's text nor the bytes
of any row of the hidden state the first stage sends (computed here with the same modules), nor the
embedding rows of the prompt's tokens. A second capture of the HTTP port (plain HTTP on localhost by
design) must contain the prompt: the control that shows the capture and the search work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from conftest import serving

from llnode.cluster import LocalCluster, free_base_port
from llnode.model.manifest import load_manifest
from llnode.model.reference import greedy_texts
from llnode.model.runner import ModuleRunner
from llnode.model.tokenizer import load_tokenizer
from llnode.net import auth
from llnode.net.codec import MESSAGE, pack_body
from llnode.plan.costs import build_instance
from llnode.plan.types import DeviceProfile, PlanOptions

PROMPT = "secret launch code: zebra-orchid-7741"
MAX_TOKENS = 24



def two_node_limit(shards: Path) -> int:
    """A ``--memory-limit`` under which no node can hold the whole model but two nodes can."""
    options = PlanOptions()
    probe = DeviceProfile(device_id="probe", decode_flops_per_s=1e9, memory_available_bytes=1 << 40)
    inst = build_instance(load_manifest(shards), [probe], [], options, {})
    n = inst.num_modules
    two = min(max(inst.memory_bytes(0, k), inst.memory_bytes(k, n)) for k in range(1, n))
    return math.ceil((two + inst.memory_bytes(0, n)) // 2 / options.memory_fraction)


def tcpdump() -> str:
    """The tcpdump binary, installing it (Debian, as root) if missing; skip with the reason otherwise."""
    found = shutil.which("tcpdump")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("tcpdump is not installed and cannot be installed here (needs root and apt-get)")
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "tcpdump"], capture_output=True, timeout=600, check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )  # fmt: skip
    found = shutil.which("tcpdump") or ("/usr/bin/tcpdump" if Path("/usr/bin/tcpdump").exists() else None)
    if not found:
        pytest.skip("tcpdump could not be installed (apt-get install tcpdump failed)")
    return found


@pytest.fixture(scope="module")
def cluster2(tiny_llama_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        nodes=2, base_port=free_base_port(2), model=tiny_llama_shards.name, shards=tiny_llama_shards.parent,
        workdir=tmp_path_factory.mktemp("privacy"),
        extra_args=["--memory-limit", str(two_node_limit(tiny_llama_shards))],
    )  # fmt: skip
    yield from serving(cluster)


def status(cluster: LocalCluster, i: int) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s:
            st = await cluster.status(i, s)
            assert st is not None, cluster.log_tail(i)
            return st

    return asyncio.run(get())


def complete(cluster: LocalCluster, i: int) -> str:
    async def go() -> str:
        body = {"model": cluster.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        timeout = aiohttp.ClientTimeout(total=120)
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.post(f"{cluster.url(i)}/v1/completions", json=body) as r,
        ):
            data = await r.json()
            assert r.status == 200, data
            text: str = data["choices"][0]["text"]
            return text

    return asyncio.run(go())


@pytest.fixture(scope="module")
def reference(tiny_llama_shards: Path) -> str:
    return greedy_texts(tiny_llama_shards, [PROMPT], MAX_TOKENS)[PROMPT]


class Capture:
    """``tcpdump -i lo`` into a file for one BPF filter; stops with SIGINT (flushes the file)."""

    def __init__(self, binary: str, path: Path, bpf: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [binary, "-i", "lo", "-U", "-s", "0", "-w", str(path), bpf],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def wait_listening(self) -> None:
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode(errors="replace")  # "listening on lo, ..."
        if "listening" not in line:
            self.proc.kill()
            pytest.skip(f"tcpdump cannot capture here: {line.strip()}")

    def stop(self) -> bytes:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.path.read_bytes()


def test_no_prompt_or_hidden_state_on_the_wire(
    cluster2: LocalCluster, tiny_llama_shards: Path, tmp_path: Path, reference: str
) -> None:
    binary = tcpdump()
    peer_ports = [cluster2.base_port + 1000 + i for i in range(2)]
    peer = Capture(binary, tmp_path / "peer.pcap", " or ".join(f"tcp port {p}" for p in peer_ports))
    http = Capture(binary, tmp_path / "http.pcap", f"tcp port {cluster2.base_port}")
    try:
        peer.wait_listening()
        http.wait_listening()
        time.sleep(0.5)
        text = complete(cluster2, 0)
        time.sleep(1.0)
    finally:
        wire, control = peer.stop(), http.stop()
    assert text == reference

    # What the first stage sent: the hidden state of the prompt's tokens after its modules.
    plan = status(cluster2, 0)["pipeline"]["plan"]["plan"]
    manifest = load_manifest(tiny_llama_shards)
    boundary = plan["stages"][0]["end"]
    assert len(plan["stages"]) == 2 and 0 < boundary < manifest.num_modules
    tok = load_tokenizer(tiny_llama_shards, manifest.tokenizer_file)
    ids = np.asarray([tok.encode(PROMPT)], dtype=np.int64)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None, :]
    hidden = ModuleRunner(tiny_llama_shards, manifest, 0, boundary).step("probe", ids, positions)
    embedding = ModuleRunner(tiny_llama_shards, manifest, 0, 1).step("probe", ids, positions)
    rows = [np.ascontiguousarray(h, dtype="<f4").tobytes() for h in (*hidden[0], *embedding[0])]

    assert PROMPT.encode() in control  # the capture and the search work: plain HTTP on loopback
    assert len(wire) > hidden.nbytes  # the peer link carried at least the hidden state's worth of bytes
    assert PROMPT.encode() not in wire
    assert json.dumps(PROMPT).encode() not in wire
    for k, row in enumerate(rows):
        for window in (row[:16], row[-16:]):
            assert window not in wire, f"row {k} of the hidden state is readable on the wire"
    assert reference.encode()[:12] not in wire or len(reference) < 4


def _probe(port: int, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send ``data`` to a peer port; return what came back before the node closed the connection."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise AssertionError("the node kept an unauthenticated connection open") from None
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        else:
            raise AssertionError("the node kept an unauthenticated connection open")
    return got


def test_unauthenticated_frames_are_dropped(cluster2: LocalCluster, reference: str) -> None:
    st = status(cluster2, 1)
    plan = st["pipeline"]["plan"]["plan"]
    step = {
        "session": "injected-session", "epoch": plan["epoch"], "seq": 1, "entry": st["id"], "pos0": 0,
        "ids": [1, 2, 3], "reset": True,
    }  # fmt: skip
    body = pack_body("pipe.step", MESSAGE, 0, step)
    frame = auth.LENGTH.pack(len(body)) + body
    hello = auth.HELLO.pack(auth.MAGIC, auth.PROTOCOL_VERSION, os.urandom(auth.NONCE_BYTES))
    port = cluster2.base_port + 1000  # node0's peer port: the first stage's node or the entry
    attempts = [
        frame,  # a well-formed frame with no handshake at all
        hello + frame,  # a hello, then a frame instead of the proof
        hello + os.urandom(32) + frame,  # a guessed proof, then a frame
        hello
        + os.urandom(32)
        + auth.LENGTH.pack(len(body) + 16)
        + body
        + os.urandom(16),  # a fake "sealed" one
    ]
    for data in attempts:
        got = _probe(port, data)
        # At most the node's own hello comes back: nothing that depends on the key.
        assert len(got) <= auth.HELLO.size, got
    for i in range(2):
        log = (cluster2.data_dir(i) / "node.log").read_text(errors="replace")
        assert "injected-session" not in log
    after = status(cluster2, 0)
    assert after["pipeline"]["serving"]
    assert after["pipeline"]["plan"]["plan"]["epoch"] == plan["epoch"]  # nothing was disturbed
    assert complete(cluster2, 1) == reference


def test_a_node_without_the_key_cannot_join(cluster2: LocalCluster, tmp_path: Path) -> None:
    """A third daemon, same network, same discovery (mDNS on loopback), another key: never a member."""
    (tmp_path / "other.key").write_text(os.urandom(32).hex() + "\n")
    (tmp_path / "other.key").chmod(0o600)
    port = free_base_port(1)
    args = [
        sys.executable, "-m", "llnode", "run", "--port", str(port), "--peer-port", str(port + 1000),
        "--data-dir", str(tmp_path / "intruder"), "--name", "intruder",
        "--cluster-key-file", str(tmp_path / "other.key"), "--shards", str(cluster2.shards.resolve()),
        "--model", cluster2.model, "--peer", f"127.0.0.1:{cluster2.base_port}",
    ]  # fmt: skip
    log = (tmp_path / "intruder.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        intruder_status: dict[str, Any] | None = None
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{port}/api/status"
        while time.monotonic() < deadline and intruder_status is None:
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=2) as r:
                intruder_status = json.loads(r.read())
            time.sleep(0.5)
        assert intruder_status is not None, (tmp_path / "intruder.log").read_text()
        time.sleep(8.0)  # several gossip rounds and redial attempts
        for i in range(2):
            names = {m["name"] for m in status(cluster2, i)["members"]}
            assert "intruder" not in names, names
        with urllib.request.urlopen(url, timeout=5) as r:
            seen = {m["name"] for m in json.loads(r.read())["members"]}
        assert seen <= {"intruder"}, seen  # and the intruder learnt no member either
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
