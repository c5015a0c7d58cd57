"""The Termux deployment, checked against the real daemon (the scripts themselves need a phone).

- The install script's package lists cover every third-party module the daemon's code imports and
  every runtime dependency in pyproject.toml; nothing Termux builds from ``pkg`` is also pip-installed,
  and no pip-installed package drags in one of them (pip would then try to compile numpy/onnxruntime).
- The runit and boot scripts call ``llnode run`` only with flags it accepts, and every ``LLNODE_*``
  name in the deploy files is one the code reads.
- The example config.toml loads through the real config loader, and the daemon starts and serves
  without uvloop (which does not build on Termux).
- The install script runs end to end on a Termux-shaped tree (only `pkg` is a recorder), twice.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy_shell import REPO
from test_deploy_systemd import free_port_pair, run_help_flags

INSTALL = REPO / "termux/install.sh"
DEPLOY_FILES = [
    *sorted(p for p in (REPO / "termux").rglob("*") if p.is_file()),
    *sorted(p for p in (REPO / "systemd").rglob("*") if p.is_file()),
    REPO / "docs/deploy.md",
]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split_requirement(text: str) -> tuple[str, str]:
    """'pulp>=2.8,<4' -> ('pulp', '<4,>=2.8'): the name and its version specifiers, sorted."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)", text)
    assert match, text
    specs = sorted(s.strip().replace(" ", "") for s in match.group(2).split(",") if s.strip())
    return normalize(match.group(1)), ",".join(specs)


