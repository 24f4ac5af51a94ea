#!/usr/bin/env bash
# Builds the real Vault binary from tools/vault, once. The binary is cached
# outside the clone, keyed by Vault version and a hash of tools/vault, so a
# fresh clone (CI) and later sessions reuse it; bin/vault links to it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/tools/vault"

version=$(grep -oE 'github.com/hashicorp/vault v[0-9][^ ]*' go.mod | head -n 1 | cut -d' ' -f2)
[ -n "$version" ] || { echo "cannot read the Vault version from tools/vault/go.mod" >&2; exit 1; }
hash=$(cat go.mod go.sum main.go | sha256sum | cut -c1-12)
cache_root=${BROKER_VAULT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-plugin-secrets-broker}
dir="$cache_root/vault-$version-$hash"
mkdir -p "$root/bin"

if [ ! -x "$dir/vault" ]; then
  start=$(date +%s)
  echo "==> Building Vault $version from tools/vault (first time only)."
  echo "    This downloads Vault's modules (several GB) and compiles them: expect"
  echo "    10-15 minutes on 2 cores. The result is cached in $dir."
  echo "==> [1/2] downloading modules..."
  go mod download 2>&1 | tail -n 5
  echo "==> [2/2] compiling (a dot per 25 packages)..."
  mkdir -p "$dir"
  # -v names each package as it is built: turn that into progress dots.
  go build -v -trimpath -o "$dir/vault.tmp" . 2>&1 | awk '
    /^(#|go: |[^ ]+\.go:)/ { print; next }
    { n++; if (n % 25 == 0) { printf "."; fflush() } }
    END { if (n) printf "\n    %d packages compiled\n", n }'
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "Vault build failed" >&2; exit 1; }
  mv "$dir/vault.tmp" "$dir/vault"
  echo "==> Vault built in $(( $(date +%s) - start ))s"
fi
ln -sfn "$dir/vault" "$root/bin/vault"
"$root/bin/vault" version
