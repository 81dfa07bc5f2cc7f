#!/usr/bin/env bash
# Install everything edgellm needs on a fresh Debian machine with Python 3.11. Idempotent:
# a second run only checks (a few seconds). Used by `make setup`, `make test`, `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

# Debian packages: the arm64 cross compiler and emulator (edgellm build --target arm64, edgellm verify)
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  if [[ $(id -u) == 0 ]]; then
    echo "setup: apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: missing Debian packages ${need[*]} (arm64 builds and tests need them): sudo apt-get install ${need[*]}" >&2
  fi
fi

# Python: torch comes from the local 2.13.0 CPU wheel that pip finds here; the rest from PyPI.
if ! "$PY" -m pip install -q --disable-pip-version-check -e '.[zoo,dev]' 2>/tmp/edgellm-pip.log; then
  cat /tmp/edgellm-pip.log >&2
  exit 1
fi
echo "setup: ok ($("$PY" -c 'import edgellm, tvm, torch; print("edgellm", edgellm.__version__, "tvm", tvm.__version__, "torch", torch.__version__)'))"