def runtime_requirements() -> dict[str, str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return dict(split_requirement(r) for r in project["dependencies"])


def termux_packages() -> dict[str, list[str]]:
    result = subprocess.run(
        ["bash", str(INSTALL), "--print-packages"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, rest = line.partition(": ")
        out[key] = rest.split()
    assert out.get("pkg") and out.get("pip"), result.stdout
    return out


def pkg_provided(pkg: list[str]) -> set[str]:
    """Distributions Termux's package manager provides: `python-foo` packages provide `foo`."""
    return {normalize(p.removeprefix("python-")) for p in pkg if p.startswith("python-")}


# ---- which modules does the daemon load, and what do they import? --------------------------------------
def daemon_modules() -> set[str]:
    """llnode modules loaded by `llnode run` at import time, plus everything they import lazily
    (inside functions, e.g. the pipeline once a node starts), followed through the source."""
    code = (
        "import json, sys, llnode.daemon\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('llnode'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"the daemon does not import:\n{result.stderr}"
    todo = list(json.loads(result.stdout.strip().splitlines()[-1]))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(m for m, _ in imports_of(name) if m.split(".")[0] == "llnode")
    return seen


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside `try: ... except ImportError` (an optional dependency) or `if TYPE_CHECKING:`."""
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Try) and node in parent.body:
            for handler in parent.handlers:
                names = ast.unparse(handler.type) if handler.type else "BaseException"
                if re.search(r"\b(ImportError|ModuleNotFoundError|Exception|BaseException)\b", names):
                    return True
        if isinstance(parent, ast.If) and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        node = parent
    return False


def imports_of(module: str) -> list[tuple[str, bool]]:
    """(imported module, optional?) for every import statement in the module, at any depth."""
    path = module_file(module)
    assert path is not None
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, _guarded(node, parents)) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            optional = _guarded(node, parents)
            out.append((target, optional))
            # `from llnode.pipeline import service` imports the submodule llnode.pipeline.service
            out.extend(
                (f"{target}.{a.name}", optional) for a in node.names if module_file(f"{target}.{a.name}")
            )
    return out


def third_party_imports(modules: set[str]) -> dict[str, set[str]]:
    """Top-level third-party module -> the llnode modules that need it (optional imports left out)."""
    needed: dict[str, set[str]] = {}
    for module in modules:
        for target, optional in imports_of(module):
            top = target.split(".")[0]
            if optional or not top or top in ("llnode", "__future__") or top in sys.stdlib_module_names:
                continue
            needed.setdefault(top, set()).add(module)
    return needed


@pytest.fixture(scope="module")
def daemon_imports() -> dict[str, set[str]]:
    run_help_flags()  # skips while `llnode run` does not exist
    return third_party_imports(daemon_modules())


def test_import_scan_sees_lazy_and_optional_imports() -> None:
    """The scanner follows function-level imports and leaves out guarded (optional) ones."""
    scanned = dict(imports_of("llnode.config"))
    assert scanned.get("ifaddr") is True  # `try: import ifaddr / except ImportError` in a function
    assert scanned.get("tomllib") is False
    assert dict(imports_of("llnode.daemon")).get("uvloop") is True  # `try: import uvloop` in run()


def test_daemon_imports_are_runtime_dependencies(daemon_imports: dict[str, set[str]]) -> None:
    """Every third-party module the daemon needs is declared in pyproject's runtime dependencies;
    otherwise neither the Termux script nor `pip install llnode` would install it."""
    declared = set(runtime_requirements())
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for top, users in sorted(daemon_imports.items()):
        names = {normalize(d) for d in dists.get(top, [top])}
        if not names & declared:
            missing[top] = sorted(users)
    assert not missing, f"imported by the daemon but not in [project].dependencies: {missing}"
    # The scan found the heavy hitters, so it is looking at the right code.
    assert {"aiohttp", "cryptography"} <= set(daemon_imports)


def test_termux_script_covers_every_runtime_dependency(daemon_imports: dict[str, set[str]]) -> None:
    lists = termux_packages()
    from_pkg = pkg_provided(lists["pkg"])
    from_pip = dict(split_requirement(r) for r in lists["pip"])
    for name, specs in runtime_requirements().items():
        assert name in from_pkg or name in from_pip, f"{name}: neither `pkg install` nor pip installs it"
        if name in from_pip:
            assert from_pip[name] == specs, f"{name}: install.sh asks {from_pip[name]!r}, pyproject {specs!r}"
    assert not from_pkg & set(from_pip), "installed by both pkg and pip"
    # Known to have no Android wheel / not to build under Termux: they must come from pkg.
    assert {"numpy", "onnxruntime", "cryptography"} <= from_pkg
    assert "uvloop" not in from_pip
    assert "pulp" in from_pip and "<4" in from_pip["pulp"]  # pulp 4 dropped the bundled CBC


def test_pip_packages_do_not_pull_pkg_packages() -> None:
    """pip resolves the dependencies of what it installs: none may be numpy/onnxruntime/cryptography,
    or pip would start compiling them on the phone. Checked on the installed metadata here."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    lists = termux_packages()
    forbidden = pkg_provided(lists["pkg"])
    env = {**default_environment(), "python_version": "3.12", "extra": ""}  # Termux's Python is >= 3.12
    todo = [split_requirement(r)[0] for r in lists["pip"]]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name not in forbidden, f"a pip package depends on {name}, which comes from pkg"
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed here, cannot read its dependencies")
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(normalize(req.name))
    assert {"aiohttp", "zeroconf", "ifaddr"} <= seen


def llnode_run_flags(path: Path) -> list[set[str]]:
    """Flags of each `llnode run` command line in a shell script (backslash continuations joined)."""
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = re.search(r"llnode\"?\s+run\b(.*)", line)
        if match:
            out.append(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(1))))
    return out


@pytest.mark.parametrize("script", ["termux/sv/llnode/run", "termux/boot/start-llnode"])
def test_service_scripts_use_only_flags_llnode_run_accepts(script: str) -> None:
    accepted = run_help_flags()
    commands = llnode_run_flags(REPO / script)
    assert commands, f"no `llnode run` in {script}"
    for used in commands:
        assert "--data-dir" in used
        assert used <= accepted, used - accepted


def test_llnode_variables_in_deploy_files_are_read_by_the_code() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "llnode", "run", "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    known = set(re.findall(r"\[env\s+(LLNODE_[A-Z_]+)\]", help_text))
    if not known:
        pytest.skip("'llnode run' is not available yet")
    for path in (REPO / "llnode").rglob("*.py"):
        known |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](LLNODE_[A-Z_]+)", path.read_text()))
        known |= set(re.findall(r"env\.get\(\s*[\"'](LLNODE_[A-Z_]+)", path.read_text()))
    used: dict[str, set[str]] = {}
    for path in DEPLOY_FILES:
        for name in re.findall(r"\bLLNODE_[A-Z][A-Z_]*[A-Z]\b", path.read_text()):
            used.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    unknown = {name: sorted(files) for name, files in used.items() if name not in known}
    assert not unknown, f"variables no llnode code reads: {unknown}"
    assert {"LLNODE_PORT", "LLNODE_PEER_PORT", "LLNODE_PEERS"} <= set(used)


def test_example_config_loads_with_and_without_seeds(tmp_path: Path) -> None:
    from llnode.config import load_config

    example = REPO / "termux/config.example.toml"
    env = {"LLNODE_DATA_DIR": str(tmp_path)}
    cfg = load_config(Namespace(config=str(example)), env=env)
    assert cfg.peers == [] and cfg.mdns is True and cfg.host == "127.0.0.1"
    # What install.sh --peer appends, and the commented seed line switched on: both are valid TOML keys.
    seeded = tmp_path / "config.toml"
    seeded.write_text(example.read_text() + '\npeers = ["192.168.1.10:7700", "pc.local:7700"]\n')
    cfg = load_config(Namespace(config=str(seeded)), env=env)
    assert cfg.peers == ["192.168.1.10:7700", "pc.local:7700"]
    for line in example.read_text().splitlines():
        if re.match(r"#\s*[a-z-]+\s*=", line):  # every commented-out example setting is a real option
            single = tmp_path / "one.toml"
            single.write_text(line.lstrip("# ") + "\n")
            load_config(Namespace(config=str(single)), env={**env, "LLNODE_API_TOKEN": "t"})


def test_env_example_is_accepted_by_the_config_loader(tmp_path: Path) -> None:
    """Every commented-out variable in systemd/llnode.env.example, switched on, is a valid setting."""
    from llnode.config import load_config

    env = {"LLNODE_DATA_DIR": str(tmp_path)}
    for line in (REPO / "systemd/llnode.env.example").read_text().splitlines():
        match = re.match(r"#(LLNODE_[A-Z_]+)=(.*)", line)
        if match:
            env[match.group(1)] = match.group(2)
    assert len(env) > 10
    cfg = load_config(None, env=env)
    assert cfg.peers == ["192.168.1.20:7700", "192.168.1.21:7700"] and cfg.host == "0.0.0.0"


def test_install_script_rejects_bad_input_and_non_termux_hosts(tmp_path: Path) -> None:
    bad_key = tmp_path / "key"
    bad_key.write_text("not a key\n")
    env = {**os.environ, "PREFIX": str(tmp_path)}  # no $PREFIX/bin/pkg: not Termux
    cases = {
        ("--peer", "192.168.1.10"): "--peer wants HOST:PORT",
        ("--key-file", str(bad_key)): "does not hold a hex cluster key",
        ("--key-file", str(tmp_path / "absent")): "cannot read --key-file",
        ("--bogus",): "unknown option '--bogus'",
        (): "this script is for Termux",
    }
    for args, message in cases.items():
        result = subprocess.run(
            ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60, env=env
        )
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)


