# Set-up and checks. `make setup` is idempotent: it re-installs only when pyproject.toml changes.
# The first Python 3.12 that really runs (a pyenv shim can exist without a selected version behind it).
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null) /usr/bin/python3.12; do \
	$$p -c "import sys; assert sys.version_info[:2] == (3, 12)" >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# torch.compile (megatron's jit_fuser) costs ~7 s per first call on CPU and changes no result.
export TORCHDYNAMO_DISABLE ?= 1

.PHONY: setup test lint demo demo-vl demo-sft bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: python3.12 not found (set PYTHON312=/path/to/python3.12)"; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Two pytest workers, one test file each at a time (--dist loadfile keeps a file's module fixtures in one process):
# most tests launch recipes whose single-threaded start-up (importing megatron.training) leaves a core idle.
# Measured on a 2-core machine: 18.4-19.6 minutes over the last two fresh-clone runs (.ci/run: 19.9-21.8 minutes with set-up; TEST_WORKERS=0 runs them in one process, slower).
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	bash recipes/tiny.sh

demo-vl: setup
	bash recipes/tiny-vl.sh

demo-sft: setup
	bash recipes/tiny-sft.sh

bench: setup
	$(PY) benchmarks/gdn_kernel.py

clean:
	rm -rf $(VENV)
