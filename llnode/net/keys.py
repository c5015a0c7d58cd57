"""The cluster key: the one shared secret that decides who belongs to a cluster.

``llnode keygen`` writes 32 random bytes as hex. Every peer link proves knowledge of the key (HMAC
challenge-response) and derives its per-connection encryption keys from it; mDNS adverts carry only a
*cluster id*, a one-way hash of the key, so nodes of other clusters can be ignored without revealing it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import sys
from pathlib import Path

from llnode.config import NodeConfig

log = logging.getLogger(__name__)

KEY_BYTES = 32
MIN_KEY_BYTES = 16


class KeyError_(ValueError):
    """A missing, unreadable or too weak cluster key."""


def generate_key() -> str:
    return secrets.token_hex(KEY_BYTES)


def parse_key(text: str, source: str) -> bytes:
    """Hex keys (as written by keygen) decode to bytes; any other string is used as-is (>= 16 bytes)."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = text.encode()
    if len(raw) < MIN_KEY_BYTES:
        raise KeyError_(
            f"cluster key from {source} is too short ({len(raw)} bytes, need >= {MIN_KEY_BYTES}); "
            "make one with 'llnode keygen'"
        )
    return raw


def cluster_id(key: bytes) -> str:
    """A public name for the cluster: HMAC of a constant, so it reveals nothing about the key."""
    return hmac.new(key, b"llnode cluster id v1", hashlib.sha256).hexdigest()[:16]


def default_shared_key_path() -> Path:
    return Path(os.path.expanduser("~/.llnode")) / "cluster.key"


def write_key(path: Path, key_hex: str, *, exclusive: bool) -> bool:
    """Write a key file readable by the owner only. With ``exclusive``, never replace an existing key
    (two nodes starting at once on one device must end up with the same key): returns False if it existed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key_hex + "\n")
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
            return True
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def load_cluster_key(cfg: NodeConfig, *, create: bool = True) -> tuple[bytes, str]:
    """Find this node's cluster key; returns (key, where it came from).

    Order: ``cluster_key`` (LLNODE_CLUSTER_KEY) > ``--cluster-key-file`` > ``<data-dir>/cluster.key`` >
    ``~/.llnode/cluster.key``. If none exists, a new key is created at ``~/.llnode/cluster.key``: nodes
    on one device share it automatically, and other devices join only once the file is copied to them.
    """
    if cfg.cluster_key:
        return parse_key(cfg.cluster_key, "LLNODE_CLUSTER_KEY/--cluster-key"), "cluster_key option"
    if cfg.cluster_key_file:
        path = Path(os.path.expanduser(cfg.cluster_key_file))
        return _read_key_file(path), str(path)
    for path in (cfg.data_path / "cluster.key", default_shared_key_path()):
        if path.is_file():
            return _read_key_file(path), str(path)
    if not create:
        raise KeyError_("no cluster key: run 'llnode keygen' or set LLNODE_CLUSTER_KEY")
    path = default_shared_key_path()
    if write_key(path, generate_key(), exclusive=True):
        log.warning("no cluster key found: created %s; copy it to the other devices of this cluster", path)
    return _read_key_file(path), str(path)


def _read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KeyError_(
            f"cluster key file {path} does not exist; create one with 'llnode keygen --out {path}'"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyError_(f"cannot read cluster key file {path}: {exc}") from None
    return parse_key(text, str(path))


# ---- `llnode keygen` ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="file to write (default: print the key)")
    parser.add_argument("--force", action="store_true", help="replace an existing key file")


def run(args: argparse.Namespace) -> int:
    key = generate_key()
    if args.out is None:
        print(key)
        return 0
    path = Path(os.path.expanduser(args.out))
    if path.exists() and not args.force:
        print(f"llnode keygen: {path} exists (use --force to replace it)", file=sys.stderr)
        return 1
    write_key(path, key, exclusive=False)
    print(
        f"wrote a new cluster key to {path} (cluster id {cluster_id(bytes.fromhex(key))}); "
        "copy it to every device of the cluster"
    )
    return 0
