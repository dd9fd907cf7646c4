# Two entry points: `make demo` (the main job: fxopt compress on CREPE's real pitch model, beside fp32 and the plain presets) and `make test`.
# Both create .venv on first use and install the pinned torch + fxopt into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxopt-installed

.PHONY: setup rtl-tools test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The open hardware tools the RTL tests use (Verilator, Icarus Verilog, Yosys, nextpnr-ice40), from
# Debian's packages when missing and this is root (as in CI); elsewhere those tests skip and say why.
RTL_TOOLS := verilator iverilog yosys nextpnr-ice40
rtl-tools:
	@missing=""; for t in $(RTL_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(RTL_TOOLS) >/dev/null; \
	else echo "note:$$missing not installed (apt-get install $(RTL_TOOLS)): the RTL tests will skip"; fi

# Both runs use two worker processes of one torch thread each: most of the time is
# single-threaded graph work, subprocesses and hardware tools (Verilator, Yosys, nextpnr).
# The zoo (every torchvision model, the largest holding gigabytes) and the RTL tests run
# apart, so the zoo's memory never meets the heaviest of the rest.
APART := tests/test_zoo.py tests/test_fpga_rtl.py tests/test_fpga_rtl_models.py tests/test_fpga_rtl_parallel.py
test: setup rtl-tools
	FXOPT_VERIFY=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 $(addprefix --ignore=,$(APART))
	FXOPT_VERIFY=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 $(APART)

demo: setup
	$(BIN)/fxopt compress crepe --target speedup=5 --max-drop 0.01 --steps 150 --time-budget 420 --compare int8 --compare prune25+int8 --compare prune50+int8 --out benchmarks/results

bench: setup
	$(BIN)/python -m benchmarks --plots

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
