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

// flight is the one refresh of one of a config's tokens under way; every
// reader that needs that token waits on it.
type flight struct {
	gen  uint64
	req  tokenRequest
	done chan struct{}
	tok  *storedToken
	err  error
	// stale: the config changed before the refresh could start; the waiter
	// looks again.
	stale bool
	// waiters counts callers waiting on done (tests observe sharing).
	waiters atomic.Int32
}

// slot is the refresh bookkeeping of one of a config's tokens: the refresh
// under way and the backoff after failures.
type slot struct {
	flight *flight
	// failErr is returned without calling the broker until failUntil.
	failErr   error
	failUntil time.Time
	// background refresh backoff after failures.
	failures  int
	nextRetry time.Time
}

// slotLocked is the bookkeeping of req's token; st.mu must be held.
func (st *configState) slotLocked(req tokenRequest) *slot {
	if req.key == "" {
		return &st.own
	}
	if st.narrowed == nil {
		st.narrowed = map[string]*slot{}
	}
	sl := st.narrowed[req.key]
	if sl == nil {
		sl = &slot{}
		st.narrowed[req.key] = sl
	}
	return sl
}

// currentToken returns the config and a token to hand out. A valid cached
// token is returned at once (starting a background refresh when it is due);
// otherwise every concurrent caller waits on one single refresh.
func (b *backend) currentToken(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, name, nil, false, false)
}

// roleToken is currentToken for a role: the token its config asks the
// broker for on the role's behalf (see requestFor).
func (b *backend) roleToken(ctx context.Context, s logical.Storage, r *roleEntry) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, r.Config, r, false, false)
}

// refreshNow asks the broker again, for a caller that needs its word now (a
// passthrough renew, rotate-root, keep-alive, rotation recovery): it joins
// the refresh under way or starts one; it never returns the cached token.
func (b *backend) refreshNow(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, name, nil, true, false)
}

// refreshInBackground is refreshNow for work nobody waits on (keep-alive,
// rotation recovery): the broker's rate-limit waits are honoured in full
// rather than failed fast.
func (b *backend) refreshInBackground(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.token(ctx, s, name, nil, true, true)
}

// maxStaleRetries: how many times a reader looks again after the refresh
// it waited on turned out stale (the config changed or was retired while
// it ran). Each look is a new refresh under the new settings; a config
// rewritten three times during one read is left for the caller to retry.
const maxStaleRetries = 2

func (b *backend) token(ctx context.Context, s logical.Storage, name string, role *roleEntry, fresh, background bool) (*brokerConfig, *storedToken, error) {
	for attempt := 0; ; attempt++ {
		cfg, tok, stale, err := b.tokenOnce(ctx, s, name, role, fresh, background)
		if err != nil || !stale {
			return cfg, tok, err
		}
		if attempt == maxStaleRetries {
			return nil, nil, fmt.Errorf("config %q changed while its token was being refreshed; read again", name)
		}
		if role != nil {
			// The role may have been deleted or changed meanwhile.
			if role, err = b.roleFor(ctx, s, role.Name); err != nil {
				return nil, nil, err
			}
			if role == nil || role.Config != name {
				return nil, nil, errConfigNotFound
			}
		}
	}
}

