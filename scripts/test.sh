#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs into .venv, then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip warns about every index location this machine's configuration names but lacks: noise, not news.
quiet_pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip install -q --upgrade pip >/dev/null
quiet_pip install -q -e '.[export,test,fast]'
echo "== ruff"; .venv/bin/ruff check llnode tests
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest -q -ra "$@"
