#!/usr/bin/env bash
# `make compat`: the plugin as a user installs it into an EXISTING LLaMA-Factory environment.
#
# 1. makes .venv-compat/ a LLaMA-Factory 0.9.5 environment at the OLDEST versions the plugin
#    declares (requirements/oldest.txt; CPU torch 2.13.0; LLaMA-Factory's own dependency list as in
#    scripts/setup.sh) WITHOUT the plugin, and records `pip freeze`;
# 2. builds the wheel (not editable) into dist/compat/ with that venv's pip;
# 3. checks that every requirement of the wheel is met there, and installs it (--no-deps);
# 4. runs tests/compat/ there (the .pth hook, llamafactory-cli train with MacDrop, a torchrun
#    child, macdrop locate, uninstall), importing the INSTALLED package, not this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-compat
step() { echo "[compat] $*"; }
quiet() {
    grep -v -E -e "^WARNING: Location" -e "^$" -e "pip's dependency resolver does not currently" \
        -e "^llamafactory [0-9.]+ requires (av|gradio|modelscope|torchaudio|torchvision)" || true
}
stamp=$(cat requirements/oldest.txt requirements/runtime.txt scripts/compat.sh | sha256sum | cut -c1-16)
if [ ! -f "$VENV/.compat-stamp" ] || [ "$(cat "$VENV/.compat-stamp")" != "$stamp" ]; then
    rm -rf "$VENV"
    step "creating $VENV: LLaMA-Factory 0.9.5 at the oldest declared versions (requirements/oldest.txt)"
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
    "${PIP[@]}" torch==2.13.0 2>&1 | quiet
    constraints=$(mktemp)
    trap 'rm -f "$constraints" "$constraints.req"' EXIT
    grep -v '^#' requirements/oldest.txt > "$constraints"
    echo "torch==2.13.0" >> "$constraints"
    "${PIP[@]}" --no-deps -c "$constraints" llamafactory 2>&1 | quiet
    # LLaMA-Factory's runtime dependencies (as scripts/setup.sh), pinned low; no deepspeed/bitsandbytes/lm-eval
    grep -v -E '^(lm-eval|deepspeed|bitsandbytes|gguf|pytest|tokenizers|tensorboard|rouge|fuzzywuzzy|jieba)' requirements/runtime.txt > "$constraints.req"
    "${PIP[@]}" -c "$constraints" -r "$constraints.req" pytest 2>&1 | quiet
    "${PIP[@]}" ./install/torchaudio-placeholder 2>&1 | quiet
    echo "$stamp" > "$VENV/.compat-stamp"
fi
step "building the wheel (dist/compat/)"
rm -rf dist/compat && mkdir -p dist/compat
"$VENV/bin/python" -m pip wheel --disable-pip-version-check -q --no-deps -w dist/compat . 2>&1 | quiet
wheel=$(ls dist/compat/llamafactory_macdrop-*.whl)
"$VENV/bin/python" -m pip uninstall -q -y llamafactory-macdrop >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip freeze --exclude-editable | sort > "$VENV/freeze-before.txt"

# The wheel's own requirements must all be met by what is installed: then `pip install WHEEL`
# changes nothing in a complete LLaMA-Factory environment. (A pip dry run cannot show this here:
# pip also resolves LLaMA-Factory's own dependencies, and this CPU venv leaves out torchvision,
# torchaudio, gradio, av and modelscope on purpose, as scripts/setup.sh does.)
step "the wheel's requirements against the installed versions"
"$VENV/bin/python" - "$wheel" <<'PY'
import sys, zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement

with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = Parser().parsestr(whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode())
unmet = []
for line in meta.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (deepspeed, demo, eval, test, webui)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        have = None
    ok = have is not None and req.specifier.contains(have, prereleases=True)
    print(f"[compat]   {str(req):<34} installed {have}  {'ok' if ok else 'NOT MET'}")
    if not ok:
        unmet.append(str(req))
assert not unmet, f"pip would change this environment for: {unmet}"
PY
step "pip install --no-deps $wheel (its own requirements are all met, as checked above)"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$wheel" 2>&1 | quiet
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^llamafactory[-_]macdrop' | sort > "$VENV/freeze-after.txt"
diff "$VENV/freeze-before.txt" "$VENV/freeze-after.txt"  # --no-deps: a guard against the wheel's own install hooks
"$VENV/bin/python" -m pip check 2>&1 | grep -i "^llamafactory-macdrop" && { echo "[compat] FAILED: the wheel's requirements are not met" >&2; exit 1; }
step "installed; $(grep -i -E '^(transformers|peft|trl|accelerate|datasets)==' "$VENV/freeze-after.txt" | tr '\n' ' ')"

step "tests/compat (the installed package, not this checkout)"
cd tests/compat
run_tests() {
    env -u PYTHONPATH PATH="$PWD/../../$VENV/bin:$PATH" "../../$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        --rootdir . --confcutdir . "$@"
}
run_tests test_installed.py
step "uninstalling (tests/compat/test_uninstall.py)"
run_tests test_uninstall.py
