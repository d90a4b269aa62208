#!/usr/bin/env bash
# Runs the demo: a local mesh (bootstrap node + 3 workers) answering a chat prompt
# with SmolLM2-135M-Instruct. Creates .venv and installs what it needs first.
source "$(dirname "$0")/_venv.sh" demo
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$VPY" -m meshnode demo "$@"
