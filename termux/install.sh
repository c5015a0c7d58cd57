#!/data/data/com.termux/files/usr/bin/bash
# Install llnode on an Android phone under Termux, from this checkout:
#
#   pkg install git && git clone <this repository> llnode && bash llnode/termux/install.sh
#
# What it does (safe to run again: every step checks what is already there):
#  1. Termux packages for everything pip cannot build on Android: numpy, onnxruntime (no Android wheel
#     on PyPI) and cryptography (Rust) come from `pkg`.
#  2. The other dependencies from PyPI, with their optional C extensions switched off so they build as
#     pure Python (zeroconf: SKIP_CYTHON=1; msgpack, aiohttp and aiohttp's helpers likewise); only
#     `regex` is compiled (with Termux's clang).
#     uvloop is not installed: it does not build on Termux and the daemon runs without it.
#  3. llnode itself with `pip install --no-deps`, so pip never tries to build numpy or onnxruntime.
#  4. An import check; if Termux's onnxruntime does not import, it points to `--proot` (a Debian
#     userland where the plain aarch64 wheels work).
#  5. ~/.llnode: a cluster key if there is none (and how to copy it to the other devices), a
#     config.toml with your seeds (--peer).
#  6. The runit service (termux-services) and a Termux:Boot script; offers Termux:API for battery status.
#
# Options:
#   --peer HOST:PORT   a seed: the HTTP address of a node that is usually up (repeatable; written to
#                      ~/.llnode/config.toml when that file is first created)
#   --key-file PATH    join an existing cluster: use this cluster key instead of making a new one
#   --yes              do not ask (installs Termux:API's package too)
#   --no-service       skip the runit service and the boot script
#   --proot            install into a proot-distro Debian instead (fallback for a broken onnxruntime)
#   --print-packages   print the package lists and exit (used by the test suite)
set -euo pipefail

# ---- what gets installed (tests/test_deploy_termux.py checks these against what the daemon imports) ----
# Termux packages. python-pip is separate from python in Termux. clang compiles `regex` (the
# tokenizer's Unicode character classes; it has no pure-Python form), the one C extension built here.
PKG_PACKAGES=(python python-pip python-numpy python-onnxruntime python-cryptography clang termux-services)
# PyPI packages, installed with their own (pure-Python) dependencies. Versions as in pyproject.toml;
# pulp stays below 4 because pulp 4 no longer bundles the CBC solver (and Termux's Python is >= 3.12,
# where pip would otherwise pick pulp 4).
PIP_PACKAGES=("zeroconf>=0.130" "msgpack>=1.0" "pulp>=2.8,<4" "aiohttp>=3.9" "jinja2>=3.1" "tqdm>=4.60"
    "regex>=2023.0")
# Build these from source as pure Python: no compiler on a stock Termux.
PURE_PYTHON_ENV=(SKIP_CYTHON=1 MSGPACK_PUREPYTHON=1 AIOHTTP_NO_EXTENSIONS=1 MULTIDICT_NO_EXTENSIONS=1
    YARL_NO_EXTENSIONS=1 FROZENLIST_NO_EXTENSIONS=1 PROPCACHE_NO_EXTENSIONS=1)
# The Debian fallback: proot-distro gives a glibc userland where PyPI's aarch64 wheels install as is.
PROOT_PKG_PACKAGES=(proot-distro)
PROOT_DISTRO=debian
PROOT_APT_PACKAGES=(python3 python3-venv python3-pip)
PROOT_VENV=/opt/llnode/venv

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR="$HOME/.llnode"
PEERS=()
KEY_FILE=""
ASSUME_YES=0
WITH_SERVICE=1
USE_PROOT=0

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --peer) [ $# -ge 2 ] || die "--peer needs HOST:PORT"; PEERS+=("$2"); shift 2 ;;
        --key-file) [ $# -ge 2 ] || die "--key-file needs a path"; KEY_FILE=$2; shift 2 ;;
        --yes | -y) ASSUME_YES=1; shift ;;
        --no-service) WITH_SERVICE=0; shift ;;
        --proot) USE_PROOT=1; shift ;;
        --print-packages)
            echo "pkg: ${PKG_PACKAGES[*]}"
            echo "pip: ${PIP_PACKAGES[*]}"
            echo "pip-env: ${PURE_PYTHON_ENV[*]}"
            echo "proot-pkg: ${PROOT_PKG_PACKAGES[*]}"
            echo "proot-apt: ${PROOT_APT_PACKAGES[*]}"
            exit 0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

for peer in "${PEERS[@]}"; do
    [[ $peer =~ ^(\[[0-9A-Fa-f:]+\]|[^:[:space:]]+):[0-9]+$ ]] || die "--peer wants HOST:PORT (the seed's HTTP port, e.g. 192.168.1.10:7700), got '$peer'"
