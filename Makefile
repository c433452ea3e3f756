# The two front-door commands (see README): `make demo` and `make test`.
# Both create ./.venv on first use and install everything the project needs into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint install test-tools clean

demo: $(STAMP)
	$(BIN)/bertrec demo $(ARGS)

# test-tools installs every toolchain the tests use, so none of them may skip for lack of one.
test: $(STAMP) lint test-tools
	BERTREC_REQUIRE_TOOLCHAINS=1 $(BIN)/pytest -q $(PYTEST_ARGS)

# Prometheus (Debian), kubectl/kustomize, kubernetes-validate, checkov, hadolint, yamllint (the
# deploy checks in tests/deploy run the real tools), the Go/C++/Java/TypeScript toolchains of the
# example clients and the buf CLI: see scripts/ci-deps.sh.
test-tools:
	bash scripts/ci-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[cpu,train,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) bertrec-demo build *.egg-info
