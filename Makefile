# worldflow — set-up and main entry points. Every target creates .venv if missing.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU build of torch that CI uses (a plain `torch` requirement pulls a multi-GB CUDA build).
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev,classic,play
STAMP   := $(VENV)/.installed
RUN     ?= runs/demo
# Tests run on every core (pytest-xdist), one worker per test module so module and session fixtures are
# built once per worker: 1.5x faster on 2 cores. PYTEST_PAR= runs them in one process.
PYTEST_PAR ?= -n auto --dist loadscope

.PHONY: install test demo bench bench-suite speed-vs lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_PAR)

demo: $(STAMP)
	$(BIN)/worldflow demo --run $(RUN)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --out benchmarks/results.json $(if $(wildcard $(RUN)/agent),--run $(RUN),)

# This checkout's speed against an earlier revision, in one run (issue 18): make speed-vs AGAINST=9f6f830
AGAINST ?= 9f6f830
speed-vs: $(STAMP)
	$(BIN)/python benchmarks/speed_vs.py --against $(AGAINST)

# The env suite (issue 17): needs the optional envs, `pip install -e .[suite]`; VIDEOS=dir adds imported video
bench-suite: $(STAMP)
	$(BIN)/python -m benchmarks.run --suite $(if $(VIDEOS),--videos $(VIDEOS),)

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf runs .pytest_cache build *.egg-info
