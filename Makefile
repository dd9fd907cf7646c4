# Two entry points: `make demo` (the main job: fxopt compress on CREPE's real pitch model, beside fp32 and the plain presets) and `make test`.
# Both create .venv on first use and install the pinned torch + fxopt into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxopt-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The zoo (every torchvision model, the largest holding gigabytes) runs apart, in two worker
# processes of one torch thread each: its time is single-threaded graph work.
test: setup
	FXOPT_VERIFY=1 $(BIN)/python -m pytest -q -p no:cacheprovider --ignore=tests/test_zoo.py
	FXOPT_VERIFY=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 tests/test_zoo.py

demo: setup
	$(BIN)/fxopt compress crepe --target speedup=5 --max-drop 0.01 --steps 150 --time-budget 420 --compare int8 --compare prune25+int8 --compare prune50+int8 --out benchmarks/results

bench: setup
	$(BIN)/python -m benchmarks --plots

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
