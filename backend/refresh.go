package backend

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

const (
	// defaultRefreshTimeout bounds one broker call, whoever waits on it.
	defaultRefreshTimeout = 30 * time.Second
	// persistTimeout bounds storing what the broker answered. It runs on a
	// context that survives the backend's cleanup: a rotation the broker has
	// applied is gone for good if it is dropped here.
	persistTimeout = 10 * time.Second
)

// flight is the one refresh of a config under way; every reader that needs a
// token waits on it.
type flight struct {
	gen  uint64
	done chan struct{}
	tok  *storedToken
	err  error
	// stale: the config changed before the refresh could start; the waiter
	// looks again.
	stale bool
	// waiters counts callers waiting on done (tests observe sharing).
	waiters atomic.Int32
}

// currentToken returns the config and a token to hand out. A valid cached
// token is returned at once (starting a background refresh when it is due);
// otherwise every concurrent caller waits on one single refresh.
func (b *backend) currentToken(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, name, false, false)
}

// refreshNow asks the broker again, for a caller that needs its word now (a
// passthrough renew, rotate-root, keep-alive, rotation recovery): it joins
// the refresh under way or starts one; it never returns the cached token.
func (b *backend) refreshNow(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, name, true, false)
}

// refreshInBackground is refreshNow for work nobody waits on (keep-alive,
// rotation recovery): the broker's rate-limit waits are honoured in full
// rather than failed fast.
func (b *backend) refreshInBackground(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, name, true, true)
}

func (b *backend) token(ctx context.Context, s logical.Storage, name string, fresh, background bool) (*brokerConfig, *storedToken, error) {
	// A refresh that was under way when the config changed or its tokens were
	// retired yields a token no reader may get: wait for the next one.
	for attempt := 0; ; attempt++ {
		cfg, tok, stale, err := b.tokenOnce(ctx, s, name, fresh, background)
		if err != nil || !stale {
			return cfg, tok, err
		}
		if attempt == 2 {
			return nil, nil, fmt.Errorf("config %q changed while its token was being refreshed; read again", name)
		}
	}
}

func (b *backend) tokenOnce(ctx context.Context, s logical.Storage, name string, fresh, background bool) (*brokerConfig, *storedToken, bool, error) {
	st := b.acquire(name)
	defer b.release(st)
	if err := b.ensureLoaded(ctx, s, st); err != nil {
		return nil, nil, false, err
	}
	st.mu.Lock()
	cfg := st.cfg
	if !st.loaded {
		st.mu.Unlock()
		return nil, nil, true, nil // invalidated meanwhile: look again
	}
	if cfg == nil {
		st.mu.Unlock()
		return nil, nil, false, errConfigNotFound
	}
	now := b.now()
	if tok := st.rec.Token; !fresh && st.rec.servable(tok, now) {
		b.refreshAheadLocked(st, now)
		st.mu.Unlock()
		st.keys(b.metrics).hit.Inc()
		return cfg, tok, false, nil
	}
	if !fresh {
		st.keys(b.metrics).miss.Inc()
	}
	if !fresh && st.failErr != nil && now.Before(st.failUntil) {
		err := st.failErr
		st.mu.Unlock()
		return nil, nil, false, err
	}
	f := st.flight
	if f == nil {
		if !b.canRotate(cfg) {
			// A performance standby cannot store a rotated secret: Vault
			// forwards the request to the active node on this error.
			st.mu.Unlock()
			return nil, nil, false, logical.ErrReadOnly
		}
		if b.closing.Load() {
			st.mu.Unlock()
			return nil, nil, false, errClosing
		}
		f = b.startRefreshLocked(st, background)
	}
	f.waiters.Add(1)
	st.mu.Unlock()

	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, nil, false, fmt.Errorf("waiting for %s token of %q: %w", cfg.Provider, name, ctx.Err())
	}
	if f.stale {
		return nil, nil, true, nil
	}
	if f.err != nil {
		return nil, nil, false, f.err
	}
	st.mu.Lock()
	stale := !st.loaded || st.cfg == nil || st.gen != f.gen || !st.rec.servable(f.tok, b.now())
	cfg = st.cfg
	st.mu.Unlock()
	return cfg, f.tok, stale, nil
}

