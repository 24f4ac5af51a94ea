#!/usr/bin/env bash
# make mutation: apply plausible one-line slips to a copy of the tree, one at a
# time, and run the backend's unit suite against each. A slip the suite does
# not fail "survived": some claim has no test that a plausible mistake fails.
#
# The slips are those of issue 24 (eight that once survived) and of the round
# before it (guards only at config write, no write-ahead record before the
# broker call, the record deleted without a store, a backoff that ignores
# Retry-After), plus a few more of the token core's claims and those of the
# rewritten core (state.go, core.go, refresh.go). Each names the literal
# text it replaces: when the code under it moves, the slip reports
# "NOT APPLIED" rather than pass silently; update its text then, so that it
# makes the same mistake in today's code (its comment says which), or, where
# the code no longer makes that decision, the closest one that it does.
#
# Not in CI: 32 slips of a 10-30 s test run each, about 10 minutes on two
# shared cores. Without -race, with -failfast; unchanged packages' results
# come from go's test cache. Exit status 1 if any slip survived (other than
# an equivalent one, which says why it cannot change behaviour) or did not
# apply, 2 if the unchanged tree fails.
#   scripts/mutation.sh            every slip
#   scripts/mutation.sh 24.4 retire   only slips whose id contains one of the words
#
# gremlins (github.com/go-gremlins/gremlins) was tried: it finds 896 runnable
# mutants in backend/ alone (dry run), over two hours at this suite's speed
# on two shared cores, so this short list of plausible slips stands instead.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/broker-mutation.XXXXXX")
trap 'rm -rf "$work"' EXIT
# A copy of the working tree (uncommitted changes included), never the tree
# itself: a slip left behind by an interrupted run harms nothing.
tar -C "$root" --exclude=./.git --exclude=./bin --exclude=./tmp --exclude=./bench-results -cf - . | tar -C "$work" -xf -
pristine="$work.pristine"
mkdir -p "$pristine"
trap 'rm -rf "$work" "$pristine"' EXIT

GO=${GO:-go}
TIMEOUT=${MUTATION_TIMEOUT:-300}
caught=0 survived=0 missing=0 equivalents=0
# equivalent, set just before a slip, says why that slip cannot change
# behaviour: it is then reported as an equivalent survivor, not a failure.
equivalent=
declare -a survivors=() stale=()

