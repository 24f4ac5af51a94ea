#!/usr/bin/env bash
# `make dev`: the sandbox and a dev Vault with the plugin registered through
# the catalog and mounted at broker/, config/finam, config/bcs and config/alor
# written against the sandbox, and one role (roles/scalper: the ALOR secret
# narrowed to one portfolio). Ctrl-C stops everything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

VERSION=${VERSION:-v0.1.0}
VAULT_PORT=${VAULT_PORT:-8200}
SANDBOX_ADDR=${SANDBOX_ADDR:-127.0.0.1:9400}
plugin=vault-plugin-secrets-broker
work="$root/tmp/dev"
mkdir -p "$work"
export VAULT_ADDR="http://127.0.0.1:$VAULT_PORT" VAULT_TOKEN=root

pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
# A stop the user asked for (Ctrl-C, a kill) says so and exits 0.
stopped() { # why
  trap - INT TERM EXIT
  echo
  step "Stopped ($1): stopping Vault and the sandbox"
  stop_all
  step "Stopped."
  exit 0
}
trap 'stopped Ctrl-C' INT
trap 'stopped "SIGTERM"' TERM
# Anything else that ends the script (a failed step) stops what it started;
# fail has said why.
trap 'status=$?; trap - EXIT; stop_all; exit "$status"' EXIT

step() { printf '==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }
wait_http() { # url what log
  for _ in $(seq 1 150); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  tail -n 30 "$3" >&2 || true
  fail "$2 did not start (log: $3)"
}

step "Starting the broker sandbox on $SANDBOX_ADDR (log: tmp/dev/sandbox.log)"
bin/broker-sandbox -addr "$SANDBOX_ADDR" >"$work/sandbox.log" 2>&1 &
pids+=($!)
wait_http "http://$SANDBOX_ADDR/_sandbox/calls" "the sandbox" "$work/sandbox.log"

step "Starting a Vault dev server on $VAULT_ADDR (log: tmp/dev/vault.log)"
printf 'plugin_directory = "%s"\n' "$root/bin/plugins" >"$work/vault.hcl"
bin/vault server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$VAULT_PORT" \
  -config="$work/vault.hcl" >"$work/vault.log" 2>&1 &
pids+=($!)
wait_http "$VAULT_ADDR/v1/sys/health" "Vault" "$work/vault.log"

step "Registering $plugin $VERSION in the plugin catalog"
sha=$(sha256sum "bin/plugins/$plugin" | cut -d' ' -f1)
bin/vault plugin register -sha256="$sha" -version="$VERSION" secret "$plugin" >/dev/null
bin/vault secrets enable -path=broker "$plugin" >/dev/null

step "Writing broker/config/finam against the sandbox"
bin/vault write broker/config/finam provider=finam secret=sandbox-finam-secret \
  base_url="http://$SANDBOX_ADDR" >/dev/null

step "Writing broker/config/bcs against the sandbox (a read-only BCS token the sandbox issued)"
# BCS tokens are JWTs that expire, so the sandbox issues one (as the web
# terminal would) instead of a fixed string.
bcs_token=$(curl -fsS -XPOST "http://$SANDBOX_ADDR/_sandbox/bcs/tokens" -d '{"readonly":true}' |
  sed -n 's/.*"refresh_token":"\([^"]*\)".*/\1/p')
[ -n "$bcs_token" ] || fail "the sandbox issued no BCS token"
bin/vault write broker/config/bcs provider=bcs refresh_token="$bcs_token" \
  base_url="http://$SANDBOX_ADDR" require_readonly=true allowed_accounts=400123 >/dev/null
unset bcs_token

step "Writing broker/config/alor and the role broker/roles/scalper (portfolio D12345 only)"
# The sandbox's ALOR refresh token reaches D12345, D67890 and G11111; the
# role's bots get a JWT ALOR narrows to D12345.
bin/vault write broker/config/alor provider=alor refresh_token=sandbox-alor-refresh \
  base_url="http://$SANDBOX_ADDR" >/dev/null
bin/vault write broker/roles/scalper config=alor allowed_accounts=D12345 ttl=10m >/dev/null

cat <<BANNER

  Ready. Vault $(bin/vault version | awk '{print $2}' | tr -d ,) with $plugin $VERSION, mounted at broker/.

  In another shell:

    export VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=root
    export PATH="$root/bin:\$PATH"

    vault read broker/creds/finam          # a short-lived Finam JWT, as a lease
    vault read broker/creds/bcs            # a 24 h BCS access token (read-only, account 400123)
    vault read broker/creds/alor           # an ALOR JWT reaching D12345, D67890 and G11111
    vault read broker/creds/scalper        # role "scalper" over config alor: a JWT reaching D12345 only
    vault read broker/roles/scalper        # the role, and what its token reaches
    vault read broker/config/finam         # settings and status, never the secret
    vault lease revoke <lease_id>          # ends that lease; other readers keep the token
    vault write -f broker/config/finam/retire   # incident switch: the next read mints anew
    curl -s http://$SANDBOX_ADDR/_sandbox/calls   # upstream calls the sandbox saw

  Ctrl-C stops Vault and the sandbox.

BANNER
status=0
wait -n "${pids[@]}" || status=$?
# Vault and the sandbox exit 0 (or die of the signal) only when told to
# stop: Ctrl-C reaches them too, and reaches this script's trap only when
# SIGINT was not ignored at its start (a terminal; not a background job).
case $status in
  0 | 130 | 143) stopped "Vault or the sandbox was told to stop" ;;
esac
fail "Vault or the sandbox exited with status $status; see tmp/dev/*.log"
