"""Spawn real ``llnode run`` daemons as subprocesses for tests (and benchmarks) on loopback.

    with LocalCluster(tmp_path) as cluster:
        a = cluster.start("a")                          # mDNS on 127.0.0.1, shared random key
        b = cluster.start("b", peers=[a], mdns=False)   # seed only
        cluster.wait_converged([a, b])
        a.status()["leader"]

Every daemon gets its own data dir and free ports; its log is ``<tmp>/<name>.log`` (printed on failure
via ``LocalCluster.logs()``). ``prefix`` runs the daemon under another command (``ip netns exec NS``).
Extra CLI flags go through ``args`` (e.g. ``["--shards", path]``) so the pipeline tests can reuse this.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError with ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a daemon still starting refuses connections
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: last error {last_exc}")


class Daemon:
    def __init__(
        self,
        cluster: LocalCluster,
        name: str,
        *,
        host: str,
        port: int,
        peer_port: int,
        data_dir: Path,
        args: list[str],
        env: dict[str, str],
        prefix: Sequence[str],
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.host = host
        self.port = port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.args = args
        self.env = env
        self.prefix = list(prefix)
        self.log_path = cluster.root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def seed(self) -> str:
        return f"{self.host}:{self.port}"

    def spawn(self) -> Daemon:
        cmd = [*self.prefix, sys.executable, "-m", "llnode", "run", *self.args]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.data_dir
        )
        log.close()
        self.stopped = False
        return self

    def get(self, path: str, timeout: float = 3.0) -> Any:
        req = urllib.request.Request(self.url + path)
        token = self.env.get("LLNODE_API_TOKEN")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = self.get("/api/status")
        return doc

    @property
    def node_id(self) -> str:
        node_id: str = self.get("/health")["id"]
        return node_id

    def wait_healthy(self, timeout: float = 20.0) -> Daemon:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return bool(self.get("/health", timeout=1.0)["ok"])

        wait_until(ok, timeout, what=f"{self.name} healthy")
        return self

    def alive_ids(self) -> set[str]:
        return {m["id"] for m in self.status()["members"] if m["alive"]}

    def kill(self) -> None:
        """SIGKILL: no goodbye, exactly like a crash or a phone dropping off."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stopped = True

    def terminate(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stopped = True
        return self.proc.returncode

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class LocalCluster:
    """A set of daemons sharing a cluster key, each in its own data dir under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        key: str | None = None,
        host: str = "127.0.0.1",
        gossip_interval: float = 0.25,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = key or secrets.token_hex(32)
        self.host = host
        self.gossip_interval = gossip_interval
        self.base_env = dict(os.environ if env is None else env)
        self.base_env["PYTHONPATH"] = str(REPO) + os.pathsep + self.base_env.get("PYTHONPATH", "")
        self.base_env.pop("LLNODE_CLUSTER_KEY_FILE", None)
        self.daemons: list[Daemon] = []

    def start(
        self,
        name: str,
        *,
        peers: Iterable[Daemon | str] = (),
        mdns: bool = True,
        key: str | None = None,
        args: Sequence[str] = (),
        host: str | None = None,
        prefix: Sequence[str] = (),
        wait: bool = True,
        data_dir: Path | None = None,
        port: int | None = None,
        peer_port: int | None = None,
    ) -> Daemon:
        host = host or self.host
        data_dir = data_dir or self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_port(host if not prefix else "127.0.0.1")
        peer_port = peer_port or free_port(host if not prefix else "127.0.0.1")
        argv = [
            "--port", str(port), "--peer-port", str(peer_port), "--data-dir", str(data_dir), "--name", name,
            "--host", host, "--peer-host", host, "--advertise-host", host,
            "--gossip-interval", str(self.gossip_interval), "--log-level", "debug",
            "--mdns" if mdns else "--no-mdns",
        ]  # fmt: skip
        for p in peers:
            argv += ["--peer", p.seed if isinstance(p, Daemon) else p]
        argv += list(args)
        env = dict(self.base_env, LLNODE_CLUSTER_KEY=key or self.key)
        daemon = Daemon(
            self, name, host=host, port=port, peer_port=peer_port, data_dir=data_dir, args=argv, env=env,
            prefix=prefix,
        )  # fmt: skip
        self.daemons.append(daemon)
        daemon.spawn()
        if wait:
            daemon.wait_healthy()
        return daemon

    def running(self) -> list[Daemon]:
        return [d for d in self.daemons if not d.stopped]

    def wait_converged(self, daemons: Sequence[Daemon], timeout: float = 20.0) -> dict[str, Any]:
        """Wait until every given daemon sees exactly the given set alive and agrees on one leader."""
        ids = {d.node_id for d in daemons}

        def agreed() -> dict[str, Any] | None:
            docs = [d.status() for d in daemons]
            leaders = {doc["leader"] for doc in docs}
            terms = {doc["term"] for doc in docs}
            for doc in docs:
                if {m["id"] for m in doc["members"] if m["alive"]} != ids:
                    return None
            if len(leaders) != 1 or None in leaders or len(terms) != 1 or leaders.pop() not in ids:
                return None
            return docs[0]

        doc: dict[str, Any] = wait_until(agreed, timeout, what=f"convergence of {[d.name for d in daemons]}")
        return doc

    def logs(self) -> str:
        return "\n".join(f"===== {d.name} =====\n{d.log()}" for d in self.daemons)

    def stop_all(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                with_stopped = d.proc
                with_stopped.send_signal(signal.SIGCONT)
                d.terminate(5.0)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
        if exc is not None:
            sys.stderr.write(self.logs())
