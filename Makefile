# Every target works as the first command on a fresh clone: the venv and stubs are built on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/*.proto)
PB_DIR := gateway/pb
PB_STAMP := $(PB_DIR)/.generated
CONFIG ?= examples/serve_config.yaml
PYTEST_ARGS ?=

.PHONY: all venv protos run test lint typecheck bench bench-smoke bench-profile clean

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,arize,memray]'
	touch $(STAMP)

venv: $(STAMP)

# Clean, then regenerate every stub; '-Igateway/pb=protos' makes the generated imports package-absolute.
protos: $(STAMP)
	rm -f $(PB_DIR)/*_pb2*.py $(PB_DIR)/*_pb2*.pyi $(PB_STAMP)
	$(PY) -m grpc_tools.protoc -Igateway/pb=protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)
	touch $(PB_STAMP)

$(PB_STAMP): $(STAMP) $(PROTO_SRC)
	$(MAKE) protos

run: $(PB_STAMP)
	$(VENV)/bin/gateway run $(CONFIG)

test: $(PB_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Fault injection (long runs, deselected from `make test`): tests marked `faults`.
.PHONY: faults
faults: $(PB_STAMP)
	$(PY) -m pytest -m faults $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway exporters tests examples bench
	$(VENV)/bin/mypy

bench: $(PB_STAMP)
	$(PY) -m bench.run

bench-smoke: $(PB_STAMP)
	$(PY) -m bench.run --smoke

bench-profile: $(PB_STAMP)
	$(PY) -m pip install --quiet py-spy
	$(PY) -m bench.profile

clean:
	rm -rf $(VENV) $(PB_DIR)/*_pb2*.py $(PB_DIR)/*_pb2*.pyi $(PB_STAMP) build *.egg-info
