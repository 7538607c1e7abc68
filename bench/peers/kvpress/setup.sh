#!/bin/sh
# Builds bench/peers/kvpress/.venv: requirements.txt (kvpress, the transformers it needs, the CPU torch on
# this machine's disk) under constraints.txt (every other package at the version measured with).
# Reruns are no-ops until either file changes. Runs outside `make test`: kvpress pins an older
# transformers than headwise's.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
VENV="$HERE/.venv"
STAMP="$VENV/.installed"
PYTHON=${PYTHON:-python3}
WANT=$(cat "$HERE/requirements.txt" "$HERE/constraints.txt" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "kvpress venv up to date: $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r "$HERE/requirements.txt" -c "$HERE/constraints.txt"
"$VENV/bin/python" -c "from importlib.metadata import version as v; print('kvpress', v('kvpress'), 'transformers', v('transformers'), 'torch', v('torch'))"
echo "$WANT" > "$STAMP"
