#!/usr/bin/env bash
# Builds HashiCorp's kv secrets engine as an external plugin binary from
# tools/kvplugin, once: the benchmark's floor (internal/bench registers it
# through the plugin catalog like the broker plugin). The binary is cached
# outside the clone, keyed by the kv version and a hash of tools/kvplugin,
# like scripts/build-vault.sh does for Vault; bin/vault-plugin-secrets-kv
# links to it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/tools/kvplugin"

version=$(grep -oE 'github.com/hashicorp/vault-plugin-secrets-kv v[0-9][^ ]*' go.mod | head -n 1 | cut -d' ' -f2)
[ -n "$version" ] || { echo "cannot read the kv plugin version from tools/kvplugin/go.mod" >&2; exit 1; }
hash=$(cat go.mod go.sum main.go | sha256sum | cut -c1-12)
cache_root=${BROKER_VAULT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vault-plugin-secrets-broker}
dir="$cache_root/kvplugin-$version-$hash"
mkdir -p "$root/bin"

if [ ! -x "$dir/vault-plugin-secrets-kv" ]; then
  start=$(date +%s)
  echo "==> Building vault-plugin-secrets-kv $version from tools/kvplugin (first time only, under a minute)."
  mkdir -p "$dir"
  go build -trimpath -o "$dir/vault-plugin-secrets-kv.tmp" .
  mv "$dir/vault-plugin-secrets-kv.tmp" "$dir/vault-plugin-secrets-kv"
  echo "==> Built in $(( $(date +%s) - start ))s: $dir"
fi
ln -sfn "$dir/vault-plugin-secrets-kv" "$root/bin/vault-plugin-secrets-kv"
echo "vault-plugin-secrets-kv $version ($(sha256sum "$dir/vault-plugin-secrets-kv" | cut -c1-12)) -> bin/vault-plugin-secrets-kv"
