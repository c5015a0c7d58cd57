"""The systemd units and the host installer, checked as far as a machine without systemd as PID 1 allows.

- ``systemd/install.sh --root`` stages a real install (virtualenv, units, key, env files) into a
  temporary root, and ``systemd-analyze verify --root`` checks both units there: against the real
  unit library (copied from this machine) and with the ExecStart binary the installer really created.
- ``systemd-analyze security --offline`` scores the hardening.
- The ExecStart command line, with systemd's specifiers expanded the way systemd would, really starts
  ``llnode run`` under the seccomp rules systemd 252 derives from MemoryDenyWriteExecute=,
  RestrictAddressFamilies= and SystemCallFilter= (installed here by a small launcher), answers
  /health and stops cleanly on SIGTERM; onnxruntime and CBC run under the same rules.
What cannot be checked here: the rest of the sandbox as applied by a running systemd (DynamicUser,
ProtectSystem, PrivateUsers, the mount namespace); see docs/deploy.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy_shell import REPO, ensure_tool

UNITS = ("llnode.service", "llnode@.service")
INSTANCE = "t"
LLNODE = Path(sys.executable).parent / "llnode"

# The unit's memory and system-call rules, applied the way systemd 252 applies them (seccomp filters
# installed before exec), then exec of the command. argv[1] is a JSON spec:
#   {"mdwe": true, "allow": [syscall numbers] or null, "families": [AF_*] or null, "arch": AUDIT_ARCH,
#    "nr": {mmap, mprotect, ...}}
# MemoryDenyWriteExecute=yes: refuse mmap(PROT_WRITE|PROT_EXEC), mprotect/pkey_mprotect(PROT_EXEC),
# shmat(SHM_EXEC). SystemCallFilter= with SystemCallErrorNumber=EPERM: anything outside the allow list
# fails with EPERM; SystemCallArchitectures=native: so does every call of a foreign architecture;
# RestrictAddressFamilies=: socket() of any other family fails with EAFNOSUPPORT.
SANDBOX_LAUNCHER = r"""
import ctypes, json, mmap, os, struct, sys
spec = json.loads(sys.argv[1])
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
libc = ctypes.CDLL(None, use_errno=True)

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

def install(prog):
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    if libc.prctl(22, 2, ctypes.byref(Prog(len(prog), ctypes.addressof(buf))), 0, 0) != 0:
        sys.exit("seccomp filter refused: errno %d" % ctypes.get_errno())

if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
    sys.exit("no_new_privs refused")
