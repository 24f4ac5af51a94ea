# The two commands a newcomer needs:
#   make dev    a dev Vault with the plugin and the broker sandbox, ready for
#               `vault read broker/creds/finam` (Ctrl-C stops it all)
#   make test   formatting, vet, unit tests and end-to-end tests on real Vault

VERSION ?= v0.1.0
GO      ?= go
PLUGIN  := vault-plugin-secrets-broker
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build plugin sandbox vault dev test check unit e2e clean

build: plugin sandbox

plugin:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/plugins/$(PLUGIN) ./cmd/$(PLUGIN)

sandbox:
	$(GO) build -trimpath -o bin/broker-sandbox ./cmd/broker-sandbox

# The real Vault binary, built once from tools/vault and cached outside the clone.
vault:
	@scripts/build-vault.sh

dev: build vault
	@VERSION=$(VERSION) exec scripts/dev.sh

test: check unit e2e

check:
	@unformatted=$$(gofmt -l backend cmd internal scripts tools); \
	  if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 ./backend/... ./cmd/... ./internal/sandbox/...

e2e: vault
	VAULT_BIN=$(CURDIR)/bin/vault $(GO) test -count=1 -timeout 30m ./internal/e2e/... ./internal/vaulttest/... ./internal/bench/...

clean:
	rm -rf bin tmp dist

# Release artifacts (docs/install.md): a static binary, a zip per
# linux/darwin and amd64/arm64, and SHA256SUMS, in dist/. The version is
# stamped into the binary, so it must be given.
# release-check (CI): builds twice, the second time with an empty build
# cache, and fails unless SHA256SUMS are identical; two targets (one per OS,
# one per arch) keep it to a few minutes.
.PHONY: release release-check
release:
	@if [ "$(origin VERSION)" = file ]; then echo "make release needs VERSION=vX.Y.Z"; exit 1; fi
	$(GO) run ./tools/release -version $(VERSION) -out dist
release-check:
	$(GO) run ./tools/release -version $(VERSION) -check -targets linux/amd64,darwin/arm64

# Benchmarks (docs/performance.md): real Vault with the plugin and the sandbox,
# against Vault's built-in kv-v2 and HashiCorp's kv as an external plugin.
# bench: the full run (~16 min), exits 1 when a target is missed; a run of a
#        clean tree is kept as docs/bench/latest.json
# bench-readme: README.md's performance section from docs/bench/latest.json
#        (refuses a run of a dirty tree)
# bench-quick: the CI regression guard (<2 min)
.PHONY: bench bench-readme bench-quick
bench: vault
	@scripts/build-kvplugin.sh
	$(GO) run ./internal/bench -strict -out bench-results -latest docs/bench/latest.json
bench-readme:
	$(GO) run ./internal/bench -readme docs/bench/latest.json
bench-quick: vault
	@scripts/build-kvplugin.sh
	$(GO) run ./internal/bench -quick -out bench-results

# Plausible one-line slips applied one at a time to a copy of the tree, each
# run against the backend unit suite: prints caught/survived per slip
# (scripts/mutation.sh; several minutes, not in CI).
.PHONY: mutation
mutation:
	@scripts/mutation.sh

# A short fuzz run of every parser of untrusted input (CI); longer: FUZZTIME=60s scripts/fuzz.sh
.PHONY: fuzz-quick
fuzz-quick:
	FUZZTIME=3s scripts/fuzz.sh
