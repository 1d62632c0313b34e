# The two commands: `make pipeline` and `make test`. Both build what they need.
# Everything builds with --release so tests and the pipeline share one build
# of the heavy dependencies (polars, arrow, candle).

CARGO  ?= cargo
BIN    := target/release/melanoflow
CONFIG ?= data/pipeline.toml

.PHONY: pipeline test bench build status clean

pipeline: build
	$(BIN) run --config $(CONFIG)

build:
	$(CARGO) build --release --bin melanoflow

test:
	$(CARGO) test --release --workspace

bench: build
	benches/engine_noop.sh
	benches/preprocess.sh

status: build
	$(BIN) status --config $(CONFIG)

clean:
	rm -rf data/out data/store data/.melanoflow
