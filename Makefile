# The two README commands: `make demo` (set-up + main job) and `make test`.
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q
