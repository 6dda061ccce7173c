# Two commands for a newcomer: `make demo` (the pipeline end to end on the demo data) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LLARK  := $(BIN)/llark
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
WORKERS ?=
DEMO_CLIPS ?= 240
WORKERS_FLAG := $(if $(WORKERS),--workers $(WORKERS),)

.PHONY: setup test test-slow demo demo-data ingest crop bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changed (or the venv is new).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

demo: setup
	$(MAKE) --no-print-directory demo-data ingest crop RUN=$(RUN)
	@echo
	@echo "Demo done. Outputs under $(RUN)/:"
	@echo "  source dataset (synthesised, with ground truth): $(RUN)/source"
	@echo "  ingested records:                                $(RUN)/ingested.jsonl"
	@echo "  cropped clips (44.1 kHz 16-bit wav):             $(RUN)/clips/"
	@echo "  clip records:                                    $(RUN)/clips.jsonl"
	@echo "  errors (if any):                                 $(RUN)/clips.errors.jsonl"

demo-data: setup
	$(LLARK) demo-data --out $(RUN)/source --clips $(DEMO_CLIPS)

ingest: setup
	$(LLARK) ingest demo --root $(RUN)/source --out $(RUN)/ingested.jsonl

crop: setup
	$(LLARK) crop $(RUN)/ingested.jsonl --out $(RUN)/clips.jsonl --clips-dir $(RUN)/clips $(WORKERS_FLAG)

bench: setup
	$(BIN)/python benchmarks/runner.py

clean:
	rm -rf $(RUN)
