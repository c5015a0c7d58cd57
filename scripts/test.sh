#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs into .venv, then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[export,test,fast]'
echo "== ruff"; .venv/bin/ruff check llnode tests
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest -q -ra "$@"