done
KEY_TEXT=""
if [ -n "$KEY_FILE" ]; then
    # Read once: the file may be a pipe, e.g. --key-file <(termux-clipboard-get).
    KEY_TEXT=$(cat "$KEY_FILE") || die "cannot read --key-file $KEY_FILE"
    [[ $KEY_TEXT =~ ^[[:space:]]*[0-9a-fA-F]{32,}[[:space:]]*$ ]] \
        || die "--key-file $KEY_FILE does not hold a hex cluster key (as written by 'llnode keygen')"
    KEY_TEXT=$(printf '%s' "$KEY_TEXT" | tr -d '[:space:]')
fi
if [ -n "$KEY_TEXT" ] && [ -f "$DATA_DIR/cluster.key" ] \
    && [ "$(tr -d '[:space:]' <"$DATA_DIR/cluster.key")" != "$KEY_TEXT" ]; then
    die "$DATA_DIR/cluster.key exists and holds another key; move it away first if this phone should change clusters"
fi
if [ -z "${PREFIX:-}" ] || [ ! -x "$PREFIX/bin/pkg" ]; then
    die "this script is for Termux on Android (no \$PREFIX/bin/pkg here); on Linux use systemd/install.sh"
fi

ask() {  # ask "question": true for yes
    [ "$ASSUME_YES" = 1 ] && return 0
    [ -t 0 ] || return 1
    local reply
    read -r -p "$1 [y/N] " reply
    [[ $reply =~ ^[Yy] ]]
}

install_native() {
    say "Termux packages: ${PKG_PACKAGES[*]}"
    pkg install -y "${PKG_PACKAGES[@]}"

    say "Python packages from PyPI: ${PIP_PACKAGES[*]}"
    # Never `pip install --upgrade pip` on Termux: pip belongs to the python-pip package.
    env "${PURE_PYTHON_ENV[@]}" python -m pip install "${PIP_PACKAGES[@]}"

    say "llnode from $SRC_DIR (without dependencies: numpy/onnxruntime/cryptography come from pkg)"
    # From a clean copy: pip builds a directory in place, leaving build/ (and stale files) behind.
    local build_src
    build_src=$(mktemp -d)
    cp -r "$SRC_DIR/pyproject.toml" "$SRC_DIR/llnode" "$build_src/"
    if [ -f "$SRC_DIR/README.md" ]; then cp "$SRC_DIR/README.md" "$build_src/"; fi
    python -m pip install --no-deps "$build_src"
    rm -rf "$build_src"

    say "checking that the daemon's imports work"
    if ! python -c 'import onnxruntime' 2>/dev/null; then
        cat >&2 <<EOF
install.sh: Termux's onnxruntime does not import on this phone:
$(python -c 'import onnxruntime' 2>&1 | tail -n 3)
Use the Debian fallback instead (about 500 MB):  bash $SRC_DIR/termux/install.sh --proot
EOF
        exit 1
    fi
    python -c 'import numpy, onnxruntime, cryptography, zeroconf, msgpack, pulp, aiohttp, jinja2, tqdm, regex, llnode.daemon'
    llnode --version
}