func (b *backend) tokenOnce(ctx context.Context, s logical.Storage, name string, role *roleEntry, fresh, background bool) (*brokerConfig, *storedToken, bool, error) {
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
	req := b.requestFor(cfg, role)
	keys := st.credsCounts(role)
	now := b.now()
	if tok := st.rec.tokenOf(req.key); !fresh && st.rec.servable(tok, now) {
		b.refreshAheadLocked(st, req, now)
		st.mu.Unlock()
		keys.hit.Add(1)
		return cfg, tok, false, nil
	}
	if !fresh {
		keys.miss.Add(1)
	}
	sl := st.slotLocked(req)
	if !fresh && sl.failErr != nil && now.Before(sl.failUntil) {
		err := sl.failErr
		st.mu.Unlock()
		return nil, nil, false, err
	}
	f := sl.flight
	if f == nil {
		if !b.canRotate(cfg) {
			// A performance standby cannot store a rotated secret: Vault
			// forwards the request to the active node on this error.
			st.mu.Unlock()
			return nil, nil, false, logical.ErrReadOnly
		}
		if f = b.startRefreshLocked(st, req, background); f == nil {
			st.mu.Unlock()
			return nil, nil, false, errClosing
		}
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

// nudgeRefresh starts the refresh ahead of a token that is due, without
// waiting for it; it never refreshes a token nobody has read.
func (b *backend) nudgeRefresh(ctx context.Context, s logical.Storage, name string, role *roleEntry) {
	st := b.acquire(name)
	defer b.release(st)
	if b.ensureLoaded(ctx, s, st) != nil {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.cfg == nil {
		return
	}
	req := b.requestFor(st.cfg, role)
	if now := b.now(); st.rec.servable(st.rec.tokenOf(req.key), now) {
		b.refreshAheadLocked(st, req, now)
	}
}

// refreshAheadLocked starts the background refresh of req's servable token
// when it is due, none runs and no failure backoff holds; st.mu must be
// held. Readers keep the current token: nobody waits on it.
func (b *backend) refreshAheadLocked(st *configState, req tokenRequest, now time.Time) {
	sl := st.slotLocked(req)
	if dueForRefresh(st.rec.tokenOf(req.key), now) && sl.flight == nil && !now.Before(sl.nextRetry) && b.canRotate(st.cfg) && !b.closing.Load() {
		b.startRefreshLocked(st, req, true)
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
	_, rec, err := b.view(ctx, s, name)
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
func (b *backend) startRefreshLocked(st *configState, req tokenRequest, background bool) *flight {
	// Counted under lifeMu, so that cleanup's wait sees every refresh that
	// starts before it begins, and none starts after.
	b.lifeMu.Lock()
	defer b.lifeMu.Unlock()
	if b.closing.Load() {
		return nil
	}
	f := &flight{gen: st.gen, req: req, done: make(chan struct{})}
	st.slotLocked(req).flight = f
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
		if sl := st.slotLocked(f.req); sl.flight == f {
			sl.flight = nil
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
	m, walID, err := b.issue(ctx, st.name, cfg, client, secrets, f.req.accountsOr(cfg), epoch)
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
	// Current: same config generation, and the request still has its slot
	// (a role deleted meanwhile took its narrowed slot away).
	current := st.loaded && st.cfg != nil && st.gen == f.gen && (f.req.key == "" || st.narrowed[f.req.key] != nil && st.narrowed[f.req.key].flight == f)
	prev := st.rec
	st.mu.Unlock()

	rotated := m != nil && len(m.rotated) > 0
	rec := prev
	persisted := false
	var stale []string // rotation records of rotations now stored
	if current {
		if m != nil {
			rec = rec.with(cfg, f.req.key, m, now)
		}
		switch {
		case err != nil:
			rec.LastError, rec.LastErrorAt = err.Error(), now
			if rejectedSecret(err) {
				// The broker refused the long-lived secret itself (revoked,
				// expired): tokens from it are dead or about to be, so none
				// is handed out any more.
				rec.Token, rec.Narrowed = nil, nil
			}
		default:
			rec.ConfigHash = cfg.upstreamHash()
			if m.tok.Epoch < prev.RetireEpoch {
				// Retired while in flight: keep what it rotated, never
				// the token.
				rec = rec.withToken(f.req.key, prev.tokenOf(f.req.key))
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
			stale = st.storedLocked()
		case rotated || st.unstored:
			// Kept in memory with its rotation record: stored by the next
			// refresh, or at unload.
			st.unstoredLocked(walID)
			walID = ""
			b.logUnstoredRotation(st.name, werr)
		}
		sl := st.slotLocked(f.req)
		if err != nil {
			sl.failures++
			sl.nextRetry = now.Add(min(refreshBackoff<<min(sl.failures-1, 8), maxRefreshBackoff))
			if !rec.servable(rec.tokenOf(f.req.key), now) && !errors.Is(err, logical.ErrReadOnly) {
				sl.failErr, sl.failUntil = err, now.Add(failFastFor)
			}
		} else {
			sl.failures, sl.nextRetry, sl.failErr = 0, time.Time{}, nil
		}
		st.mu.Unlock()
		// Under the owner: a delete cannot slip in and be undone. A failed
		// refresh is rescheduled too, to its retry.
		b.reschedule(ctx, st.name, b.nextDue(cfg, rec))
	} else if rotated {
		b.Logger().Info("discarding a rotation of a config deleted or changed while it ran", "config", st.name)
	}
	st.mu.Lock()
	if f.req.key == "" && st.own.flight == f {
		st.own.flight = nil
	} else if sl := st.narrowed[f.req.key]; f.req.key != "" && sl != nil && sl.flight == f {
		sl.flight = nil
	}
	st.mu.Unlock()
	st.owner.Unlock()
	if !current {
		f.stale = true // its waiters look again, under what holds now
	}

	if persisted || !current || !rotated {
		b.deleteRotationWALs(ctx, walID) // stored, moot, or nothing rotated
	}
	b.deleteRotationWALs(ctx, stale...)
	// Counted only for a config that still exists: a deleted one's series
	// are gone and must not come back.
	if err != nil {
		if current {
			st.counts.refreshErr.Add(1)
		}
		b.Logger().Warn("token refresh failed", "config", st.name, "error", err)
	} else {
		if current {
			st.counts.refreshOK.Add(1)
		}
		b.Logger().Debug("token refreshed", "config", st.name, "expires_at", m.tok.ExpiresAt)
		if w := cfg.expiryWarning(now); w != "" {
			b.Logger().Warn(w, "config", st.name)
		}
		f.tok = m.tok
	}
	if rotated && current {
		st.counts.rotate.Add(1)
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

// with returns the record after a refresh of key's token under cfg: the
// new token (none when the refresh failed after rotating), the rotated
// secrets merged in and bound to cfg's endpoint, the error cleared.
func (r tokenRecord) with(cfg *brokerConfig, key string, m *refreshed, now time.Time) tokenRecord {
	out := r
	if m.tok != nil {
		out = out.withToken(key, m.tok)
		out.LastRefresh, out.LastError, out.LastErrorAt = now, "", time.Time{}
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
