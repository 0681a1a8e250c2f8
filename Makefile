# Two commands on a fresh machine with Python 3.11:  make demo   and   make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install  ## tiny model + sample subject: DreamBooth training, then text_to_image (about a minute on CPU)
	$(PY) tools/demo.py

test: install  ## the whole test suite (both backends)
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf demo_output .pytest_cache
