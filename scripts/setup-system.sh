#!/usr/bin/env bash
# What mpumap and its tests need from the system, installed when missing:
# a C compiler and Python headers (the C core is compiled at install time),
# tmux and fincore (util-linux) for the status-view and page-cache tests.
set -euo pipefail
missing=()
command -v cc >/dev/null || missing+=(gcc)
command -v tmux >/dev/null || missing+=(tmux)
command -v fincore >/dev/null || missing+=(util-linux)
python3 - <<'PY' || missing+=(python3-dev)
import os, sysconfig, sys
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "mpumap needs: ${missing[*]} (install them, or run this as root)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
