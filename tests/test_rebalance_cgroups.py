"""cgroup v1 CPU quotas: the emulation of slow devices really throttles a process, and cleans up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llnode.emulate.cgroups import CgroupError, CpuGroup, unavailable_reason

REASON = unavailable_reason()
needs_cgroups = pytest.mark.skipif(REASON is not None, reason=f"cgroup v1 CPU quotas unavailable: {REASON}")
BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.5:\n    pass\n"


@needs_cgroups
def test_quota_throttles_a_member_and_changes_at_run_time() -> None:
    group = CpuGroup(f"llnode-test-{os.getpid()}", 0.1)
    try:
        assert (group.path / "cpu.cfs_quota_us").read_text().strip() == "10000"
        proc = subprocess.Popen([sys.executable, "-c", BUSY])
        group.add(proc.pid)
        assert proc.pid in group.pids()
        proc.wait(timeout=60)
        assert group.throttled_s() > 0  # the kernel did hold it back
        group.set_quota(0.5)
        assert (group.path / "cpu.cfs_quota_us").read_text().strip() == "50000"
        group.set_quota(None)
        assert (group.path / "cpu.cfs_quota_us").read_text().strip() == "-1"
    finally:
        group.remove()
    assert not group.path.exists()


@needs_cgroups
def test_bad_quota_and_name_are_refused() -> None:
    with pytest.raises(CgroupError, match="name"):
        CpuGroup("../escape")
    group = CpuGroup(f"llnode-test-bad-{os.getpid()}")
    try:
        with pytest.raises(CgroupError, match="quota"):
            group.set_quota(0.0)
        with pytest.raises(CgroupError, match="pid"):
            group.add(2**22 + 12345)  # no such process
    finally:
        group.remove()


def test_unavailable_reason_names_the_problem(tmp_path: Path) -> None:
    assert "no cgroup v1 cpu controller" in (unavailable_reason(tmp_path) or "")
