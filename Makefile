# The two commands the README starts with: `make serve` and `make test`.
# Both build the virtual environment on first use; torch is pinned first so pip takes the wheel for this
# machine instead of resolving a newer (multi-GB CUDA) build through the project's looser range.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
T1 := .venv-together1

.PHONY: serve test bench install clean

serve: $(VENV)/.installed
	$(BIN)/darkroom serve $(ARGS)

test: $(VENV)/.installed $(T1)/.installed
	$(BIN)/python -m pytest $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_serving.py $(ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# together 1.x cannot live beside 3.x in one environment; the tests drive it from its own.
$(T1)/.installed:
	$(PYTHON) -m venv $(T1)
	$(T1)/bin/python -m pip install -q "together==1.5.34"
	touch $@

clean:
	rm -rf $(VENV) $(T1) var .pytest_cache
