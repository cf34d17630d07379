# The two commands of README.md: `make demo` (set up, train, sample) and `make test`.
.PHONY: demo test lint setup setup-test clean

demo: setup
	bash scripts/demo.sh

test: setup-test
	.venv/bin/ruff check .
	.venv/bin/pytest -q

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

lint: setup-test
	.venv/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
