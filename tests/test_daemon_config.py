"""The configuration contract (CLI > env > TOML > default), node identity and the cluster key."""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llnode.config import OPTIONS, ConfigError, NodeConfig, add_config_arguments, load_config, options_table
from llnode.daemon import load_node_id
from llnode.net.keys import KeyError_, cluster_id, load_cluster_key

REPO = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return parser.parse_args(argv)


def test_precedence_cli_over_env_over_toml_over_default(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'port = 7801\nname = "from-toml"\npeer = ["10.0.0.9:7700"]\nmdns = false\nlog-level = "debug"\n'
    )
    env = {"LLNODE_NAME": "from-env", "LLNODE_PORT": "7802"}
    cfg = load_config(_parse(["--data-dir", str(tmp_path), "--port", "7803"]), env=env)
    assert (cfg.port, cfg.name, cfg.peers, cfg.mdns, cfg.log_level) == (
        7803, "from-env", ["10.0.0.9:7700"], False, "debug",
    )  # fmt: skip
    assert cfg.effective_peer_port == 8803
    cfg = load_config(
        _parse(["--data-dir", str(tmp_path)]), env={"LLNODE_PEERS": "a:1, b:2", "LLNODE_MDNS": "1"}
    )
    assert cfg.port == 7801 and cfg.peers == ["a:1", "b:2"] and cfg.mdns is True
    cfg = load_config(
        _parse(["--data-dir", str(tmp_path / "empty"), "--peer", "h:1", "--peer", "h:2"]), env={}
    )
    assert cfg.port == 7700 and cfg.peers == ["h:1", "h:2"] and cfg.name == ""
    assert NodeConfig().effective_peer_port == 8700


@pytest.mark.parametrize(
    ("argv", "env", "toml", "message"),
    [
        ([], {"LLNODE_PORT": "seventy"}, None, "option port from env"),
        ([], {}, "bogus = 1\n", "unknown option 'bogus'"),
        ([], {}, "port = [\n", "config file"),
        (["--port", "70000"], {}, None, "TCP port"),
        (["--peer", "nohostport"], {}, None, "HOST:PORT"),
        (["--host", "0.0.0.0"], {}, None, "api-token"),
        (["--suspect-after", "5", "--dead-after", "4"], {}, None, "suspect-after"),
        ([], {"LLNODE_MDNS": "maybe"}, None, "not a boolean"),
    ],
)
def test_bad_values_get_clear_errors(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml: str | None, message: str
) -> None:
    if toml is not None:
        (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(_parse(["--data-dir", str(tmp_path), *argv]), env=env)


def test_run_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llnode", "run", "--data-dir", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "api-token" in out.stderr and "Traceback" not in out.stderr


def test_node_id_persists(tmp_path: Path) -> None:
    first = load_node_id(tmp_path / "d")
    assert load_node_id(tmp_path / "d") == first and len(first) == 16
    (tmp_path / "d" / "node_id").write_text("../../etc\n")
    with pytest.raises(ConfigError, match="invalid node id"):
        load_node_id(tmp_path / "d")


def test_keygen_and_key_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    key_file = tmp_path / "k" / "cluster.key"
    run = [sys.executable, "-m", "llnode", "keygen", "--out", str(key_file)]
    assert subprocess.run(run, capture_output=True, cwd=REPO, timeout=60).returncode == 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    again = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    key, source = load_cluster_key(NodeConfig(cluster_key_file=str(key_file)))
    assert len(key) == 32 and source == str(key_file)
    assert key.hex() not in cluster_id(key) and len(cluster_id(key)) == 16
    # env key wins over the file; short keys are refused
    assert load_cluster_key(NodeConfig(cluster_key="x" * 20, cluster_key_file=str(key_file)))[0] == b"x" * 20
    with pytest.raises(KeyError_, match="too short"):
        load_cluster_key(NodeConfig(cluster_key="short"))
    with pytest.raises(KeyError_, match="does not exist"):
        load_cluster_key(NodeConfig(cluster_key_file=str(tmp_path / "missing")))
    # nothing configured: a key is created once in ~/.llnode and shared by nodes on this device
    k1, s1 = load_cluster_key(NodeConfig(data_dir=str(tmp_path / "n1")))
    k2, s2 = load_cluster_key(NodeConfig(data_dir=str(tmp_path / "n2")))
    assert k1 == k2 and s1 == s2 == str(tmp_path / "home" / ".llnode" / "cluster.key")


def test_options_table_lists_every_flag() -> None:
    table = options_table()
    for flag in ("--peer`", "--mdns-interface", "LLNODE_CLUSTER_KEY", "--api-token", "--peer-port"):
        assert flag in table
    assert all(opt.env in table for opt in OPTIONS)
