"""The node configuration contract: one ``NodeConfig`` used by every part of llnode.

Every option has a default, a CLI flag, an environment variable ``LLNODE_<UPPER_SNAKE>`` and a TOML key
(from ``--config PATH``, or ``<data-dir>/config.toml`` when present). Precedence: CLI > env > TOML >
default. The option table below is the single source of truth: flags, env names, TOML keys and the
documentation in ``docs/daemon.md`` all follow from it, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_PORT = 7700
PEER_PORT_OFFSET = 1000


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the option and the source."""


@dataclass
class NodeConfig:
    """Everything a node needs to know about itself. Build with ``load_config`` or directly in code/tests."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    peer_host: str = "0.0.0.0"
    peer_port: int = 0  # 0: HTTP port + 1000
    advertise_host: str = ""  # "": auto-detected primary IPv4 (127.0.0.1 when everything is loopback)
    data_dir: str = "~/.llnode"
    name: str = ""  # "": hostname
    peers: list[str] = field(default_factory=list)  # seeds, HOST:HTTP_PORT
    cluster_key_file: str = ""  # "": <data-dir>/cluster.key if present, else ~/.llnode/cluster.key
    cluster_key: str = ""  # the key itself (normally from LLNODE_CLUSTER_KEY); overrides the file
    mdns: bool = True
    mdns_interfaces: list[str] = field(default_factory=list)  # []: automatic
    shards: str = ""  # "": ./shards if present, else <data-dir>/shards
    model: str = "smollm2-135m"
    api_token: str = ""
    log_level: str = "info"
    gossip_interval: float = 0.5
    suspect_after: float = 2.0
    dead_after: float = 3.5
    memory_limit: int = 0  # bytes this node may use for the model; 0: whatever the OS reports available

    # ---- derived values -------------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    @property
    def effective_peer_port(self) -> int:
        return self.peer_port or self.port + PEER_PORT_OFFSET

    @property
    def effective_name(self) -> str:
        return self.name or socket.gethostname()

    @property
    def shards_path(self) -> Path:
        if self.shards:
            return Path(os.path.expanduser(self.shards))
        local = Path("shards")
        return local if local.is_dir() else self.data_path / "shards"

    @property
    def loopback_only(self) -> bool:
        """True when the peer link listens on loopback only: then discovery stays on loopback too."""
        return is_loopback(self.peer_host)

    def effective_advertise_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.loopback_only:
            return "127.0.0.1"
        if self.peer_host not in ("0.0.0.0", ""):
            return self.peer_host
        return primary_ipv4()

    def validate(self) -> None:
        """Reject values that cannot work, with a message that says which option and why."""
        for name in ("port", "peer_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535 or (name == "port" and value == 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a TCP port (1-65535), got {value}")
        if self.effective_peer_port > 65535:
            raise ConfigError(f"peer port {self.effective_peer_port} is out of range; set --peer-port")
        if not is_loopback(self.host) and not self.api_token:
            raise ConfigError(
                f"--host {self.host} exposes the HTTP API beyond this device: set --api-token "
                "(or LLNODE_API_TOKEN) so that only clients with the token get in"
            )
        for seed in self.peers:
            parse_host_port(seed)
        if not 0 < self.gossip_interval <= 10:
            raise ConfigError("--gossip-interval must be in (0, 10] seconds")
        if not 0 < self.suspect_after < self.dead_after:
            raise ConfigError("--suspect-after must be positive and smaller than --dead-after")
        if self.memory_limit < 0:
            raise ConfigError("--memory-limit must be a number of bytes >= 0 (0: no limit)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level must be debug, info, warning or error, got {self.log_level!r}")


@dataclass(frozen=True)
class Option:
    """One configuration option: how it is spelled on the command line, in the env and in TOML."""

    name: str
    help: str
    kind: str = "str"  # str | int | float | bool | list

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "LLNODE_" + self.name.upper()

    @property
    def toml_key(self) -> str:
        return self.name.replace("_", "-")


OPTIONS: list[Option] = [
    Option("host", "HTTP API/dashboard bind address (non-loopback requires --api-token)"),
    Option("port", "HTTP port", "int"),
    Option("peer_host", "peer-link bind address"),
    Option("peer_port", "peer-link port (default: HTTP port + 1000)", "int"),
    Option("advertise_host", "address peers should dial (default: primary IPv4, or 127.0.0.1)"),
    Option("data_dir", "data directory: node_id, config.toml, default cluster key"),
    Option("name", "human-readable node name (default: hostname)"),
    Option("peers", "seed node as HOST:HTTP_PORT (repeatable; env: comma separated)", "list"),
    Option(
        "cluster_key_file", "cluster key file (default <data-dir>/cluster.key, else ~/.llnode/cluster.key)"
    ),
    Option("cluster_key", "cluster key itself (prefer the file; env LLNODE_CLUSTER_KEY)"),
    Option("mdns", "announce and browse with mDNS (--no-mdns to rely on seeds only)", "bool"),
    Option("mdns_interfaces", "IPv4 address of an interface for mDNS (repeatable)", "list"),
    Option("shards", "shard sets root (default ./shards, else <data-dir>/shards)"),
    Option("model", "model (shard set) name to serve"),
    Option("api_token", "bearer token for the HTTP API"),
    Option("log_level", "debug, info, warning or error"),
    Option("gossip_interval", "seconds between gossip rounds", "float"),
    Option("suspect_after", "seconds without a heartbeat before a peer is suspected", "float"),
    Option("dead_after", "seconds without a heartbeat before a peer is declared dead", "float"),
    Option(
        "memory_limit",
        "bytes of memory this node offers the planner (0: what the OS reports available); for a shared "
        "device, or to simulate a small one",
        "int",
    ),
]

# CLI spellings that differ from the option name.
_FLAG_ALIASES = {"peers": "--peer", "mdns_interfaces": "--mdns-interface"}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every option as a flag. Defaults are None so ``load_config`` can tell "not given" apart."""
    parser.add_argument("--config", default=None, help="TOML config file (default <data-dir>/config.toml)")
    for opt in OPTIONS:
        flag = _FLAG_ALIASES.get(opt.name, opt.flag)
        dest = opt.name
        help_text = f"{opt.help} [env {opt.env}]"
        if opt.kind == "bool":
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif opt.kind == "list":
            parser.add_argument(
                flag, dest=dest, action="append", default=None, metavar="VALUE", help=help_text
            )
        else:
            conv: Callable[[str], Any] = {"int": int, "float": float}.get(opt.kind, str)
            parser.add_argument(flag, dest=dest, type=conv, default=None, help=help_text)