nr = spec["nr"]
head = [(LD, 0, 0, 4), (JEQ, 1, 0, spec["arch"]), (RET, 0, 0, EPERM), (LD, 0, 0, 0)]
if spec["mdwe"]:
    def check(mask, want):  # args[2] (low word at offset 32) & mask == want -> EPERM
        return [(LD, 0, 0, 32), (AND, 0, 0, mask), (JEQ, 0, 1, want), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    prog = head + [
        (JEQ, 4, 0, nr["mmap"]), (JEQ, 8, 0, nr["mprotect"]), (JEQ, 7, 0, nr["pkey_mprotect"]),
        (JEQ, 11, 0, nr["shmat"]), (RET, 0, 0, ALLOW),
    ] + check(6, 6) + check(4, 4) + check(0o100000, 0o100000)
    install(prog)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("write+execute mapping still allowed")
    except OSError:
        pass
if spec["families"] is not None:  # RestrictAddressFamilies=: socket(family) outside -> EAFNOSUPPORT
    prog = head + [(JEQ, 1, 0, nr["socket"]), (RET, 0, 0, ALLOW), (LD, 0, 0, 16)]
    for family in spec["families"]:
        prog += [(JEQ, 0, 1, family), (RET, 0, 0, ALLOW)]
    install(prog + [(RET, 0, 0, 0x00050000 | 97)])
if spec["allow"] is not None:
    prog = list(head)
    for n in spec["allow"]:
        prog += [(JEQ, 0, 1, n), (RET, 0, 0, ALLOW)]
    install(prog + [(RET, 0, 0, EPERM)])
os.execv(sys.argv[2], sys.argv[2:])
"""

# x86-64 and arm64 numbers of the calls MemoryDenyWriteExecute= and RestrictAddressFamilies= watch.
ARCHES = {
    "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "pkey_mprotect": 329, "shmat": 30, "socket": 41}),
    "aarch64": (
        0xC00000B7,
        {"mmap": 222, "mprotect": 226, "pkey_mprotect": 288, "shmat": 196, "socket": 198},
    ),
}
SYSCALL_HEADERS = {
    "x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
    "aarch64": "/usr/include/asm-generic/unistd.h",
}


def syscall_group(name: str, cache: dict[str, set[str]]) -> set[str]:
    """The system calls in a systemd group such as @system-service, nested groups expanded."""
    if name not in cache:
        text = subprocess.run(
            ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, timeout=60
        ).stdout
        out: set[str] = set()
        for line in text.splitlines()[1:]:
            token = line.strip()
            if not token or token.startswith("#"):
                continue
            out |= syscall_group(token, cache) if token.startswith("@") else {token}
        cache[name] = out
    return cache[name]


def unit_syscall_allow_list(unit: Path) -> list[int] | None:
    """The unit's SystemCallFilter= lines as syscall numbers of this machine (None: cannot tell)."""
    import platform

    header = Path(SYSCALL_HEADERS.get(platform.machine(), "/nonexistent"))
    if shutil.which("systemd-analyze") is None or not header.is_file():
        return None
    numbers = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"#define __NR(?:3264)?_(\w+)\s+(\d+)", header.read_text())
    }
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for _, _key, value in (a for a in parse_unit(unit) if a[1] == "SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for token in value.lstrip("~").split():
            names |= syscall_group(token, cache) if token.startswith("@") else {token}
        allowed = allowed - names if deny else allowed | names
    return sorted(numbers[n] for n in allowed if n in numbers)


def sandbox_prefix(unit: Path) -> tuple[list[str], str]:
    """argv prefix that runs a command under the unit's MemoryDenyWriteExecute= and SystemCallFilter=."""
    import json
    import platform

    if platform.machine() not in ARCHES:
        return [], "nothing (unknown architecture)"
    arch, nr = ARCHES[platform.machine()]
    allow = unit_syscall_allow_list(unit)
    family_numbers = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}
    families = [family_numbers[f] for f in unit_value(unit, "RestrictAddressFamilies").split()]
    spec = json.dumps({"mdwe": True, "allow": allow, "families": families, "arch": arch, "nr": nr})
    what = "MemoryDenyWriteExecute + RestrictAddressFamilies"
    what += f" + SystemCallFilter ({len(allow)} calls)" if allow else ""
    return [sys.executable, "-c", SANDBOX_LAUNCHER, spec], what


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat, e.g. SystemCallFilter=)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        out.append((section, key.strip(), value.strip()))
    return out


def unit_value(path: Path, key: str) -> str:
    values = [v for s, k, v in parse_unit(path) if s == "Service" and k == key]
    assert len(values) == 1, f"{path.name}: expected one {key}=, found {values}"
    return values[0]


def run_help_flags() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-m", "llnode", "run", "--help"], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0 or "--data-dir" not in result.stdout:
        pytest.skip(f"'llnode run' is not available yet: {(result.stdout + result.stderr).strip()[:300]}")
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", result.stdout))


