# The two commands of the README: `make demo` (fresh machine -> installed -> demo calibration run)
# and `make test` (the suite; .ci/run calls exactly this).
PYTHON ?= python3

.PHONY: install demo test test-fast bench compat

install:
	bash scripts/install.sh

demo: install
	profile-bias --model demo-llava --n 32 --out runs/demo --overwrite

test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) benchmarks/run_all.py

compat:
	bash scripts/compat.sh
