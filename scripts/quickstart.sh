#!/usr/bin/env bash
# The main job, from a fresh clone: install into .venv, prepare SmolLM2-135M-Instruct, start a local
# 3-node cluster on loopback, ask it one question, stream the answer, and keep the cluster running
# (dashboard URLs are printed) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip warns about every index location this machine's configuration names but lacks: noise, not news.
quiet_pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip install -q --upgrade pip >/dev/null
quiet_pip install -q -e '.[export,fast]'
.venv/bin/llnode prepare smollm2-135m
exec .venv/bin/llnode cluster --nodes "${NODES:-3}" \
    --prompt "${PROMPT:-Write a haiku about rivers.}"