selected() {
	local id=$1; shift
	[ ${#filters[@]} -eq 0 ] && return 0
	for f in "${filters[@]}"; do
		case "$id" in *"$f"*) return 0 ;; esac
	done
	return 1
}
filters=("$@")

# slip ID FILE FROM TO: replace the first FROM (literal text, may span lines)
# in FILE with TO, run the suite, restore FILE.
slip() {
	local id=$1 file=$2 from=$3 to=$4
	selected "$id" || return 0
	local path="$work/$file"
	mkdir -p "$pristine/$(dirname "$file")"
	[ -f "$pristine/$file" ] || cp "$path" "$pristine/$file"
	FROM=$from TO=$to perl -0pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$path"
	if cmp -s "$path" "$pristine/$file"; then
		printf '%-34s NOT APPLIED (text not found in %s)\n' "$id" "$file"
		stale+=("$id")
		missing=$((missing + 1))
		return 0
	fi
	local out
	out=$(cd "$work" && timeout "$TIMEOUT" "$GO" test -failfast ./backend/... 2>&1)
	local rc=$?
	cp "$pristine/$file" "$path"
	local why=${equivalent:-}
	equivalent=
	if [ $rc -eq 0 ]; then
		if [ -n "$why" ]; then
			printf '%-34s SURVIVED, equivalent: %s\n' "$id" "$why"
			equivalents=$((equivalents + 1))
		else
			printf '%-34s SURVIVED\n' "$id"
			survivors+=("$id")
			survived=$((survived + 1))
		fi
		return 0
	fi
	if printf '%s\n' "$out" | grep -qE '\[build failed\]|\[setup failed\]|^# '; then
		# A slip that does not compile proves nothing: fix its text.
		printf '%-34s INVALID (does not build: %s)\n' "$id" "$(printf '%s\n' "$out" | grep -m1 -E '\.go:[0-9]+')"
		stale+=("$id")
		missing=$((missing + 1))
		return 0
	fi
	local by
	by=$(printf '%s\n' "$out" | sed -n 's/^--- FAIL: \([^ ]*\).*/\1/p' | sort -u | paste -sd, -)
	if [ -z "$by" ]; then
		if [ $rc -eq 124 ]; then by="(timed out after ${TIMEOUT}s)"; else by="(exit $rc: $(printf '%s\n' "$out" | grep -m1 -E 'panic|FAIL' || true))"; fi
	fi
	printf '%-34s caught by %s\n' "$id" "$by"
	caught=$((caught + 1))
}

echo "mutation: slips against the backend unit suite (copy in $work)"
# The unchanged tree must pass first, or every slip would look caught.
if ! base=$(cd "$work" && timeout "$TIMEOUT" "$GO" test -failfast ./backend/... 2>&1); then
	printf '%s\n' "$base" | grep -E '^(--- FAIL|FAIL|ok )' | head -20
	echo "mutation: the unchanged tree fails its unit suite; fix that first"
	exit 2
fi

# --- issue 24: the eight that survived --------------------------------------
# The endpoint-change test written out by hand with || for &&: an update
# that moves base_url (both CA certs empty) is taken for the same endpoint,
# and the stored secret goes to the new host without being given again.
slip 24.1-endpoint-change-and-or backend/path_config.go \
	'if old == nil || old.sameEndpoint(cfg) {' \
	'if old == nil || old.BaseURL == cfg.BaseURL || old.CACert == cfg.CACert {'
# The same || for && where a config write decides whether the rotated
# secret carries over (carriedRecord): the same environment is taken for
# the same endpoint.
slip rotation-carried-to-new-endpoint backend/core.go \
	'	if !old.sameEndpoint(cfg) {
		return rec
	}' \
	'	if old.Environment != cfg.Environment {
		return rec
	}'
slip 24.2-no-reschedule-after-refresh backend/refresh.go \
	'		b.reschedule(ctx, st.name, b.nextDue(cfg, rec))' \
	'		_ = rec'
slip 24.3-default-body-unlimited backend/upstream/client.go \
	'DefaultMaxBody     = 1 << 20' \
	'DefaultMaxBody     = 1 << 62'
slip 24.4-wildcard-without-dot backend/path_settings.go \
	'strings.HasSuffix(host, "."+suffix)' \
	'strings.HasSuffix(host, suffix)'
slip 24.5-renew-max-ttl-from-now backend/secret_token.go \
	'leaseTTL(boundsFor(cfg, role), spec.DefaultTTL, tok, req.Secret.IssueTime, now)' \
	'leaseTTL(boundsFor(cfg, role), spec.DefaultTTL, tok, now, now)'
slip 24.6-renew-no-token-identity backend/secret_token.go \
	'if fresh.ID != in.tokenID {' \
	'if false && fresh.ID != in.tokenID {'
slip 24.7-invalidate-ignores-token backend/backend.go \
	'for _, p := range []string{configPrefix, tokenPrefix} {' \
	'for _, p := range []string{configPrefix} {'
slip 24.8-scrub-first-only backend/upstream/error.go \
	'strings.ReplaceAll(s, sec, "[redacted]")' \
	'strings.Replace(s, sec, "[redacted]", 1)'

