#!/usr/bin/env bash
# `make axolotl-test`: MacDrop where axolotl runs it, in a venv of its own (.venv-axolotl/).
#
# 1. makes .venv-axolotl/ an axolotl 0.19.0 environment (requirements/axolotl.txt) on the CPU torch
#    2.13.0 wheel, which is installed first and kept (axolotl allows torch 2.11-2.13);
# 2. builds the llamafactory-macdrop wheel (dist/axolotl/) and installs it --no-deps: its declared
#    requirements are LLaMA-Factory 0.9.5's versions, which axolotl's pins replace; the host-agnostic
#    part it uses here (integrations/, core/, the keys) needs only torch, transformers and peft;
# 3. runs tests/axolotl/ there against the INSTALLED wheel: axolotl's CLI and config loading with the
#    plugin, TRL 1.9's DPOTrainer and SFTTrainer with with_macdrop / MacDropCallback.
# The venv is made once (a stamp records what it was made from): ~6 min and ~4.3 GB the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-axolotl
step() { echo "[axolotl] $*"; }
quiet() { grep -v -E -e "^WARNING: Location" -e "^$" || true; }
stamp=$(cat requirements/axolotl.txt scripts/axolotl.sh | sha256sum | cut -c1-16)
if [ ! -f "$VENV/.axolotl-stamp" ] || [ "$(cat "$VENV/.axolotl-stamp")" != "$stamp" ]; then
    rm -rf "$VENV"
    step "creating $VENV: axolotl 0.19.0 on the CPU torch 2.13.0 (requirements/axolotl.txt)"
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
    "${PIP[@]}" torch==2.13.0 2>&1 | quiet
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo "torch==2.13.0" > "$constraints"
    "${PIP[@]}" -c "$constraints" -r requirements/axolotl.txt 2>&1 | quiet
    echo "$stamp" > "$VENV/.axolotl-stamp"
fi
step "building the wheel (dist/axolotl/) and installing it --no-deps"
rm -rf dist/axolotl && mkdir -p dist/axolotl
"$VENV/bin/python" -m pip wheel --disable-pip-version-check -q --no-deps -w dist/axolotl . 2>&1 | quiet
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --force-reinstall dist/axolotl/llamafactory_macdrop-*.whl 2>&1 | quiet
step "$("$VENV/bin/python" -c 'import axolotl, torch, transformers, peft, trl; print(f"axolotl {axolotl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")' 2>/dev/null | tail -1)"
step "tests/axolotl (the installed wheel, not this checkout)"
cd tests/axolotl
env -u PYTHONPATH PATH="$PWD/../../$VENV/bin:$PATH" "../../$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    --rootdir . --confcutdir . .
