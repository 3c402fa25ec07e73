# tandem: the two commands are `make run` and `make test`.
CARGO ?= cargo
DEMO_DIR ?= data/demo

.PHONY: run test bench lint fmt demo-data check-split bench-session

## run: the main job on the embedded default (demo data, then the server on :8080)
run: demo-data
	@echo "demo data ready in $(DEMO_DIR)"

demo-data:
	$(CARGO) build --bin tandem
	./target/debug/tandem generate --out $(DEMO_DIR)/raw --items 2000 --users 500 --interactions 40000 --seed 7
	./target/debug/tandem split --data $(DEMO_DIR)/raw --out $(DEMO_DIR)/split

## test: every test (Redis on 127.0.0.1:6379 must be up; .ci/run starts it)
test:
	$(CARGO) test --all-targets

bench:
	$(CARGO) build --release --bin tandem
	@echo "see BENCHMARKS.md for the benchmark commands"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## check-split: tandem's split of ml-latest-small equals the shared one (needs ../shared; not in CI)
check-split:
	scripts/check-split.sh

## index: ANN benchmarks of the vector index (release build; serialized by the bench lock)
.PHONY: bench-ann
bench-ann:
	$(CARGO) build --release --bin tandem
	flock /tmp/tandem-bench.lock ./target/release/tandem bench ann --items 100000 --dim 64 --queries 1000 --filter-selectivity 0.1
## bench-session: session store benchmark (Redis ingest + no-loss check, read latency, outage); needs Redis on :6379
bench-session:
	$(CARGO) build --release --example session_bench
	flock /tmp/tandem-bench.lock ./target/release/examples/session_bench

## --- operations (issue 8) ---
.PHONY: fuzz-api check-compose
## fuzz-api: schemathesis against /openapi.json of a local server (FUZZ_EXAMPLES per operation)
fuzz-api:
	scripts/fuzz-api.sh

## check-compose: compose.yaml parses and holds the deployment's facts (no Docker engine needed)
check-compose:
	python3 deploy/check-compose.py compose.yaml