@contextlib.contextmanager
def _process(argv: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_daemon_serves_without_uvloop(tmp_path: Path) -> None:
    """uvloop does not build on Termux: with it unimportable, `llnode run` must still start and stop."""
    run_help_flags()
    port = free_port_pair()
    code = (
        "import sys; sys.modules['uvloop'] = None; from llnode.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [
        sys.executable, "-c", code, "run", "--port", str(port), "--data-dir", str(tmp_path),
        "--peer-host", "127.0.0.1", "--no-mdns", "--shards", str(tmp_path / "shards"),
    ]  # fmt: skip
    with _process(argv, tmp_path) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(" serving " in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any(" serving " in x for x in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "".join(lines) + proc.stdout.read()


@pytest.fixture(scope="module")
def fake_termux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Termux-shaped directory tree on Linux: $PREFIX with a `pkg` that only records what it was asked
    (the packages themselves cannot exist here), $HOME, and a virtualenv standing in for Termux's
    Python, which sees this environment's packages (as pkg + pip would have provided them; pip and
    setuptools too, as Termux's python-pip does)."""
    run_help_flags()
    base = tmp_path_factory.mktemp("termux")
    prefix, home = base / "usr", base / "home"
    (prefix / "bin").mkdir(parents=True)
    home.mkdir()
    pkg = prefix / "bin/pkg"
    pkg.write_text('#!/bin/sh\necho "$*" >> "$PKG_LOG"\n')
    pkg.chmod(0o755)
    venv = base / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    import sysconfig

    (site / "provided.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"prefix": prefix, "home": home, "bin": venv / "bin", "log": base / "pkg.log"}


def run_termux_install(fake: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": f"{fake['bin']}:{fake['prefix'] / 'bin'}:/usr/bin:/bin",
        "PREFIX": str(fake["prefix"]), "HOME": str(fake["home"]), "PKG_LOG": str(fake["log"]),
        "TMPDIR": str(fake["home"].parent), "LANG": "C.UTF-8",
        # Build llnode with this environment's setuptools instead of fetching one per run (a phone
        # builds in isolation; that is pip's business, not the script's).
        "PIP_NO_BUILD_ISOLATION": "0",
    }  # fmt: skip
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_termux_install_end_to_end_on_a_fake_prefix(fake_termux: dict[str, Path]) -> None:
    """The whole script but `pkg`: pip steps, build from a clean copy, import check, key, config with the
    seed, runit service, boot script; then a second run that must keep key and config."""
    build_dir_before = (REPO / "build").exists()
    first = run_termux_install(fake_termux, "--peer", "10.0.0.5:7700", "--yes")
    assert first.returncode == 0, first.stdout + first.stderr
    asked = fake_termux["log"].read_text().splitlines()
    assert asked[0] == "install -y " + " ".join(termux_packages()["pkg"])
    assert "install -y termux-api" in asked  # --yes accepts the Termux:API offer
    data = fake_termux["home"] / ".llnode"
    key = data / "cluster.key"
    assert re.fullmatch(r"[0-9a-f]{64}\n", key.read_text()) and key.stat().st_mode & 0o777 == 0o600
    from llnode.config import load_config

    cfg = load_config(Namespace(config=None), env={"LLNODE_DATA_DIR": str(data)})
    assert cfg.peers == ["10.0.0.5:7700"]
    prefix = fake_termux["prefix"]
    installed = {
        prefix / "var/service/llnode/run": REPO / "termux/sv/llnode/run",
        prefix / "var/service/llnode/log/run": REPO / "termux/sv/llnode/log/run",
        fake_termux["home"] / ".termux/boot/start-llnode": REPO / "termux/boot/start-llnode",
    }
    for target, source in installed.items():
        assert target.read_bytes() == source.read_bytes() and os.access(target, os.X_OK), target
    assert "sv-enable llnode" in first.stdout  # no runsvdir here: it says how to enable it later
    assert (REPO / "build").exists() == build_dir_before, "the install built inside the checkout"

    key_text, config_text = key.read_text(), (data / "config.toml").read_text()
    other = fake_termux["home"].parent / "other.key"
    other.write_text("ab" * 32 + "\n")
    refused = run_termux_install(fake_termux, "--key-file", str(other))
    assert refused.returncode != 0 and "holds another key" in refused.stderr
    assert "==>" not in refused.stdout, "a conflicting key must be refused before installing anything"

    same = fake_termux["home"].parent / "same.key"
    same.write_text(key_text)
    again = run_termux_install(fake_termux, "--peer", "10.9.9.9:7700", "--key-file", str(same))
    assert again.returncode == 0, again.stdout + again.stderr
    assert key.read_text() == key_text and (data / "config.toml").read_text() == config_text
    assert "--peer ignored" in again.stdout
