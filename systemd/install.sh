#!/usr/bin/env bash
# Install llnode as a systemd service on a Linux host, from this checkout:
#
#   sudo bash systemd/install.sh --enable                      # one node: llnode.service
#   sudo bash systemd/install.sh --instance a --port 7701 --enable   # one more: llnode@a.service
#
# Safe to run again (it upgrades llnode and keeps your key and settings):
#  - a virtualenv under /opt/llnode/venv with llnode and its dependencies from PyPI;
#  - llnode.service and llnode@.service in /etc/systemd/system;
#  - /etc/llnode/cluster.key (root only, handed to the daemon as a systemd credential), made with
#    `llnode keygen` unless it exists or --key-file gives the cluster's key;
#  - /etc/llnode/llnode.env (LLNODE_* settings, all commented out), and /etc/llnode/NAME.env with
#    the ports of each --instance.
#
# Options:
#   --enable           systemctl enable --now the unit (llnode, or llnode@NAME with --instance)
#   --instance NAME    set up llnode@NAME: writes /etc/llnode/NAME.env unless it exists
#   --port N           HTTP port of that instance (peer port: N + 1000); default 7701
#   --key-file PATH    use this cluster key (from another device of the cluster)
#   --python PY        the interpreter for the virtualenv (>= 3.11; default python3)
#   --source SPEC      what pip installs as llnode (default: this checkout)
#   --no-deps          install llnode without its dependencies (they must already be importable)
#   --root DIR         install under DIR instead of / and skip systemctl (tests, inspection; a
#                      virtualenv is not relocatable, so this is not a packaging tool)
set -euo pipefail

PREFIX=/opt/llnode
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/llnode
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

ROOT=""
PYTHON=python3
SOURCE=$SRC_DIR
NO_DEPS=0
ENABLE=0
INSTANCE=""
PORT=7701
KEY_FILE=""

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
need_arg() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --enable) ENABLE=1; shift ;;
        --instance) need_arg "$1" $#; INSTANCE=$2; shift 2 ;;
        --port) need_arg "$1" $#; PORT=$2; shift 2 ;;
        --key-file) need_arg "$1" $#; KEY_FILE=$2; shift 2 ;;
        --python) need_arg "$1" $#; PYTHON=$2; shift 2 ;;
        --source) need_arg "$1" $#; SOURCE=$2; shift 2 ;;
        --no-deps) NO_DEPS=1; shift ;;
        --root) need_arg "$1" $#; ROOT=$(realpath -m "$2"); shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

if [ -n "$INSTANCE" ] && ! [[ $INSTANCE =~ ^[A-Za-z0-9_.-]{1,32}$ ]]; then
    die "--instance wants a short name of letters, digits, '_', '.' or '-', got '$INSTANCE'"
fi
if ! [[ $PORT =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 64535 ]; then
    die "--port wants a TCP port from 1 to 64535 (its peer port is PORT + 1000), got '$PORT'"
fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or use --root DIR to install somewhere else"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is missing or older than Python 3.11 (use --python)"

VENV="$ROOT$PREFIX/venv"
say "virtualenv $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_args=(--quiet --disable-pip-version-check)
[ "$NO_DEPS" = 1 ] && pip_args+=(--no-deps)
say "llnode from $SOURCE"
if [ -f "$SOURCE/pyproject.toml" ]; then
    # Build from a clean copy: pip builds a directory in place, and a stale build/ in the checkout
    # would otherwise leak deleted modules into the installed package.
    build_src=$(mktemp -d)
    trap 'rm -rf "$build_src"' EXIT
    cp -r "$SOURCE/pyproject.toml" "$SOURCE/llnode" "$build_src/"
    if [ -f "$SOURCE/README.md" ]; then cp "$SOURCE/README.md" "$build_src/"; fi
    SOURCE=$build_src
fi
"$VENV/bin/python" -m pip install "${pip_args[@]}" --upgrade "$SOURCE"
"$VENV/bin/llnode" --version

say "units in $ROOT$UNIT_DIR"
install -d -m 755 "$ROOT$UNIT_DIR"
install -m 644 "$SRC_DIR/systemd/llnode.service" "$SRC_DIR/systemd/llnode@.service" "$ROOT$UNIT_DIR/"

install -d -m 755 "$ROOT$CONF_DIR"
key="$ROOT$CONF_DIR/cluster.key"
if [ -n "$KEY_FILE" ]; then
    key_text=$(tr -d '[:space:]' <"$KEY_FILE") || die "cannot read --key-file $KEY_FILE"
    [[ $key_text =~ ^[0-9a-fA-F]{32,}$ ]] || die "--key-file $KEY_FILE does not hold a hex cluster key"
    if [ -f "$key" ] && [ "$(tr -d '[:space:]' <"$key")" != "$key_text" ]; then
        die "$key exists and holds another key; remove it first if this host should change clusters"
    fi
    (umask 077 && printf '%s\n' "$key_text" >"$key")
    say "cluster key taken from $KEY_FILE"
elif [ -f "$key" ]; then
    say "keeping the cluster key $key"
else
    (umask 077 && "$VENV/bin/llnode" keygen --out "$key")
    echo "Copy $CONF_DIR/cluster.key to every other device of the cluster:"
    echo "  hosts: /etc/llnode/cluster.key (mode 600); phones and desktops: ~/.llnode/cluster.key"
fi
chmod 600 "$key"

env_file="$ROOT$CONF_DIR/llnode.env"
if [ ! -f "$env_file" ]; then
    install -m 600 "$SRC_DIR/systemd/llnode.env.example" "$env_file"
    say "wrote $env_file (settings for llnode.service, all commented out)"
fi
unit=llnode.service
if [ -n "$INSTANCE" ]; then
    unit="llnode@$INSTANCE.service"
    inst_env="$ROOT$CONF_DIR/$INSTANCE.env"
    if [ -f "$inst_env" ]; then
        say "keeping $inst_env"
    else
        (umask 077 && cat >"$inst_env" <<EOF
# Settings of llnode@$INSTANCE.service (any LLNODE_* variable; see $CONF_DIR/llnode.env for the list).
# Every instance on this host needs its own ports.
LLNODE_PORT=$PORT
LLNODE_PEER_PORT=$((PORT + 1000))
EOF
        )
        say "wrote $inst_env (HTTP port $PORT, peer port $((PORT + 1000)))"
    fi
fi

if [ -n "$ROOT" ]; then
    say "staged under $ROOT; systemctl skipped"
    exit 0
fi
if [ ! -d /run/systemd/system ]; then
    echo "systemd is not running here: start the daemon yourself with $PREFIX/venv/bin/llnode run"
    exit 0
fi
systemctl daemon-reload
if [ "$ENABLE" = 1 ]; then
    if systemctl is-active --quiet "$unit"; then
        systemctl restart "$unit"  # an upgrade: load the new code
    fi
    systemctl enable --now "$unit"
    systemctl --no-pager status "$unit" || true
else
    echo "start it with: systemctl enable --now $unit"
fi
echo "logs: journalctl -u $unit -f"
