#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs into .venv, then lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh "export,test,fast"
echo "== ruff"; .venv/bin/ruff check llnode tests
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest -q -ra "$@"
