# Two commands on a fresh machine with Python 3.11:  make demo   and   make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/dev.lock

.PHONY: install demo test test-latest lock bench clean

# The development set (both frameworks, for the parity tests) exactly as the lock pins it; the
# scripts run from this checkout, so the project itself needs no install here.
$(VENV)/.installed: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r $(LOCK)
	touch $@

install: $(VENV)/.installed

demo: install  ## tiny world model + sample subject: DreamBooth, then base vs trained on the same seeds, scored (2 min on CPU)
	$(PY) tools/demo.py

# Tests run in parallel processes (pytest-xdist, one per core, at most 4): most of the suite's time
# is single-threaded MindSpore graph compilation. A module's tests stay in one process, so its
# compiled networks are shared (--dist loadscope), and the longest start first, in the order
# tests/conftest.py gives (--no-loadscope-reorder: else xdist starts the scopes with most tests first).
XDIST := -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder

test: install  ## the whole test suite (both backends)
	$(PY) -m pytest -q $(XDIST) tests

# Move the locks forward on purpose: the newest versions the registry serves, the whole suite
# against them, and only then new requirements/*.lock (review and commit the diff).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install --upgrade -e ".[dev]"
	.venv-latest/bin/python -m pytest -q $(XDIST) tests
	.venv-latest/bin/python tools/lock.py

lock: install  ## rewrite the locks from the installed development set
	$(PY) tools/lock.py

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf demo_output .pytest_cache .venv-latest