// nudgeRefresh starts the refresh ahead of a config whose token is due,
// without waiting for it; it never refreshes a config with no token.
func (b *backend) nudgeRefresh(ctx context.Context, s logical.Storage, name string) {
	st := b.acquire(name)
	defer b.release(st)
	if b.ensureLoaded(ctx, s, st) != nil {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if now := b.now(); st.cfg != nil && st.rec.servable(st.rec.Token, now) {
		b.refreshAheadLocked(st, now)
	}
}

// refreshAheadLocked starts the background refresh of st's servable token
// when it is due, none runs and no failure backoff holds; st.mu must be
// held. Readers keep the current token: nobody waits on it.
func (b *backend) refreshAheadLocked(st *configState, now time.Time) {
	if dueForRefresh(st.rec.Token, now) && st.flight == nil && !now.Before(st.nextRetry) && b.canRotate(st.cfg) && !b.closing.Load() {
		b.startRefreshLocked(st, true)
	}
}

// canRotate reports whether this node may run a refresh of cfg: one that
// rotates the long-lived secret must be stored, which only a node that can
// write may do.
func (b *backend) canRotate(cfg *brokerConfig) bool {
	return !b.rotates(cfg) || b.canWrite()
}

// canWrite reports whether this node's writes are its own to make.
func (b *backend) canWrite() bool {
	return b.System() == nil || b.WriteSafeReplicationState()
}

// staleWarning says, when the last refresh of a config failed, that the
// token served is the cached one and why it was not replaced.
func (b *backend) staleWarning(ctx context.Context, s logical.Storage, name string) string {
	_, rec, err := b.status(ctx, s, name)
	if err != nil || rec.Token == nil || !rec.LastErrorAt.After(rec.LastRefresh) {
		return ""
	}
	until := "until revalidated"
	if !rec.Token.ExpiresAt.IsZero() {
		until = "until " + formatTime(rec.Token.ExpiresAt)
	}
	return fmt.Sprintf("serving the cached token (valid %s): the last refresh at %s failed: %s", until, formatTime(rec.LastErrorAt), rec.LastError)
}

// startRefreshLocked starts the single refresh of st; st.mu must be held. The refresh
// runs on the backend's context, not the reader's: a reader that gives up
// does not abort the refresh others are waiting on.
// background: nobody waits on it, so the broker's rate-limit waits are
// honoured in full instead of failing fast.
func (b *backend) startRefreshLocked(st *configState, background bool) *flight {
	f := &flight{gen: st.gen, done: make(chan struct{})}
	st.flight = f
	st.refs.Add(1) // the refresh uses the state until it is installed
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		defer b.release(st)
		b.runRefresh(st, f, background)
	}()
	return f
}

// runRefresh obtains a token and stores the outcome before anyone uses it: a
// rotated long-lived secret (Spec.RotatesSecret) must be in storage before the token it
// came with is handed out, and a write-ahead record covers the moment
// between the broker rotating it and that write.
func (b *backend) runRefresh(st *configState, f *flight, background bool) {
	st.lockUpstream()
	defer st.upstream.Unlock()

	st.mu.Lock()
	if !st.loaded || st.gen != f.gen || st.cfg == nil {
		// The config changed while this refresh waited its turn: whoever
		// changed it installed what readers need.
		if st.flight == f {
			st.flight = nil
		}
		st.mu.Unlock()
		f.stale = true
		close(f.done)
		return
	}
	cfg, client := st.cfg, st.client
	secrets := effectiveSecrets(cfg, st.rec)
	epoch := st.rec.RetireEpoch
	st.mu.Unlock()

	ctx, cancel := context.WithTimeout(b.ctx, b.refreshTimeout)
	if background {
		ctx = upstream.WithBackground(ctx)
	}
	m, walID, err := b.issue(ctx, st.name, cfg, client, secrets, epoch)
	cancel()

	// What the broker answered is stored even if the backend is being
	// unloaded or sealed: a rotation it applied cannot be asked for again.
	pctx, pcancel := context.WithTimeout(context.WithoutCancel(b.ctx), persistTimeout)
	defer pcancel()
	b.finishRefresh(pctx, st, cfg, f, m, err, walID)
}

