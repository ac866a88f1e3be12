# The two set-up commands: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)

.PHONY: install fashion demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,app,vision,plot,onnx]"
	touch $(STAMP)

install: $(STAMP)

FASHION := /usr/share/datasets/fashion-mnist

# Fashion-MNIST for the demo and the tests (tests/test_convert_match.py's accuracy bar needs it)
fashion:
	@test -f $(FASHION)/train-images-idx3-ubyte.gz || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "could not install dataset-fashion-mnist: the demo will try torchvision's downloader, the tests that need it skip"

demo: install fashion
	$(PY) -m pwlu.app.demo

test: install fashion
	$(PY) -m pytest -q -n 2 tests

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_activation.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
