#!/usr/bin/env bash
# Runs the whole test suite, creating .venv and installing what it needs first.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k wire -x
source "$(dirname "$0")/_venv.sh" test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"
