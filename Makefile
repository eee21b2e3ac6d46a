# The two commands of the README: `make run` and `make test`. Everything they need is set up here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run run-cluster test lint typecheck pytest pytest-pure build check clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 'setuptools>=77' wheel

# lbproxy in the venv, editable, with its dependencies; `build` compiles its hot path in the tree
$(STAMP): pyproject.toml setup.py | $(BIN)/python
	LBPROXY_PURE=1 $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The hot path compiled with mypyc in the source tree (issue #19; setup.py), again whenever a module of
# lbproxy changes. A compiler that fails leaves a warning and pure Python: `lbproxy --version` says which.
COMPILED := $(VENV)/.compiled
$(COMPILED): $(STAMP) setup.py $(wildcard lbproxy/*.py)
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(COMPILED)

build: $(COMPILED)
	@$(BIN)/lbproxy --version

# One process per demo back-end (their PIDs printed), lbproxy in front, and three things to try
run: $(COMPILED)
	$(BIN)/lbproxy demo -c config/demo.yaml

# One etcd, three lbproxy nodes (8081-8083) as one fleet, the demo back-ends, and things to try
run-cluster: $(COMPILED)
	config/run-cluster

# The whole suite twice: on the compiled build, and on the pure-Python one, so that neither rots
test: lint typecheck pytest pytest-pure

lint: $(STAMP)
	$(BIN)/ruff check lbproxy tests benchmarks setup.py
	$(BIN)/ruff format --check lbproxy tests benchmarks setup.py

typecheck: $(STAMP)
	$(BIN)/mypy --strict lbproxy

pytest: $(COMPILED) system-deps
	$(BIN)/pytest

pytest-pure: $(STAMP) system-deps
	LBPROXY_PURE=1 $(BIN)/pytest

# promtool, Prometheus and Chromium, for the tests that check lbproxy against the real tools
system-deps:
	@.ci/system-deps

check: $(STAMP)
	$(BIN)/lbproxy check -c config/lbproxy.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build lbproxy/*.so lbproxy/compiled.json

# Benchmarks (issue #6): `make bench` (QUICK=1 for a short smoke run) writes benchmarks/results/DATE.*;
# `make profile` records lbproxy under py-spy. Neither is part of `make test`.
.PHONY: bench profile soak
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml setup.py | $(BIN)/python
	LBPROXY_PURE=1 $(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(COMPILED)
	@bash benchmarks/system-deps
	$(BIN)/python benchmarks/run.py $(if $(filter 1 yes true,$(QUICK)),--quick --command 'make bench QUICK=1',--command 'make bench')

profile: $(BENCH_STAMP) $(COMPILED)
	@bash benchmarks/system-deps
	$(BIN)/python benchmarks/profile.py

# The churn soak (issue #13): `make soak` runs 10 minutes (QUICK=1: 60 s) of load through lbproxy while
# back-ends are killed, frozen, drained and the config reloaded; writes benchmarks/results/soak-DATE.md.
soak: $(COMPILED)
	$(BIN)/python benchmarks/soak.py $(if $(filter 1 yes true,$(QUICK)),--quick)

# A fleet on etcd (issue #18): a drain's propagation to three nodes, and a rolling restart behind a
# retrying client; writes benchmarks/results/cluster-DATE.md (about 10 s).
.PHONY: bench-cluster
bench-cluster: $(COMPILED) system-deps
	$(BIN)/python benchmarks/cluster.py $(if $(filter 1 yes true,$(QUICK)),--quick)
