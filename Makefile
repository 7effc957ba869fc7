# The two README commands: `make demo` (set-up + main job) and `make test`; `make bench` runs the
# CPU benchmark set (docs/benchmarks.md) into bench-results/.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	bash scripts/bench.sh
