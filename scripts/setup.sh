#!/usr/bin/env bash
# Set up q4lab's virtual environment `.venv`, which `make report`, `make test` and `make lab` run in.
#
#   scripts/setup.sh            create/update .venv (a no-op while pyproject.toml, this script and PYTHON are unchanged)
#   scripts/setup.sh --system   also apt-get install the Debian packages the tests use: hipcc, libamdhip64-dev
#                               (the HIP build checks), clang-19 (the AMD assembly of targets hipcc 5.2 does not
#                               know, and `q4lab resources`) and chromium (the browser tests)
#
# PYTHON (default python3) is the interpreter .venv is made from. If it can import torch (your CUDA or ROCm
# build), .venv reuses that torch and pip is pinned to it, so it is never replaced; otherwise .venv gets the
# CPU build of torch, installed before the project so that pip never resolves PyPI's multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
CPU_TORCH_VERSION=2.13.0
SYSTEM_PACKAGES=(hipcc libamdhip64-dev clang-19 chromium)
STAMP="$VENV/.q4lab-setup-stamp"     # the hash of what the venv was last set up from
TORCH_PIN="$VENV/q4lab-torch-pin.txt" # pip constraint: the torch .venv has, so no install may replace it
REUSE_PTH=q4lab-reuse-torch.pth       # in .venv's site-packages: the directory holding the reused torch

say() { echo "setup: $*"; }

loud_warning() {
    echo "" >&2
    echo "################################################################################" >&2
    echo "# setup: WARNING: $*" >&2
    echo "################################################################################" >&2
    echo "" >&2
}

install_system_packages() {
    local missing=() package
    for package in "${SYSTEM_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "system packages present: ${SYSTEM_PACKAGES[*]}"
        return
    fi
    local why="the tests that need them (HIP builds, AMD assembly, the browser tests) will be SKIPPED."
    if ! command -v apt-get >/dev/null; then
        loud_warning "apt-get not found, cannot install ${missing[*]}; $why"
        return
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo -n); fi
    say "installing system packages: ${missing[*]}"
    if "${sudo[@]}" apt-get update -q && \
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; then
        say "installed ${missing[*]}"
    else
        loud_warning "apt-get could not install ${missing[*]} (not root, no network?); $why"
    fi
}

stamp_key() {
    # The interpreter is part of the key: another PYTHON means another torch choice.
    { cat pyproject.toml scripts/setup.sh; "$PYTHON" -c "import sys; print(sys.executable)"; } | sha256sum | cut -d' ' -f1
}

install_cpu_torch() {
    # PyPI's Linux torch is the CUDA build (GBs with its nvidia-* wheels); the +cpu build lives on PyTorch's
    # own index (and in the local wheel cache of these machines, which plain PyPI lookups also see).
    local pip=("$VENV/bin/python" -m pip install --quiet)
    if [ "$(uname -s)" != Linux ]; then
        "${pip[@]}" "torch==$CPU_TORCH_VERSION"
    elif ! "${pip[@]}" "torch==$CPU_TORCH_VERSION+cpu"; then
        say "torch $CPU_TORCH_VERSION+cpu not found on the configured indexes; trying download.pytorch.org"
        "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==$CPU_TORCH_VERSION+cpu"
    fi
}

write_torch_pin() {
    # Imports torch in .venv (the check that it is there) and pins that version; fails if it is not there.
    # -W ignore: a torch imported before numpy is installed warns about it on stderr.
    "$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" >"$TORCH_PIN"
}

set_up_torch() {
    if write_torch_pin 2>/dev/null; then
        return # already there: reused from PYTHON, installed by an earlier run, or put there by the user
    fi
    local found torch_dir
    # One import in PYTHON gives both the directory and the version (a CUDA torch takes seconds to import).
    if found=$("$PYTHON" -W ignore -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__))); print(torch.__version__)" 2>/dev/null); then
        torch_dir=${found%%$'\n'*}
        # A .pth rather than `venv --system-site-packages`: it also works when PYTHON is itself a venv's or a
        # user-site python. Its directory comes after .venv's own site-packages, so .venv's packages win.
        local site
        site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        echo "$torch_dir" >"$site/$REUSE_PTH"
        if ! write_torch_pin 2>/dev/null; then
            rm "$site/$REUSE_PTH"
            echo "setup: error: the torch in $torch_dir does not import in .venv (made from another Python?);" \
                "start over: rm -rf .venv && make test PYTHON=$PYTHON" >&2
            exit 1
        fi
        say "reusing torch ${found##*$'\n'} from $torch_dir"
    else
        say "$PYTHON has no torch: installing the CPU build torch $CPU_TORCH_VERSION"
        install_cpu_torch
        write_torch_pin || { echo "setup: error: the CPU build of torch does not import in .venv (above)" >&2; exit 1; }
    fi
}

if [ "${1:-}" = --system ]; then
    install_system_packages
elif [ $# -gt 0 ]; then
    echo "usage: scripts/setup.sh [--system]" >&2
    exit 2
fi

if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: error: '$PYTHON' not found; install Python >= 3.11 or pass one: make test PYTHON=/path/to/python3" >&2
    exit 1
fi
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$(stamp_key)" ]; then
    say ".venv is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV from $(command -v "$PYTHON")"
    "$PYTHON" -m venv "$VENV" || {
        echo "setup: error: '$PYTHON -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    }
fi
set_up_torch
say "installing q4lab[all] with $(cat "$TORCH_PIN") pinned (minutes on a first run)"
if ! "$VENV/bin/python" -m pip install --quiet --constraint "$TORCH_PIN" --editable ".[all]"; then
    echo "setup: error: pip failed (above). If it names a torch conflict: .venv's $(cat "$TORCH_PIN") is pinned" \
        "so it is never replaced; upgrade that torch, or use a python without torch to get the CPU build:" \
        "make test PYTHON=/usr/bin/python3" >&2
    exit 1
fi
stamp_key >"$STAMP"
say "done: .venv is ready ($(cat "$TORCH_PIN"))"
