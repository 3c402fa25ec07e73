# tandem: the two commands are `make run` and `make test`.
CARGO ?= cargo
DEMO_DIR ?= data/demo
CLUSTER_DIR ?= data/cluster
# Where cargo puts the binaries: $(CARGO_TARGET_DIR) when set (shared build folders), else
# target/. TANDEM is the debug binary every target below runs (override it to run a copy).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
TANDEM ?= $(TARGET_DIR)/debug/tandem
RELEASE_DIR := $(TARGET_DIR)/release
# make run listens on $(BIND):$(PORT), this machine only unless BIND=0.0.0.0; TANDEM_BIND
# (HOST:PORT), when set, wins.
BIND ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test bench lint fmt demo-data check-split bench-session bench-serve test-ui test-gorse

## run: the full demo on the embedded default: the demo catalog (generated if absent), indexed
## with the shipped models/demo checkpoint into the embedded Qdrant under data/ (at the first
## start, when the index is empty), the demo's interaction history replayed once through
## POST /v1/events, and the server on $(BIND):$(PORT) with an admin key it prints
## (scripts/run-demo.sh). Ctrl-C stops it.
run: demo-data
	TANDEM_BIN=$(TANDEM) scripts/run-demo.sh $(DEMO_DIR)/raw $(or $(TANDEM_BIND),$(BIND):$(PORT))

demo-data:
	$(CARGO) build --bin tandem
	test -f $(DEMO_DIR)/raw/items.csv || $(TANDEM) generate --out $(DEMO_DIR)/raw --items 2000 --users 500 --interactions 40000 --seed 7
	test -f $(DEMO_DIR)/split/train.csv || $(TANDEM) split --data $(DEMO_DIR)/raw --out $(DEMO_DIR)/split

## test: every test. Redis: the one at REDIS_URL (default 127.0.0.1:6379) if it answers,
## else one started for the run. The qdrant
## backend's cases run against the server at QDRANT_URL; when it is unset and a server binary
## is found (QDRANT_BIN, ../shared/bin/qdrant), one is started for the run and stopped after
test: prereqs test-ui test-gorse
	scripts/redis-server.sh run scripts/qdrant-server.sh run $(CARGO) test --all-targets

## prereqs: what make test needs beyond Rust (one line says what to install); Redis itself is
## started for the run when none answers at REDIS_URL (scripts/redis-server.sh)
.PHONY: prereqs
prereqs:
	@scripts/check-prereqs.sh

## cluster: two replicas (:8081, :8082) on one Qdrant server (QDRANT_BIN) and Redis (:6379,
## reused when up), over the demo catalog, as scripts/cluster.sh describes; Ctrl-C stops it
.PHONY: cluster
cluster: demo-data
	TANDEM_BIN=$(TANDEM) scripts/cluster.sh $(CLUSTER_DIR)

## qdrant-server: start a throw-away Qdrant server in the foreground (Ctrl-C stops it)
.PHONY: qdrant-server
qdrant-server:
	scripts/qdrant-server.sh run sh -c 'echo "QDRANT_URL=$$QDRANT_URL (REST $$QDRANT_HTTP_URL); Ctrl-C stops it"; while :; do sleep 3600; done'

## test-ui: the storefront, onboarding and admin pages in a real Chromium (tests/ui/run.mjs);
## fails with a clear message when Chromium or Node is missing. Screenshots: target/ui-screenshots/
test-ui:
	$(CARGO) build --bin tandem
	cd tests/ui && npm ci --no-audit --no-fund --silent
	TANDEM_BIN=$(TANDEM) node tests/ui/run.mjs

## test-gorse: the published Gorse SDKs (pygorse 0.5.1 in a venv, gorsejs 0.4.8 via npm ci),
## unchanged, against a tandem server on a free port (tests/gorse/run.sh)
test-gorse:
	$(CARGO) build --bin tandem
	TANDEM_BIN=$(TANDEM) tests/gorse/run.sh