# The words an on/off setting accepts (options, and the tuning knobs read from the environment).
ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")


def _convert(opt: Option, value: Any, source: str) -> Any:
    try:
        if opt.kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ON_WORDS:
                return True
            if text in OFF_WORDS:
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if opt.kind == "list":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            raise ValueError(f"not a list of strings: {value!r}")
        if opt.kind == "int":
            if isinstance(value, bool):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if opt.kind == "float":
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if not isinstance(value, str | int | float):
            raise ValueError(f"not a string: {value!r}")
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"option {opt.name} from {source}: {exc}") from None


def load_config(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Merge defaults < TOML < env < CLI into a validated ``NodeConfig``."""
    env = os.environ if env is None else env
    cli: dict[str, Any] = {}
    if args is not None:
        for opt in OPTIONS:
            value = getattr(args, opt.name, None)
            if value is not None:
                cli[opt.name] = value
    env_values = {opt.name: env[opt.env] for opt in OPTIONS if opt.env in env}

    # The TOML file location may itself come from the CLI, env or the data dir.
    config_path = getattr(args, "config", None) if args is not None else None
    config_path = config_path or env.get("LLNODE_CONFIG")
    data_dir = cli.get("data_dir") or env_values.get("data_dir") or NodeConfig.data_dir
    toml_values: dict[str, Any] = {}
    path = (
        Path(os.path.expanduser(config_path))
        if config_path
        else Path(os.path.expanduser(data_dir)) / "config.toml"
    )
    if config_path or path.is_file():
        toml_values = _read_toml(path)

    merged: dict[str, Any] = {}
    by_name = {opt.name: opt for opt in OPTIONS}
    for source, values in (("TOML " + str(path), toml_values), ("env", env_values), ("command line", cli)):
        for key, value in values.items():
            merged[key] = _convert(by_name[key], value, source)
    known = {f.name for f in fields(NodeConfig)}
    cfg = NodeConfig(**{k: v for k, v in merged.items() if k in known})
    cfg.validate()
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    by_key = {opt.toml_key: opt.name for opt in OPTIONS}
    by_key.update({opt.name: opt.name for opt in OPTIONS})
    by_key.update({"peer": "peers", "mdns-interface": "mdns_interfaces"})
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in by_key:
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        out[by_key[key]] = value
    return out


# ---- small network helpers shared by the daemon parts ---------------------------------------------------
def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (or ``[v6]:PORT``); a clear error instead of a traceback."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"expected HOST:PORT, got {text!r}")
        host, port_text = text.strip(), str(default_port)
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"expected HOST:PORT, got {text!r}") from None
    if not host or not 0 < port <= 65535:
        raise ConfigError(f"expected HOST:PORT with a port in 1-65535, got {text!r}")
    return host, port


def primary_ipv4() -> str:
    """The address this device uses for outbound traffic (no packet is sent), or 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            addr: str = s.getsockname()[0]
            return addr
    except OSError:  # no route out (an isolated LAN, a namespace): take the first real interface
        others = ipv4_interfaces()
        return others[0] if others else "127.0.0.1"


def ipv4_interfaces(include_loopback: bool = False) -> list[str]:
    """IPv4 addresses of this device's interfaces (mDNS must bind real ones: 0.0.0.0 gives ENODEV)."""
    try:
        import ifaddr
    except ImportError:  # pragma: no cover - ifaddr comes with zeroconf
        return [primary_ipv4()]
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and (include_loopback or not is_loopback(ip.ip)):
                out.append(ip.ip)
    return out


def options_table(options: Sequence[Option] = OPTIONS) -> str:
    """A Markdown table of every option, for the docs."""
    defaults = NodeConfig()
    rows = ["| flag | env | TOML key | default | meaning |", "|---|---|---|---|---|"]
    for opt in options:
        flag = _FLAG_ALIASES.get(opt.name, opt.flag)
        rows.append(
            f"| `{flag}` | `{opt.env}` | `{opt.toml_key}` | `{getattr(defaults, opt.name)!r}` | {opt.help} |"
        )
    return "\n".join(rows)
