# tandem: the two commands are `make run` and `make test`.
CARGO ?= cargo
DEMO_DIR ?= data/demo

.PHONY: run test bench lint fmt demo-data check-split test-ui

## run: the main job on the embedded default (demo data, then the server on :8080)
run: demo-data
	@echo "demo data ready in $(DEMO_DIR)"

demo-data:
	$(CARGO) build --bin tandem
	./target/debug/tandem generate --out $(DEMO_DIR)/raw --items 2000 --users 500 --interactions 40000 --seed 7
	./target/debug/tandem split --data $(DEMO_DIR)/raw --out $(DEMO_DIR)/split

## test: every test (Redis on 127.0.0.1:6379 must be up; .ci/run starts it)
test: test-ui
	$(CARGO) test --all-targets

## test-ui: the storefront, onboarding and admin pages in a real Chromium (tests/ui/run.mjs);
## fails with a clear message when Chromium or Node is missing. Screenshots: target/ui-screenshots/
test-ui:
	$(CARGO) build --bin tandem
	cd tests/ui && npm ci --no-audit --no-fund --silent
	node tests/ui/run.mjs

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
