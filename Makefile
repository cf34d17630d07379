# The two commands of README.md: `make demo` (set up, train, sample) and `make test`.
# DEMO_ARGS: config overrides for the demo's training run, e.g. a fast check as CI runs it:
#   make demo DEMO_ARGS="train.max_steps=10 sample.steps=5"
.PHONY: demo test lint setup setup-test clean

demo: setup
	bash scripts/demo.sh $(DEMO_ARGS)

# Two workers, a test file each (--dist loadfile): a file's module fixtures (a trained run, the
# SLURM cluster) are built once, and most tests leave a core idle (one-rank runs, waits for a
# signal or a SLURM job). On 2 cores: 30 to 35 min, against 50 min on one worker.
test: setup-test
	.venv/bin/ruff check .
	.venv/bin/pytest -q -n 2 --dist loadfile

setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh --test

lint: setup-test
	.venv/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache .setup-logs
