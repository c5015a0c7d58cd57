#!/usr/bin/env bash
# The main job, from a fresh clone: install into .venv, prepare SmolLM2-135M-Instruct, start a local
# 3-node cluster on loopback, ask it one question, stream the answer, and keep the cluster running
# (dashboard URLs are printed) until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh "export,fast"
.venv/bin/llnode prepare smollm2-135m
exec .venv/bin/llnode cluster --nodes "${NODES:-3}" \
    --prompt "${PROMPT:-Write a haiku about rivers.}"
