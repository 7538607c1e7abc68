#!/bin/sh
# TransformerLens peer venv (make peers-tl). Idempotent: a stamp holding the requirements' hash
# skips the install when nothing changed.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
VENV="$HERE/.venv"
REQ="$HERE/requirements.txt"
STAMP="$VENV/.installed"
PYTHON=${PYTHON:-python3}
WANT=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "transformerlens peer venv up to date: $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch==2.13.0 resolves to the CPU wheel on this machine's disk; unpinned it pulls a CUDA build.
"$VENV/bin/pip" install -q -r "$REQ"
echo "$WANT" > "$STAMP"
echo "transformerlens peer venv ready: $VENV"
