#!/usr/bin/env bash
# Builds one venv per peer under bench/.venv-peers/ so the peers' pins (numpy, onnx,
# torch) never touch the project's .venv nor each other. Each install's log is kept
# beside its venv; bench/optimize.py reports a failed install from it in one line.
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/bench/.venv-peers"
mkdir -p "$dest"
py="${PYTHON:-python3}"

install() {  # name, then pip requirement specs
  local name="$1"; shift
  local venv="$dest/$name"
  if [ -f "$venv/.ok" ]; then echo "$name: already installed"; return 0; fi
  rm -rf "$venv"
  "$py" -m venv "$venv" || { echo "venv failed" >"$dest/$name.log"; return 1; }
  if "$venv/bin/pip" install --no-input -q "$@" >"$dest/$name.log" 2>&1; then
    touch "$venv/.ok"; echo "$name: installed"
  else
    echo "$name: install FAILED (see $dest/$name.log)"
  fi
}

# NNCF's ONNX backend needs no torch; neural-compressor 2.x still carries the ONNX
# Runtime adaptor (3.x moved it to a separate project) and predates numpy 2.
only="${*:-nncf inc olive}"
for p in $only; do
  case "$p" in
    nncf) install nncf "nncf==3.4.*" onnx onnxruntime ;;
    inc) install inc "neural-compressor<3" "numpy<2" "onnx<1.17" "onnxruntime<1.21" six ;;
    olive) install olive "olive-ai[cpu]==0.13.*" requests ;;
  esac
done
