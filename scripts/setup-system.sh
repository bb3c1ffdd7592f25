#!/usr/bin/env bash
# What mpumap and its tests need from the system, installed when missing:
# a C compiler and Python headers (the C core is compiled at install time),
# pip and venv for python3 (Debian and Ubuntu ship them apart), tmux and
# fincore (util-linux, or util-linux-extra) for the status-view and
# page-cache tests.
set -euo pipefail
missing=()
command -v cc >/dev/null || missing+=(gcc)
command -v tmux >/dev/null || missing+=(tmux)
command -v fincore >/dev/null || missing+=(fincore)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
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
    packages=()
    for package in "${missing[@]}"; do
        if [ "$package" = fincore ]; then
            # util-linux-extra has it since Debian 12 and Ubuntu 22.10; util-linux before.
            package=util-linux
            apt-cache show util-linux-extra >/dev/null 2>&1 && package=util-linux-extra
        fi
        packages+=("$package")
    done
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
