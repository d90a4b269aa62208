#!/usr/bin/env bash
# Runs the whole test suite, creating .venv and installing what it needs first.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -k wire -x
source "$(dirname "$0")/_venv.sh" test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# The monitor page's browser test drives Debian's chromium through chromium-driver: install
# them where we can (root with apt-get); elsewhere that test skips and says why.
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        chromium chromium-driver >/dev/null || echo "test.sh: could not install chromium" >&2
fi
exec "$VPY" -m pytest -q -p no:cacheprovider "$@"