# --- the round before: four that once survived ------------------------------
slip prev-guards-only-at-write-read backend/path_creds.go \
	'	if err := b.checkAllGuards(cfg, role, tok); err != nil {
		return failed(issuing' \
	'	if err := error(nil); err != nil {
		return failed(issuing'
slip prev-guards-only-at-write-renew backend/secret_token.go \
	'	if err := b.checkAllGuards(cfg, role, tok); err != nil {' \
	'	if err := error(nil); err != nil {'
slip prev-no-wal-before-call backend/issue.go \
	'if walID, err = b.putRotationWAL(ctx, name); err != nil {' \
	'if walID, err = "", error(nil); err != nil {'
# finishRefresh takes the record as stored without storing it, and deletes
# the rotation record of a secret only memory holds.
slip prev-record-deleted-without-store backend/refresh.go \
	'werr := writeTokenRecord(ctx, b.storage, st.name, rec)' \
	'werr := error(nil)'
# The store failed: the rotation record is handed to pendingWALs (kept until
# a later store), and this slip also queues it, with the earlier ones, for
# deletion beside the records of stored rotations. (The old slip forced the
# delete condition; today that condition never sees the id of a rotation
# that failed to store, which moved to pendingWALs.)
slip prev-wal-deleted-after-failed-store backend/refresh.go \
	'			st.unstoredLocked(walID)
			walID = ""' \
	'			st.unstoredLocked(walID)
			stale = st.pendingWALs'
slip prev-backoff-ignores-retry-after backend/upstream/client.go \
	'backoff(i, lastErr.RetryAfter, limit)' \
	'backoff(i, 0, limit)'

# --- more of the token core's claims ----------------------------------------
slip retire-not-stored backend/core.go \
	'if err := writeTokenRecord(ctx, s, name, rec); err != nil {' \
	'if err := error(nil); err != nil {'
slip retire-epoch-ignored backend/freshness.go \
	'if !usable(tok, now) || tok.Epoch < r.RetireEpoch {' \
	'if !usable(tok, now) {'
# The delete's order is now the other way round by design (config first:
# a half-done delete leaves a record nothing reads). The mirror slip: the
# token record first, so a delete that fails half way leaves the config
# without its record (a rotated secret in it lost, the spent seed presented
# next).
slip delete-token-before-config backend/core.go \
	'	if err := s.Delete(ctx, configPrefix+name); err != nil {
		return fmt.Errorf("deleting config %q: %w", name, err)
	}' \
	'	if err := s.Delete(ctx, tokenPrefix+name); err != nil {
		return fmt.Errorf("deleting token of %q: %w", name, err)
	}
	if err := s.Delete(ctx, configPrefix+name); err != nil {
		return fmt.Errorf("deleting config %q: %w", name, err)
	}'
# deleteConfig empties memory before storage has agreed: a delete that
# fails leaves the config in storage but gone from memory (known absent),
# and a rotation only memory held (its store failed) is dropped with it.
slip delete-unloads-before-storage backend/core.go \
	'	if err := s.Delete(ctx, configPrefix+name); err != nil {
		return fmt.Errorf("deleting config %q: %w", name, err)
	}
	st.mu.Lock()
	done := st.storedLocked() // moot: the config they covered is gone
	st.unloadLocked()
	st.loaded = true // known absent; a later write starts from nothing
	st.mu.Unlock()' \
	'	st.mu.Lock()
	done := st.storedLocked() // moot: the config they covered is gone
	st.unloadLocked()
	st.loaded = true // known absent; a later write starts from nothing
	st.mu.Unlock()
	if err := s.Delete(ctx, configPrefix+name); err != nil {
		return fmt.Errorf("deleting config %q: %w", name, err)
	}'
slip refresh-point-back-at-a-third backend/freshness.go \
	'refreshLeftNum, refreshLeftDen = 2, 5' \
	'refreshLeftNum, refreshLeftDen = 1, 3'
slip dying-token-handed-out backend/freshness.go \
	'return tok.ExpiresAt.Sub(now) >= minRemaining(tok)' \
	'return tok.ExpiresAt.Sub(now) > 0'
slip lease-max-ttl-past-token-end backend/path_creds.go \
	'if resp.Secret.MaxTTL == 0 || left < resp.Secret.MaxTTL {' \
	'if resp.Secret.MaxTTL == 0 {'
# No longer equivalent: the refresh holds the upstream lock, but an
# invalidation (forgetName) and the next read's load change the generation
# under the owner lock alone, and may load another node's config: without
# the check the refresh's token, obtained under the old secrets, is
# installed under the new config and handed out.
slip stale-refresh-installed backend/refresh.go \
	'current := st.loaded && st.cfg != nil && st.gen == f.gen && ' \
	'current := st.loaded && st.cfg != nil && '
slip no-single-flight backend/refresh.go \
	'	f := sl.flight
	if f == nil {' \
	'	f := sl.flight
	if true {'
slip redirects-followed backend/upstream/client.go \
	'CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },' \
	'CheckRedirect: nil,'
slip allowed-hosts-not-checked-at-mint backend/issue.go \
	'	if !ms.hostAllowed(endpoint, spec.Environments) {' \
	'	if false && !ms.hostAllowed(endpoint, spec.Environments) {'
slip quota-budget-off-by-one backend/quota.go \
	'if mc.Count >= budget {' \
	'if mc.Count > budget {'

# --- the rewritten core's claims --------------------------------------------
# putConfig verifies on the caller's context: a caller that goes away (or
# Vault ending the request at step-down) drops an answer the broker rotated
# for.
slip verify-on-callers-ctx backend/core.go \
	'context.WithTimeout(context.WithoutCancel(ctx), b.refreshTimeout)' \
	'context.WithTimeout(ctx, b.refreshTimeout)'
# Loading rebinds a rotation issued at another endpoint to the config's
# endpoint, instead of dropping it: the secret goes where it was not issued.
slip boundto-adopts-other-endpoint backend/records.go \
	'	if len(r.Rotated) > 0 && r.RotatedAt != key {
		r.Rotated, r.RotatedAt, r.SecretExpiresAt = nil, "", time.Time{}' \
	'	if len(r.Rotated) > 0 && r.RotatedAt != key {
		r.RotatedAt = key'
# A role over a broker that cannot narrow gets a request key of its own: a
# token of its own, refreshed beside the config's, and its guards probed
# against accounts the broker never narrowed to.
slip narrowed-key-without-narrowing backend/roles.go \
	'if role == nil || len(role.AllowedAccounts) == 0 || !b.specs[cfg.Provider].NarrowsAccounts {' \
	'if role == nil || len(role.AllowedAccounts) == 0 {'
# putRole reads its config without the config's owner lock: a delete of the
# config can run between the check and the role's store, leaving a role
# over no config.
slip role-write-without-config-lock backend/core.go \
	'	cs := b.acquire(r.Config)
	defer b.release(cs)
	cs.lockOwner()
	defer cs.owner.Unlock()
	if err := b.loadOwned(ctx, s, cs); err != nil {
		return nil, err
	}' \
	'	cs := b.acquire(r.Config)
	defer b.release(cs)
	if err := b.ensureLoaded(ctx, s, cs); err != nil {
		return nil, err
	}'
# A renew checks that a config of the name exists, not that it is the one
# that issued the lease: a deleted config's leases renew under one written
# again.
slip renew-no-instance-check backend/secret_token.go \
	'if in.configInstance != cfg.Instance {' \
	'if false && in.configInstance != cfg.Instance {'

echo
echo "mutation: $caught caught, $survived survived, $equivalents equivalent (survive by construction), $missing not applied or invalid"
[ ${#survivors[@]} -gt 0 ] && echo "survived: ${survivors[*]}"
[ ${#stale[@]} -gt 0 ] && echo "not applied or invalid (the code moved; update the slip's text): ${stale[*]}"
[ "$survived" -eq 0 ] && [ "$missing" -eq 0 ]
