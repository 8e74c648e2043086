#!/usr/bin/env bash
# Start JupyterLab on notebooks/ from .venv (run scripts/setup.sh first; `make lab` does). The kernel
# "Python 3 (ipykernel)" is then .venv's python: ipykernel's `python3` spec runs the server's own interpreter,
# and in a venv Jupyter prefers the venv's kernel specs over the user's.
#   PORT (default 8888), IP (default 127.0.0.1; 0.0.0.0 to reach it from another machine);
#   further arguments go to `jupyter lab`.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8888}"
IP="${IP:-127.0.0.1}"

# Jupyter would silently move to the next free port; say instead which port is taken and how to pick another.
if ! .venv/bin/python -c "import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))" "$IP" "$PORT" 2>/dev/null; then
    echo "make lab: port $PORT on $IP is already in use (another JupyterLab? see: .venv/bin/jupyter server list)." >&2
    echo "make lab: choose another port: make lab PORT=$((PORT + 1))" >&2
    exit 1
fi
# --allow-root: containers and CI machines often run as root, where Jupyter otherwise refuses to start.
exec .venv/bin/jupyter lab --allow-root --ServerApp.root_dir=notebooks --ServerApp.ip="$IP" --ServerApp.port="$PORT" \
    --ServerApp.port_retries=0 "$@"
