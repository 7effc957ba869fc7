# The two README commands: `make demo` (set-up + main job) and `make test` (ruff lint + format check, then the suite). Also:
#   make lint        ruff check + ruff format --check ([tool.ruff] in pyproject.toml)
#   make compat      the wheel into a fresh LLaMA-Factory venv at the OLDEST declared versions (.venv-compat/)
#   make axolotl-test the wheel into an axolotl 0.19.0 venv (.venv-axolotl/): its plugin, TRL 1.9 (docs/hosts.md)
#   make webui       LlamaBoard's extras (gradio) into .venv
#   make ray         Ray (ray[default]) into .venv, for LLaMA-Factory's USE_RAY=1 path; `make test` runs it
#   make webui-test  LlamaBoard in headless Chromium (needs Debian's chromium + chromium-driver)
#   make bench       the CPU benchmark set (docs/benchmarks.md) into bench-results/
SHELL := /bin/bash
.PHONY: setup demo test lint compat axolotl-test webui webui-test bench ray

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test: setup lint ray
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

compat:
	bash scripts/compat.sh

axolotl-test:
	bash scripts/axolotl.sh

webui: setup
	@# pip's resolver notes about LLaMA-Factory's extras left out on purpose (docs/install.md) are noise here
	set -o pipefail; .venv/bin/python -m pip install --disable-pip-version-check -q -c requirements/constraints.txt \
		-r requirements/webui.txt 2>&1 | { grep -v -E "^WARNING: Location|pip's dependency resolver|which is not installed|but you have" || true; }

ray: setup
	@# the same resolver notes as for webui
	set -o pipefail; .venv/bin/python -m pip install --disable-pip-version-check -q -c requirements/constraints.txt \
		-r requirements/ray.txt 2>&1 | { grep -v -E "^WARNING: Location|pip's dependency resolver|which is not installed|but you have" || true; }

webui-test: webui
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		echo "webui-test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver" >&2; exit 2; }
	cd tests/webui && MACDROP_WEBUI_TEST=1 ../../.venv/bin/python -m pytest -q -p no:cacheprovider --rootdir . --confcutdir . .

bench: setup
	bash scripts/bench.sh
