"""The CPU limit reader: cgroup v1 and v2 quotas from a fixture tree, and a real CPU group where root is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llnode.emulate.cgroups import CpuGroup, unavailable_reason
from llnode.net import resources


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v1_quota_of_the_cpu_controller_and_its_ancestors(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    _write(proc, "4:memory:/other\n3:cpu,cpuacct:/bench/node2\n0::/\n")
    _write(root / "cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct/bench/cpu.cfs_quota_us", "150000\n")  # the parent: 1.5 cores
    _write(root / "cpu,cpuacct/bench/cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct/bench/node2/cpu.cfs_quota_us", "30000\n")
    _write(root / "cpu,cpuacct/bench/node2/cpu.cfs_period_us", "100000\n")
    assert resources.cpu_quota(proc, root) == pytest.approx(0.3)
    # the quota changes while the process runs: the next read sees it
    _write(root / "cpu,cpuacct/bench/node2/cpu.cfs_quota_us", "-1\n")
    assert resources.cpu_quota(proc, root) == pytest.approx(1.5)  # the parent still limits it
    _write(root / "cpu,cpuacct/bench/cpu.cfs_quota_us", "-1\n")
    assert resources.cpu_quota(proc, root) is None
    assert resources.cpu_limit(proc, root) == resources.cores()


def test_cgroup_v1_mounted_as_cpu_and_a_host_path_inside_a_container(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    _write(proc, "2:cpuacct,cpu:/docker/abc123\n")  # the host's path; the container sees its group at root
    _write(root / "cpu/cpu.cfs_quota_us", "50000\n")
    _write(root / "cpu/cpu.cfs_period_us", "100000\n")
    assert resources.cpu_quota(proc, root) == pytest.approx(0.5)
    assert resources.cpu_limit(proc, root) == pytest.approx(min(0.5, resources.cores()))


def test_cgroup_v2_cpu_max(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    _write(proc, "0::/user.slice/node1\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "user.slice/node1/cpu.max", "60000 100000\n")
    assert resources.cpu_quota(proc, root) == pytest.approx(0.6)
    _write(root / "user.slice/node1/cpu.max", "max 100000\n")
    assert resources.cpu_quota(proc, root) is None
    # a limit above the cores the process may run on is capped at those cores
    _write(root / "user.slice/node1/cpu.max", "6400000 100000\n")
    assert resources.cpu_limit(proc, root) == resources.cores()


def test_unreadable_or_malformed_files_mean_unlimited(tmp_path: Path) -> None:
    assert resources.cpu_quota(tmp_path / "missing", tmp_path) is None
    proc = tmp_path / "cgroup"
    _write(proc, "garbage\n3:cpu:/g\n0::/\n")
    _write(tmp_path / "fs/cpu/g/cpu.cfs_quota_us", "lots\n")
    _write(tmp_path / "fs/cpu.max", "\n")
    assert resources.cpu_quota(proc, tmp_path / "fs") is None


_CHILD = "from llnode.net import resources as r; import sys; print(r.cpu_quota(), r.cpu_limit())"


@pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
def test_a_process_in_a_real_cpu_group_reads_its_quota_and_its_change() -> None:
    group = CpuGroup(f"llnode-test-limit-{id(object())}", 0.3)
    try:
        child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(0.5); {_CHILD}"],
                                 stdout=subprocess.PIPE, text=True)
        group.add(child.pid)
        out, _ = child.communicate(timeout=30)
        quota, limit = out.split()
        assert float(quota) == pytest.approx(0.3) and float(limit) == pytest.approx(0.3)
        group.set_quota(None)
        child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(0.5); {_CHILD}"],
                                 stdout=subprocess.PIPE, text=True)
        group.add(child.pid)
        out, _ = child.communicate(timeout=30)
        assert out.split()[0] == "None"
    finally:
        group.remove()
