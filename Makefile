# The two commands the README starts with: `make serve` and `make test`.
# Both build the virtual environment on first use; torch is pinned first so pip takes the wheel for this
# machine instead of resolving a newer (multi-GB CUDA) build through the project's looser range.
PYTHON ?= python3
DEFAULT_TORCH := torch==2.13.0
TORCH ?= $(DEFAULT_TORCH)
VENV := .venv
BIN := $(VENV)/bin
T1 := .venv-together1

# The venv remembers which torch requirement built it: one stamp per requirement (named by its checksum,
# holding the requirement itself). Another TORCH (e.g. `make serve TORCH=torch` on a GPU host after a first
# CPU build) has no stamp yet, so the venv is rebuilt with it instead of silently keeping the old wheel.
TORCH_ID := $(firstword $(shell printf '%s' '$(TORCH)' | cksum))
TORCH_STAMP := $(VENV)/.torch-$(TORCH_ID)

.PHONY: serve test bench install docs clean

serve: $(VENV)/.installed
	$(BIN)/darkroom serve $(ARGS)

# Two workers (pytest-xdist): a module's tests stay in one worker (tests/conftest.py schedules them), the
# heavy ones start first; --durations=15 lists the slowest. `make test ARGS="-n 0"` runs in one process.
TEST_OPTS ?= -n 2 --durations=15

test: $(VENV)/.installed $(T1)/.installed
	$(BIN)/python -m pytest $(TEST_OPTS) $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python scripts/bench_serving.py $(ARGS)

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict $(ARGS)

install: $(VENV)/.installed

# A venv built before these stamps existed (it has .installed but no .torch-* stamp) was built with the
# default requirement: keep it when TORCH is still the default, rebuild it for any other.
$(TORCH_STAMP):
	@if [ -e $(VENV)/.installed ] && ! ls $(VENV)/.torch-* >/dev/null 2>&1 && \
	    [ '$(TORCH)' = '$(DEFAULT_TORCH)' ]; then \
	    echo "$(VENV): built with $(DEFAULT_TORCH) before torch stamps existed; keeping it"; \
	    printf '%s\n' '$(TORCH)' > $@; touch -r $(VENV)/.installed $@; \
	    exit 0; \
	fi; \
	if [ -e $(VENV) ]; then \
	    echo "$(VENV): torch requirement is now '$(TORCH)' (was '$$(cat $(VENV)/.torch-* 2>/dev/null || echo $(DEFAULT_TORCH))'): rebuilding $(VENV)"; \
	    rm -rf $(VENV); \
	fi; \
	set -e; \
	echo "building $(VENV) with $(TORCH) (first time: a few minutes)"; \
	$(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install -q --upgrade pip; \
	$(BIN)/python -m pip install -q "$(TORCH)"; \
	printf '%s\n' '$(TORCH)' > $@

$(VENV)/.installed: pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# together 1.x cannot live beside 3.x in one environment; the tests drive it from its own.
$(T1)/.installed:
	$(PYTHON) -m venv $(T1)
	$(T1)/bin/python -m pip install -q "together==1.5.34"
	touch $@

clean:
	rm -rf $(VENV) $(T1) var .pytest_cache site
