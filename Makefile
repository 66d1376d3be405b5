# Cairn: make help lists the targets. Nothing here touches the network when the
# Makefile is merely parsed: only recipes may download.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Fallbacks, appended so that a Go already on PATH wins.
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin
# VCS stamping fails in a repository without commits; main.version carries the
# version instead.
export GOFLAGS := $(strip -buildvcs=false $(GOFLAGS))

# ?= is deferred: git runs only when a recipe uses the version.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS = -X main.version=$(VERSION)

.PHONY: help deps build lint test e2e bench torture demo clean manifests

help: ## List the targets
	@echo "Usage: make <target>"
	@awk 'BEGIN { FS = ":.*## " } /^[a-zA-Z0-9_-]+:.*## / { printf "  %-10s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

deps: ## Install the Debian packages and Go modules the build, tests and demo need
	bash scripts/install-deps.sh

build: ## Build bin/cairn
	go build -ldflags "$(LDFLAGS)" -o bin/cairn ./cmd/cairn

lint: ## Check formatting (gofmt), go vet, and the import layering (tests/layout)
	@unformatted="$$(gofmt -l .)"; \
	if [[ -n "$$unformatted" ]]; then \
		echo "gofmt: these files need formatting (run gofmt -w):"; \
		echo "$$unformatted"; \
		exit 1; \
	fi
	go vet ./...
	go test -count=1 ./tests/layout

# The awk passes go test's output through and ends with one summary line
# counting packages; pipefail keeps go test's exit status.
test: deps ## Run go vet and every test with the race detector (needs root for the integration tests)
	go vet ./...
	@echo 'go test -race -count=1 -timeout 18m ./...'
	@go test -race -count=1 -timeout 18m ./... 2>&1 | awk ' \
		{ print; fflush() } \
		/^ok /       { passed++ } \
		/^FAIL\t/    { failed++ } \
		/^\? /       { skipped++ } \
		END { printf "packages: %d passed, %d failed, %d skipped\n", passed, failed, skipped }'

# A single-node Kubernetes built from source (cached under the user cache
# directory), Cairn on it, and the scenarios of tests/e2e/README.md. Its own
# target beside make test: it needs root and containerd. The first step
# builds Kubernetes, etcd, the CSI sidecars and the images, or finds them in
# the cache: about 22 min on 2 cores the first time, under a second after. The tests
# then take about 3.5 min, run side by side, with Cairn as host processes;
# then Cairn as pods from its Helm chart runs scenario 1 and replaces the
# node agent's pod under a writer, on a fresh cluster, about 2 min
# (tests/e2e/README.md, "Timing").
e2e: ## Run Cairn on a local Kubernetes built from source (root; tests/e2e/README.md)
	bash scripts/install-deps.sh --e2e
	go test -tags e2e -count=1 -timeout 75m -v ./tests/e2e -e2e.build-only -e2e.base-later
	go test -tags e2e -count=1 -timeout 30m -parallel 8 -v ./tests/e2e
	go test -tags e2e -count=1 -timeout 20m -parallel 8 -v ./tests/e2e -e2e.cairn=pods

# deploy/kubernetes is the Helm chart deploy/helm/cairn rendered with its
# defaults (namespace cairn-system, createNamespace=true); tests/deploy fails
# when they disagree. Edit the chart, then run this.
manifests: ## Write deploy/kubernetes from the Helm chart deploy/helm/cairn
	cd tests/deploy/helmrender && GOWORK=off go run . -chart ../../../deploy/helm/cairn \
		-manifests -out ../../../deploy/kubernetes

# Go benchmarks (per-request costs, snapshots), then the programs that run a local
# cluster and print tables: the store's commit rate, fio over NBD against
# nbdkit with node RSS, fio on CSI-published file systems against a plain loop
# file, the noisy-neighbour comparison, rebuild speed, the store at scale, and
# the deduplication pass's cost.
bench: deps ## Run the benchmarks and print their tables (never fails on a number)
	go test -run '^$$' -bench . -benchmem ./iosched ./replication/crypt ./replication/replica ./replication/engine ./replication/zfile ./driver/frontend/nbd
	go run ./tests/bench/metabench
	go run ./tests/bench/fiobench
	go run ./tests/bench/fsbench
	go run ./tests/bench/noisybench
	go run ./tests/bench/rebuildbench
	go run ./tests/bench/scalebench
	go run ./tests/bench/spacebench

# The randomized fault campaign (tests/torture/README.md): ROUNDS shuffled
# passes over every fault kind (0: one round of each), SEED for a repeatable
# schedule (empty: from the clock, printed). make test runs one short round
# of each kind (TestTorture).
ROUNDS ?= 5
SEED ?=
torture: deps ## Run the fault campaign: make torture ROUNDS=40 SEED=7 (prints a table per fault kind)
	go run ./tests/torture -rounds $(ROUNDS) $(if $(SEED),-seed $(SEED))

demo: deps build ## Start a local demo cluster with scripts/demo.sh
	./scripts/demo.sh

clean: ## Stop a demo cluster left by make demo, remove bin/ and .demo/
	@if [[ -x bin/cairn && -d .demo ]]; then bin/cairn dev down --dir .demo 2>/dev/null || true; fi
	rm -rf bin .demo
