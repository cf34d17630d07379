# The two commands of README.md: `make demo` (set up, train, sample) and `make test`.
# DEMO_ARGS: config overrides for the demo's training run, e.g. a fast check as CI runs it:
#   make demo DEMO_ARGS="train.max_steps=10 sample.steps=5"
.PHONY: demo test lint setup setup-test clean

demo: setup
	bash scripts/demo.sh $(DEMO_ARGS)

# The suite runs in TEST_WORKERS processes, each test file whole in one of them (its fixtures
# are built once, and the dev SLURM cluster has one user). Its tests wait on subprocesses and
# signals much of the time: 2 workers on 2 cores take about 40% less time than 1.
TEST_WORKERS ?= 2

test: setup-test
	.venv/bin/ruff check .
	.venv/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

lint: setup-test
	.venv/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache .setup-logs