def free_port_pair() -> int:
    """A port P with P and P + 1000 both free on loopback (HTTP and peer port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 1000 > 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1000))
        except OSError:
            continue
        return int(port)
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def staged_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real install by systemd/install.sh into a temporary root, plus this machine's unit library."""
    ensure_tool("systemd-analyze", "systemd")
    root = tmp_path_factory.mktemp("root")
    result = subprocess.run(
        ["bash", str(REPO / "systemd/install.sh"), "--root", str(root), "--no-deps",
         "--python", sys.executable, "--instance", INSTANCE, "--port", "7711"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    library = Path("/usr/lib/systemd/system")
    if not library.is_dir():
        library = Path("/lib/systemd/system")
    shutil.copytree(library, root / "usr/lib/systemd/system", symlinks=True)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=300)


def test_units_verify_in_the_staged_install(staged_root: Path) -> None:
    unit_dir = staged_root / "etc/systemd/system"
    for unit in UNITS:
        assert (unit_dir / unit).read_bytes() == (REPO / "systemd" / unit).read_bytes()
    exe = staged_root / unit_value(unit_dir / "llnode.service", "ExecStart").split()[0].lstrip("/")
    assert os.access(exe, os.X_OK), f"the installer did not create the ExecStart binary {exe}"
    result = analyze("verify", f"--root={staged_root}", "llnode.service", f"llnode@{INSTANCE}.service")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify reports unknown keys and bad values as warnings with exit status 0: none may mention us.
    assert "llnode" not in output, output


def test_verify_reports_a_broken_unit(staged_root: Path) -> None:
    """The verify harness can fail: a misspelt key and a missing binary are both reported."""
    text = (REPO / "systemd/llnode.service").read_text()
    text = text.replace("ProtectSystem=strict", "ProtectSytem=strict")
    text = text.replace("/opt/llnode/venv/bin/llnode", "/opt/llnode/venv/bin/llnode-missing")
    (staged_root / "etc/systemd/system/llnode-broken.service").write_text(text)
    try:
        result = analyze("verify", f"--root={staged_root}", "llnode-broken.service")
    finally:
        (staged_root / "etc/systemd/system/llnode-broken.service").unlink()
    output = result.stdout + result.stderr
    assert "Unknown key 'ProtectSytem'" in output, output
    assert "llnode-missing is not executable" in output, output
    assert result.returncode != 0


def test_installer_keeps_key_and_settings_on_rerun(staged_root: Path) -> None:
    conf = staged_root / "etc/llnode"
    key_before = hashlib.sha256((conf / "cluster.key").read_bytes()).hexdigest()
    env_before = (conf / f"{INSTANCE}.env").read_text()
    result = subprocess.run(
        ["bash", str(REPO / "systemd/install.sh"), "--root", str(staged_root), "--no-deps",
         "--python", sys.executable, "--instance", INSTANCE, "--port", "7799"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert hashlib.sha256((conf / "cluster.key").read_bytes()).hexdigest() == key_before
    assert (conf / f"{INSTANCE}.env").read_text() == env_before
    assert "LLNODE_PORT=7711" in env_before and "LLNODE_PEER_PORT=8711" in env_before
    for name in ("cluster.key", "llnode.env", f"{INSTANCE}.env"):
        assert (conf / name).stat().st_mode & 0o777 == 0o600, name
    assert re.fullmatch(r"[0-9a-f]{64}\n", (conf / "cluster.key").read_text())


def test_installer_rejects_bad_input(tmp_path: Path) -> None:
    script = str(REPO / "systemd/install.sh")
    cases = {
        ("--instance", "a b"): "--instance wants a short name",
        ("--port", "70000"): "--port wants a TCP port",
        ("--python", "/nonexistent/python"): "older than Python 3.11",
        ("--frobnicate",): "unknown option '--frobnicate'",
    }
    for args, message in cases.items():
        result = subprocess.run(
            ["bash", script, "--root", str(tmp_path), *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)
    assert not any(tmp_path.iterdir()), "a rejected run must not leave files behind"


@pytest.mark.parametrize("unit", UNITS)
def test_hardening_exposure_is_low(unit: str, tmp_path: Path) -> None:
    ensure_tool("systemd-analyze", "systemd")
    path = tmp_path / (unit.replace("@.", f"@{INSTANCE}.") if "@" in unit else unit)
    shutil.copy(REPO / "systemd" / unit, path)
    result = analyze("security", "--offline=yes", "--no-pager", str(path))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    exposure = float(match.group(1))
    print(f"{unit}: systemd-analyze security exposure {exposure} (0 = locked down, 10 = fully exposed)")
    assert exposure <= 2.0, result.stdout


def test_units_ask_for_the_hardening_the_docs_promise() -> None:
    required = {
        "DynamicUser": "yes", "StateDirectory": None, "Restart": "on-failure", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
        "LoadCredential": "cluster.key:/etc/llnode/cluster.key",
    }  # fmt: skip
    for unit in UNITS:
        assignments = {k: v for s, k, v in parse_unit(REPO / "systemd" / unit) if s == "Service"}
        for key, value in required.items():
            assert key in assignments, f"{unit}: {key}= missing"
            assert value is None or assignments[key] == value, f"{unit}: {key}={assignments[key]}"
        families = set(assignments["RestrictAddressFamilies"].split())
        assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}, families
        filters = [v for s, k, v in parse_unit(REPO / "systemd" / unit) if k == "SystemCallFilter"]
        assert "@system-service" in filters
        assert "${CREDENTIALS_DIRECTORY}/cluster.key" in assignments["ExecStart"]


@pytest.mark.parametrize("unit", UNITS)
def test_execstart_uses_only_flags_llnode_run_accepts(unit: str) -> None:
    accepted = run_help_flags()
    argv = shlex.split(unit_value(REPO / "systemd" / unit, "ExecStart"))
    assert argv[0] == "/opt/llnode/venv/bin/llnode" and argv[1] == "run", argv
    used = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")}
    assert used, argv
    assert used <= accepted, used - accepted


def expand(value: str, spec: dict[str, str]) -> str:
    """systemd's %-specifiers and ${VAR} references, for the ones our units use."""
    value = re.sub(r"%([A-Za-z%])", lambda m: spec[m.group(1)], value)
    return re.sub(r"\$\{(\w+)\}", lambda m: spec[m.group(1)], value)


@contextlib.contextmanager
def daemon(argv: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_instance_execstart_runs_the_daemon_in_the_units_sandbox(staged_root: Path, tmp_path: Path) -> None:
    """Start llnode@t the way systemd would (specifiers expanded, Environment= then EnvironmentFile=,
    the credential in a credentials dir), with MemoryDenyWriteExecute's effect applied by the kernel."""
    run_help_flags()  # skips while `llnode run` does not exist
    unit = REPO / "systemd/llnode@.service"
    port = free_port_pair()
    state, cache, creds = tmp_path / "state", tmp_path / "cache", tmp_path / "creds"
    spec = {
        "S": str(state), "C": str(cache), "i": INSTANCE, "H": socket.gethostname(), "%": "%",
        "CREDENTIALS_DIRECTORY": str(creds),
    }  # fmt: skip
    for key, base in (("StateDirectory", state), ("CacheDirectory", cache)):
        (base / expand(unit_value(unit, key), spec)).mkdir(parents=True)
    creds.mkdir()
    shutil.copy(staged_root / "etc/llnode/cluster.key", creds / "cluster.key")

    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    for item in shlex.split(unit_value(unit, "Environment")):
        key, _, value = item.partition("=")
        env[key] = expand(value, spec)
    env_file = staged_root / expand(unit_value(unit, "EnvironmentFile").lstrip("-"), spec).lstrip("/")
    for line in env_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    assert env["LLNODE_PORT"] == "7711" and env["LLNODE_NAME"].endswith(f"-{INSTANCE}")
    # Keep this test on loopback (a loopback peer host keeps mDNS on lo too) and on free ports.
    env.update(LLNODE_PORT=str(port), LLNODE_PEER_PORT=str(port + 1000), LLNODE_PEER_HOST="127.0.0.1",
               LLNODE_MDNS="true", LLNODE_SHARDS=str(tmp_path / "shards"))  # fmt: skip

    argv = shlex.split(expand(unit_value(unit, "ExecStart"), spec))
    argv[0] = str(LLNODE)  # the staged venv has no dependencies (--no-deps); same program, this venv's
    prefix, enforced = sandbox_prefix(unit)
    argv = [*prefix, *argv]
    cwd = Path(expand(unit_value(unit, "WorkingDirectory"), spec))
    with daemon(argv, env, cwd) as proc:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        lines: list[str] = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " serving " in line:
                break
        assert any(" serving " in line for line in lines), "".join(lines) + f"\nexit {proc.poll()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
        node_id = (cwd / "node_id").read_text().strip()
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", node_id)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        timeout_stop = float(unit_value(unit, "TimeoutStopSec").rstrip("s"))
        code = proc.wait(timeout_stop)
        rest = proc.stdout.read()
    print(f"stopped {time.monotonic() - started:.2f} s after SIGTERM; enforced: {enforced}")
    assert code == 0, "".join(lines) + rest
    assert "Traceback" not in "".join(lines) + rest
    # zeroconf (multicast sockets, interface enumeration over netlink) came up inside the sandbox too.
    assert "mDNS unavailable" not in "".join(lines) + rest, "".join(lines) + rest


def test_onnxruntime_and_the_solver_work_in_the_units_sandbox(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes is only safe if nothing on the inference path JIT-compiles, and the
    system-call filter must leave onnxruntime's thread pool and PuLP's CBC subprocess what they need:
    run a real onnxruntime session, a CBC solve, ChaCha20-Poly1305 and msgpack under both."""
    prefix, enforced = sandbox_prefix(REPO / "systemd/llnode.service")
    if not prefix:
        pytest.skip(f"cannot emulate the sandbox here: {enforced}")
    pytest.importorskip("onnx")  # builds the test graph; onnxruntime itself is a runtime dependency
    probe = tmp_path / "probe.py"
    filtered = "SystemCallFilter" in enforced
    probe.write_text(
        f"FILTERED = {filtered}\n"
        "import numpy as np, onnx, onnxruntime as ort, pulp, msgpack, os\n"
        "from onnx import helper, numpy_helper, TensorProto\n"
        "from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305\n"
        "w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)\n"
        "g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y']),\n"
        "                       helper.make_node('Softmax', ['y'], ['z'])], 'g',\n"
        "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 64])],\n"
        "    [helper.make_tensor_value_info('z', TensorProto.FLOAT, [1, 64])],\n"
        "    [numpy_helper.from_array(w, 'w')])\n"
        "m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)\n"
        "s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])\n"
        "x = np.ones((1, 64), np.float32)\n"
        "y = x @ w; ref = np.exp(y - y.max()); ref /= ref.sum()\n"
        "assert np.allclose(s.run(None, {'x': x})[0], ref, atol=1e-5)\n"
        "p = pulp.LpProblem('t', pulp.LpMinimize); v = pulp.LpVariable('v', 0, 10, cat='Integer')\n"
        "p += v; p += v >= 3.5; p.solve(pulp.PULP_CBC_CMD(msg=False)); assert pulp.value(v) == 4\n"
        "k = ChaCha20Poly1305(os.urandom(32)); n = os.urandom(12)\n"
        "assert k.decrypt(n, k.encrypt(n, b'hidden state', b''), b'') == b'hidden state'\n"
        "assert msgpack.unpackb(msgpack.packb({'a': b'x' * 100})) == {'a': b'x' * 100}\n"
        "if os.geteuid() == 0 and FILTERED:  # control: setgroups is in @privileged, refused even to root\n"
        "    try:\n"
        "        os.setgroups(os.getgroups()); raise SystemExit('setgroups was allowed')\n"
        "    except PermissionError:\n"
        "        pass\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [*prefix, sys.executable, str(probe)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(f"enforced: {enforced}")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