install_proot() {
    say "proot-distro $PROOT_DISTRO fallback"
    pkg install -y termux-services "${PROOT_PKG_PACKAGES[@]}"
    if [ ! -d "$PREFIX/var/lib/proot-distro/installed-rootfs/$PROOT_DISTRO" ]; then
        proot-distro install "$PROOT_DISTRO"
    fi
    # --termux-home mounts the Termux home at /root: the checkout and ~/.llnode are shared.
    case "$SRC_DIR" in
        "$HOME"/*) ;;
        *) die "--proot needs the checkout under \$HOME (it is $SRC_DIR)" ;;
    esac
    local guest_src="/root/${SRC_DIR#"$HOME"/}"
    proot-distro login "$PROOT_DISTRO" --termux-home -- /bin/sh -ec "
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y ${PROOT_APT_PACKAGES[*]}
        [ -x $PROOT_VENV/bin/python ] || python3 -m venv $PROOT_VENV
        src=\$(mktemp -d)
        cp -r '$guest_src/pyproject.toml' '$guest_src/llnode' \$src/
        if [ -f '$guest_src/README.md' ]; then cp '$guest_src/README.md' \$src/; fi
        $PROOT_VENV/bin/pip install \$src
        rm -rf \$src
        $PROOT_VENV/bin/llnode --version"
}

llnode_cmd() {  # run the installed llnode, natively or inside the Debian userland
    if [ "$USE_PROOT" = 1 ]; then
        proot-distro login "$PROOT_DISTRO" --termux-home -- "$PROOT_VENV/bin/llnode" "$@"
    else
        llnode "$@"
    fi
}

setup_data_dir() {
    mkdir -p "$DATA_DIR"
    chmod 700 "$DATA_DIR"
    local key="$DATA_DIR/cluster.key"
    if [ -n "$KEY_TEXT" ]; then
        (umask 077 && printf '%s\n' "$KEY_TEXT" >"$key")
        say "cluster key taken from $KEY_FILE"
    elif [ -f "$key" ]; then
        say "keeping the existing cluster key $key"
    else
        # Inside proot the Termux home is /root, so the guest writes to the same file.
        if [ "$USE_PROOT" = 1 ]; then
            llnode_cmd keygen --out /root/.llnode/cluster.key
        else
            llnode_cmd keygen --out "$key"
        fi
        cat <<EOF

Every device of this cluster needs this same key file ($key). Copy it with any of:
  - to a PC:      scp ~/.llnode/cluster.key USER@PC:.llnode/cluster.key      (pkg install openssh)
                  on a systemd host it belongs in /etc/llnode/cluster.key (mode 600)
  - to a phone:   termux-clipboard-set < ~/.llnode/cluster.key   (Termux:API), then on the other phone:
                  bash termux/install.sh --key-file <(termux-clipboard-get)
  - by hand:      cat ~/.llnode/cluster.key, and on the other device:
                  umask 077; mkdir -p ~/.llnode; echo THE_KEY > ~/.llnode/cluster.key
Treat it like a password: whoever has it can join the cluster.

EOF
    fi
    local config="$DATA_DIR/config.toml"
    if [ -f "$config" ]; then
        say "keeping $config"
        [ ${#PEERS[@]} -eq 0 ] || echo "  (--peer ignored: edit peers = [...] in $config yourself)"
    else
        cp "$SRC_DIR/termux/config.example.toml" "$config"
        if [ ${#PEERS[@]} -gt 0 ]; then
            local list="" peer
            for peer in "${PEERS[@]}"; do list+="${list:+, }\"$peer\""; done
            printf '\npeers = [%s]\n' "$list" >>"$config"
        fi
        say "wrote $config${PEERS[*]:+ with seeds ${PEERS[*]}}"
    fi
}

setup_service() {
    local svdir="$PREFIX/var/service/llnode"
    say "runit service $svdir (termux-services)"
    mkdir -p "$svdir/log"
    # Only our two scripts are replaced: runit's supervise/ state and a `down` file are kept.
    install -m 755 "$SRC_DIR/termux/sv/llnode/run" "$svdir/run"
    install -m 755 "$SRC_DIR/termux/sv/llnode/log/run" "$svdir/log/run"
    if [ "$USE_PROOT" = 1 ]; then
        echo "RUNTIME=proot" >"$DATA_DIR/service.env"
    elif [ -f "$DATA_DIR/service.env" ]; then
        sed -i '/^RUNTIME=/d' "$DATA_DIR/service.env"
    fi

    say "Termux:Boot script ~/.termux/boot/start-llnode"
    mkdir -p "$HOME/.termux/boot"
    install -m 755 "$SRC_DIR/termux/boot/start-llnode" "$HOME/.termux/boot/start-llnode"

    if [ -d "${SVDIR:-}" ] && command -v sv-enable >/dev/null; then
        sv-enable llnode
        say "service enabled: sv status llnode; log: tail -f $PREFIX/var/log/sv/llnode/current"
    else
        echo "termux-services starts with the next Termux session: close and reopen Termux, then run"
        echo "  sv-enable llnode"
    fi
}

offer_termux_api() {
    if command -v termux-battery-status >/dev/null; then
        return
    fi
    echo
    echo "With Termux:API the daemon reports this phone's battery level, so the planner can give a phone"
    echo "on low battery less work. It needs the Termux:API app (from the same store as Termux) and:"
    echo "  pkg install termux-api"
    if ask "Install the termux-api package now?"; then
        pkg install -y termux-api
    fi
}

if [ "$USE_PROOT" = 1 ]; then install_proot; else install_native; fi
setup_data_dir
if [ "$WITH_SERVICE" = 1 ]; then setup_service; fi
offer_termux_api

cat <<EOF

Done. Next:
  - phones rarely hear mDNS (Termux holds no Wi-Fi multicast lock): give at least one seed,
    peers = ["HOST:7700"] in $DATA_DIR/config.toml, and gossip introduces everyone else;
  - install the Termux:Boot app and open it once, so the node starts after a reboot;
  - run in the foreground instead of the service:  llnode run
EOF
