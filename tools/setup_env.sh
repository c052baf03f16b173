#!/usr/bin/env bash
# Creates .venv and installs the pinned environment (requirements.txt). Idempotent and fast when
# nothing changed: a stamp file records the requirements it was built from.
# mmcv 2.1.0 (what mmdet 3.3.0 accepts) has no wheel for Python 3.11, so it is compiled once per
# machine with its ops and the wheel kept in a cache keyed by the torch version it was built against.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.instseg-requirements"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && cmp -s requirements.txt "$STAMP" \
   && [ "$(cat "$VENV/.instseg-src" 2>/dev/null)" = "$PWD" ]; then
  exit 0
fi
pin() { grep -E "^$1==" requirements.txt | head -n1; }
MMCV_VERSION=$(pin mmcv | cut -d= -f3)
TORCH_PIN=$(pin torch)
WHEEL_CACHE=${INSTSEG_WHEEL_CACHE:-$HOME/.cache/instseg/wheels}/${TORCH_PIN/==/-}
start=$(date +%s)
echo "[setup] installing the pinned requirements into $VENV (first time, or after requirements.txt changed)"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! compgen -G "$WHEEL_CACHE/mmcv-$MMCV_VERSION-*.whl" >/dev/null; then
  # mmcv's setup.py imports pkg_resources (gone from setuptools>=70) while torch asks for
  # setuptools>=77, so the build gets a throw-away venv of its own and the project venv stays consistent.
  echo "[setup] compiling mmcv $MMCV_VERSION with ops (once per machine, 10-20 min on 2 cores)"
  BUILD_VENV=$(mktemp -d)/build-venv
  "$PYTHON" -m venv "$BUILD_VENV"
  BPIP=("$BUILD_VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${BPIP[@]}" install wheel ninja "$TORCH_PIN" "$(pin numpy)"
  "${BPIP[@]}" install "setuptools<70" 2>&1 | grep -v "dependency conflicts\|requires setuptools" || true
  mkdir -p "$WHEEL_CACHE"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "${BPIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_CACHE" "mmcv==$MMCV_VERSION"
  rm -rf "$(dirname "$BUILD_VENV")"
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"${PIP[@]}" install "$WHEEL_CACHE"/mmcv-$MMCV_VERSION-*.whl -r requirements.txt
"${PIP[@]}" install --no-deps --no-build-isolation -e .
cp requirements.txt "$STAMP"
echo "$PWD" > "$VENV/.instseg-src"
echo "[setup] environment ready in $(( $(date +%s) - start )) s"