bench:
	$(CARGO) build --release --bin tandem
	@echo "see BENCHMARKS.md for the benchmark commands"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## index: ANN benchmarks of the vector index (release build; serialized by the bench lock)
.PHONY: bench-ann
bench-ann:
	$(CARGO) build --release --bin tandem
	flock /tmp/tandem-bench.lock $(RELEASE_DIR)/tandem bench ann --items 100000 --dim 64 --queries 1000 --filter-selectivity 0.1,0.01

## check-split: tandem's split of ml-latest-small equals the shared one (needs ../shared; not in CI)
check-split:
	scripts/check-split.sh

## bench-session: session store benchmark (Redis ingest + no-loss check, read latency, outage); needs Redis on :6379
bench-session:
	$(CARGO) build --release --example session_bench
	flock /tmp/tandem-bench.lock $(RELEASE_DIR)/examples/session_bench

## bench-serve: the serving load test at 1M items (release build, under the benchmark lock):
## generates the catalog once, indexes it, then runs tandem-load against `tandem serve`, once
## with the memory session store and once with Redis. Numbers go to BENCHMARKS.md.
BENCH_DIR ?= data/bench-1m
BENCH_SECS ?= 30
BENCH_CONN ?= 8
.PHONY: bench-serve
## BACKEND=qdrant: the same catalog size (BENCH_ITEMS) served from a Qdrant server
## (scripts/qdrant-server.sh), against a bare Qdrant search on the same collection
## (load-tests/bench-serve-qdrant.sh; 4 connections unless BENCH_CONN is given).
BACKEND ?= embedded
BENCH_ITEMS ?= 1000000
bench-serve:
	$(CARGO) build --release --bin tandem --bin tandem-load
ifeq ($(BACKEND),qdrant)
	BENCH_BIN=$${BENCH_BIN:-$(RELEASE_DIR)} flock /tmp/tandem-bench.lock nice load-tests/bench-serve-qdrant.sh \
	  $(if $(filter 1000000,$(BENCH_ITEMS)),data/bench-qdrant-1m,data/bench-qdrant-$(BENCH_ITEMS)) \
	  $(BENCH_ITEMS) $(BENCH_SECS) $(if $(filter command line,$(origin BENCH_CONN)),$(BENCH_CONN),4)
else
	BENCH_BIN=$${BENCH_BIN:-$(RELEASE_DIR)} flock /tmp/tandem-bench.lock load-tests/bench-serve.sh $(BENCH_DIR) $(BENCH_SECS) $(BENCH_CONN)
endif

## bench-lifecycle: activate and roll back a model under steady recommendation traffic
## (release build, under the benchmark lock). Numbers go to BENCHMARKS.md.
LIFECYCLE_ITEMS ?= 1000000
LIFECYCLE_RATE ?= 200
bench-lifecycle:
	$(CARGO) build --release --bin tandem --example lifecycle_bench
	BIN=$${BIN:-$(RELEASE_DIR)} BENCH_MODEL=models/demo TANDEM_INDEX__INDEXING_THREADS=1 flock /tmp/tandem-bench.lock \
	  load-tests/lifecycle-bench.sh data/bench-lifecycle $(LIFECYCLE_ITEMS) $(LIFECYCLE_RATE) 15

## model: the shipped demo checkpoint, reproducible from the demo data (seed 7)
.PHONY: demo-model
demo-model: demo-data
	$(TANDEM) train --data $(DEMO_DIR)/raw --out models/demo --seed 7 --threads 2

## --- operations (issue 8) ---
.PHONY: fuzz-api check-compose
## fuzz-api: schemathesis against /openapi.json of a local server (FUZZ_EXAMPLES per operation)
fuzz-api:
	scripts/fuzz-api.sh

## check-compose: compose.yaml parses and holds the deployment's facts (no Docker engine needed)
check-compose:
	python3 deploy/check-compose.py compose.yaml
