"""Every shell script of the project passes shellcheck.

The Termux and systemd scripts cannot run on this Linux machine (no Android, no systemd as PID 1), so
static analysis is the check they all get; shellcheck finds the quoting, word-splitting and `set -e`
mistakes that would otherwise only show up on a user's phone. Also holds ``ensure_tool``, shared with
the other deploy tests: a missing tool is installed from Debian's packages when running as root (CI),
and the test is skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "shards", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}


def ensure_tool(tool: str, apt_package: str) -> str:
    """Path of ``tool``; installs ``apt_package`` first if it is missing and we may (root + apt-get)."""
    found = shutil.which(tool)
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{tool} is not installed, and installing {apt_package} needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", apt_package]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"apt-get install {apt_package} gave no {tool}:\n{result.stdout}\n{result.stderr}")
    return found


def is_shell_script(path: Path) -> bool:
    if path.suffix == ".sh":
        return True
    try:
        with path.open("rb") as fh:
            first = fh.readline(200)
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return False
    interpreter = first[2:].strip().split()
    if not interpreter:
        return False
    name = os.path.basename(interpreter[-1] if interpreter[0].endswith(b"/env") else interpreter[0])
    return name in (b"sh", b"bash", b"dash")


def shell_scripts() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and is_shell_script(path):
                out.append(path)
    return sorted(out)


def test_deploy_scripts_are_found() -> None:
    """The discovery itself must see the deploy scripts, or the shellcheck test below proves nothing."""
    found = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    expected = {
        "termux/install.sh",
        "termux/sv/llnode/run",
        "termux/sv/llnode/log/run",
        "termux/boot/start-llnode",
        "systemd/install.sh",
    }
    assert expected <= found, expected - found


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_clean(script: Path) -> None:
    shellcheck = ensure_tool("shellcheck", "shellcheck")
    result = subprocess.run(
        [shellcheck, "--external-sources", str(script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_real_mistake(tmp_path: Path) -> None:
    """A script with an unquoted variable must fail: the check above can fail."""
    shellcheck = ensure_tool("shellcheck", "shellcheck")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\nrm -rf $HOME/$1\n")
    result = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "SC2086" in result.stdout
