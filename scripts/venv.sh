# shellcheck shell=bash
# Sourced by quickstart.sh and test.sh: one way to make .venv and install llnode with the given extras.
# usage: . scripts/venv.sh EXTRAS   (run from the repository root)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip warns about every index location this machine's configuration names but lacks: noise, not news.
quiet_pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip install -q --upgrade pip >/dev/null
quiet_pip install -q -e ".[$1]"
