#!/usr/bin/env bash
# Installs everything into the active Python environment (make a venv first).
# torchnet 0.0.4 needs visdom, an sdist whose setup.py imports pkg_resources,
# which setuptools>=81 no longer ships; pip's default isolated build would fetch
# the newest setuptools and fail. So: pin a setuptools that still has
# pkg_resources, and build the sdists against it.
# A torch already installed at or above the floor (scripts/pins.py: 2.4), often a CUDA
# build, is kept: pins.py pins it (and torchvision) to what is installed. Where
# torchvision is missing, a CUDA build's (+cuXYZ) comes from PyTorch's index for
# that build; a torch of another local build stops here with one line (scripts/pins.py).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
"$PY" -m pip install --upgrade pip 'setuptools>=70,<81' wheel
REQ=$(mktemp)
trap 'rm -f "$REQ"' EXIT
"$PY" scripts/pins.py requirements requirements.txt > "$REQ"
"$PY" -m pip install --no-build-isolation -r "$REQ"