// finishRefresh persists and installs a refresh's outcome as one step of the
// name's owner, re-checking the config's generation and retirement against
// the current record, then releases waiters. A secret the broker rotated is
// kept even when the refresh failed otherwise (provider.RotatedError).
func (b *backend) finishRefresh(ctx context.Context, st *configState, cfg *brokerConfig, f *flight, m *refreshed, err error, walID string) {
	now := b.now()
	st.lockOwner()
	st.mu.Lock()
	current := st.loaded && st.cfg != nil && st.gen == f.gen
	prev, pending := st.rec, st.pendingWAL
	st.mu.Unlock()

	rotated := m != nil && len(m.rotated) > 0
	rec := prev
	persisted := false
	if current {
		if m != nil {
			rec = rec.with(cfg, m, now)
		}
		switch {
		case err != nil:
			rec.LastError, rec.LastErrorAt = err.Error(), now
			if rejectedSecret(err) {
				// The broker refused the long-lived secret itself (revoked,
				// expired): tokens from it are dead or about to be, so none
				// is handed out any more.
				rec.Token = nil
			}
		default:
			rec.ConfigHash = cfg.upstreamHash()
			if m.tok.Epoch < prev.RetireEpoch {
				// Retired while in flight: keep what it rotated, never
				// the token.
				rec.Token = prev.Token
			}
		}
		// Store first, install second: a reader never gets a token whose
		// rotated secret could still be lost.
		werr := writeTokenRecord(ctx, b.storage, st.name, rec)
		if werr != nil {
			b.Logger().Warn("could not persist the token record; a restart will refresh again", "config", st.name, "error", werr)
		}
		persisted = werr == nil
		st.mu.Lock()
		st.rec = rec
		switch {
		case persisted:
			st.unstored, st.pendingWAL = false, ""
		case rotated || st.unstored:
			// Kept in memory with its rotation record: stored by the next
			// refresh, or at unload.
			st.unstored = true
			if walID != "" {
				st.pendingWAL = walID
			}
			b.Logger().Error("could not store a rotated secret; it is kept in memory and stored with the next refresh or at unload", "config", st.name, "error", werr)
		}
		if err != nil {
			st.failures++
			st.nextRetry = now.Add(min(refreshBackoff<<min(st.failures-1, 8), maxRefreshBackoff))
			if !rec.servable(rec.Token, now) && !errors.Is(err, logical.ErrReadOnly) {
				st.failErr, st.failUntil = err, now.Add(failFastFor)
			}
		} else {
			st.failures, st.nextRetry, st.failErr = 0, time.Time{}, nil
		}
		st.mu.Unlock()
		// Under the owner: a delete cannot slip in and be undone. A failed
		// refresh is rescheduled too, to its retry.
		b.reschedule(ctx, st.name, b.nextDue(cfg, rec))
	} else if rotated {
		b.Logger().Info("discarding a rotation of a config deleted or changed while it ran", "config", st.name)
	}
	st.mu.Lock()
	if st.flight == f {
		st.flight = nil
	}
	st.mu.Unlock()
	st.owner.Unlock()

	if walID != "" && (persisted || !current) {
		b.deleteRotationWAL(ctx, walID)
	}
	if pending != "" && persisted {
		b.deleteRotationWAL(ctx, pending) // the rotation it covered is stored now
	}
	if err != nil {
		st.keys(b.metrics).refreshErr.Inc()
		b.Logger().Warn("token refresh failed", "config", st.name, "error", err)
	} else {
		st.keys(b.metrics).refreshOK.Inc()
		b.Logger().Debug("token refreshed", "config", st.name, "expires_at", m.tok.ExpiresAt)
		if w := cfg.expiryWarning(now); w != "" {
			b.Logger().Warn(w, "config", st.name)
		}
		f.tok = m.tok
	}
	if rotated && current {
		st.keys(b.metrics).rotation.Inc()
	}
	f.err = err
	close(f.done)
}

// refreshed is one successful Issue: the token and what it changed upstream.
type refreshed struct {
	tok             *storedToken
	rotated         map[string]string
	secretExpiresAt time.Time
}

// with returns the record after a refresh under cfg: the new token (none
// when the refresh failed after rotating), the rotated secrets merged in and
// bound to cfg's endpoint, the error cleared.
func (r tokenRecord) with(cfg *brokerConfig, m *refreshed, now time.Time) tokenRecord {
	out := tokenRecord{Token: m.tok, LastRefresh: now, SecretExpiresAt: r.SecretExpiresAt, Rotated: r.Rotated, RotatedAt: r.RotatedAt,
		RetiredBefore: r.RetiredBefore, RetireEpoch: r.RetireEpoch, ConfigHash: r.ConfigHash, Prior: r.Prior}
	if m.tok == nil {
		// Only the rotation is new: the token, the last good refresh and
		// the error stay the caller's to set.
		out.Token, out.LastRefresh, out.LastError, out.LastErrorAt = r.Token, r.LastRefresh, r.LastError, r.LastErrorAt
	}
	if len(m.rotated) > 0 {
		out.Rotated = maps.Clone(r.Rotated)
		if out.Rotated == nil || out.RotatedAt != cfg.endpointKey() {
			out.Rotated = map[string]string{}
		}
		maps.Copy(out.Rotated, m.rotated)
		out.RotatedAt = cfg.endpointKey()
	}
	// An answer that did not say when the rotated secret expires keeps the
	// old date: earlier than the new one's, so the next rotation comes
	// early rather than never.
	if !m.secretExpiresAt.IsZero() {
		out.SecretExpiresAt = m.secretExpiresAt
	}
	return out
}

// effectiveSecrets are the config's secrets with the broker's rotations on
// top, where the broker at cfg's endpoint issued them: after a rotating
// refresh, the stored refresh token is the new one.
func effectiveSecrets(cfg *brokerConfig, rec tokenRecord) map[string]string {
	if len(rec.Rotated) == 0 || rec.RotatedAt != cfg.endpointKey() {
		return cfg.Secrets
	}
	out := maps.Clone(cfg.Secrets)
	if out == nil {
		out = map[string]string{}
	}
	maps.Copy(out, rec.Rotated)
	return out
}
