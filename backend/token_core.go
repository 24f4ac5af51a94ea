package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Token core timing. Lifetimes come from the broker; these are fractions of
// them, so they hold for a 15-minute Finam JWT and a 24-hour ChatApp token.
const (
	// A token is refreshed in the background once a third of its life is left.
	refreshAtFraction = 3
	// A token with less than min(60 s, a sixth of its life) left is never
	// handed out: the reader would get a token that dies in its hands.
	minRemainingCap      = 60 * time.Second
	minRemainingFraction = 6
	// After a failed mint with no usable token, reads fail fast with the
	// broker's error for this long instead of piling up on a failing broker.
	failFastFor = 5 * time.Second
	// Background refresh retries back off from this to maxRefreshBackoff.
	refreshBackoff    = 5 * time.Second
	maxRefreshBackoff = 2 * time.Minute
	// mintTimeout bounds one mint, whoever waits on it.
	mintTimeout = 30 * time.Second

	// Passthrough tokens (T-Invest) carry no expiry. A validation is reused
	// for reads up to passthroughMaxAge, revalidated in the background once
	// older than passthroughRevalidate; a renew wants one no older than
	// renewMaxAge. Many leases renewing at once share one validation, which
	// keeps a config far under T-Invest's 100 requests a minute.
	passthroughMaxAge     = 15 * time.Minute
	passthroughRevalidate = time.Minute
	renewMaxAge           = time.Minute
)

var (
	errConfigNotFound = errors.New("config not found")
	// errSecretExpired: the operator-declared expiry of the long-lived
	// secret has passed; the plugin will not use it.
	errSecretExpired = errors.New("long-lived secret expired")
)

// configState is the in-memory state of one config: its settings, its HTTP
// client and its current token, shared by every reader.
type configState struct {
	name  string
	mkeys atomic.Pointer[metricKeys]

	mu     sync.Mutex
	loaded bool
	cfg    *brokerConfig
	client *upstream.Client
	rec    tokenRecord
	// gen changes whenever the config changes, so a mint started under the
	// old settings is not installed.
	gen    uint64
	flight *flight
	// failErr is returned without calling the broker until failUntil.
	failErr   error
	failUntil time.Time
	// background refresh backoff after failures.
	failures  int
	nextRetry time.Time
}

// metricKeys are a config's series names, rendered once: the read path
// only bumps a counter.
type metricKeys struct{ hit, miss, mintOK, mintErr, rotation string }

func (st *configState) keys() *metricKeys {
	if k := st.mkeys.Load(); k != nil {
		return k
	}
	k := &metricKeys{
		hit:      series("broker_creds_total", "config", st.name, "outcome", "hit"),
		miss:     series("broker_creds_total", "config", st.name, "outcome", "miss"),
		mintOK:   series("broker_mints_total", "config", st.name, "outcome", "ok"),
		mintErr:  series("broker_mints_total", "config", st.name, "outcome", "error"),
		rotation: series("broker_rotations_total", "config", st.name),
	}
	st.mkeys.Store(k)
	return k
}

type flight struct {
	gen  uint64
	done chan struct{}
	tok  *storedToken
	err  error
}

func (st *configState) close() {
	if st.client != nil {
		st.client.Close()
	}
}

// state returns the state of a config, creating an empty one.
func (b *backend) state(name string) *configState {
	b.mu.RLock()
	st := b.states[name]
	b.mu.RUnlock()
	if st != nil {
		return st
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if st = b.states[name]; st == nil {
		st = &configState{name: name}
		b.states[name] = st
	}
	return st
}

func (b *backend) dropState(name string) {
	b.mu.Lock()
	st := b.states[name]
	delete(b.states, name)
	b.mu.Unlock()
	if st != nil {
		st.mu.Lock()
		st.gen++
		st.close()
		st.mu.Unlock()
	}
}

// forget drops the state of a config that does not exist, if it is still st.
func (b *backend) forget(name string, st *configState) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.states[name] == st {
		delete(b.states, name)
	}
}

// loadLocked reads the config and its token from storage once.
func (b *backend) loadLocked(ctx context.Context, s logical.Storage, st *configState) error {
	if st.loaded {
		return nil
	}
	cfg, err := readConfig(ctx, s, st.name)
	if err != nil {
		return err
	}
	rec, err := readTokenRecord(ctx, s, st.name)
	if err != nil {
		return err
	}
	st.cfg, st.rec, st.loaded = cfg, rec, true
	return nil
}

// config returns the cached config (nil if none).
func (b *backend) config(ctx context.Context, s logical.Storage, name string) (*brokerConfig, error) {
	st := b.state(name)
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := b.loadLocked(ctx, s, st); err != nil {
		return nil, err
	}
	return st.cfg, nil
}

// status returns the config and a copy of its token record.
func (b *backend) status(ctx context.Context, s logical.Storage, name string) (*brokerConfig, tokenRecord, error) {
	st := b.state(name)
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := b.loadLocked(ctx, s, st); err != nil {
		return nil, tokenRecord{}, err
	}
	return st.cfg, st.rec, nil
}

// usable reports whether tok may be handed out at now.
func usable(tok *storedToken, now time.Time) bool {
	if tok == nil {
		return false
	}
	if tok.ExpiresAt.IsZero() {
		return now.Sub(tok.IssuedAt) < passthroughMaxAge
	}
	return tok.ExpiresAt.Sub(now) >= minRemaining(tok)
}

func minRemaining(tok *storedToken) time.Duration {
	return min(minRemainingCap, tok.ExpiresAt.Sub(tok.IssuedAt)/minRemainingFraction)
}

// dueForRefresh reports whether a third or less of tok's life is left.
func dueForRefresh(tok *storedToken, now time.Time) bool {
	if tok.ExpiresAt.IsZero() {
		return now.Sub(tok.IssuedAt) >= passthroughRevalidate
	}
	life := tok.ExpiresAt.Sub(tok.IssuedAt)
	return tok.ExpiresAt.Sub(now) <= life/refreshAtFraction
}

// currentToken returns the config and a token to hand out. A valid cached
// token is returned at once (starting a background refresh when it is due);
// otherwise every concurrent caller waits on one single mint.
func (b *backend) currentToken(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	return b.tokenNoOlderThan(ctx, s, name, 0)
}

// tokenNoOlderThan is currentToken for a caller that needs the broker's word
// on the token to be at most maxAge old (0: any usable token will do). A
// renew of a passthrough lease uses it to revalidate upstream.
func (b *backend) tokenNoOlderThan(ctx context.Context, s logical.Storage, name string, maxAge time.Duration) (*brokerConfig, *storedToken, error) {
	// A mint that was under way when the config changed or its tokens were
	// retired yields a token no reader may get: wait for the next one.
	for attempt := 0; ; attempt++ {
		cfg, tok, stale, err := b.tokenOnce(ctx, s, name, maxAge)
		if err != nil || !stale || attempt == 2 {
			if err == nil && stale {
				err = fmt.Errorf("config %q changed while its token was being minted; read again", name)
			}
			return cfg, tok, err
		}
	}
}

func (b *backend) tokenOnce(ctx context.Context, s logical.Storage, name string, maxAge time.Duration) (*brokerConfig, *storedToken, bool, error) {
	st := b.state(name)
	st.mu.Lock()
	if err := b.loadLocked(ctx, s, st); err != nil {
		st.mu.Unlock()
		return nil, nil, false, err
	}
	cfg := st.cfg
	if cfg == nil {
		st.mu.Unlock()
		b.forget(name, st) // reads of made-up names must not grow memory
		return nil, nil, false, errConfigNotFound
	}
	now := b.now()
	if tok := st.rec.Token; st.rec.servable(tok, now) && (maxAge == 0 || now.Sub(tok.IssuedAt) <= maxAge) {
		if dueForRefresh(tok, now) && st.flight == nil && !now.Before(st.nextRetry) {
			b.startMintLocked(st)
		}
		st.mu.Unlock()
		b.metrics.incKey(st.keys().hit)
		return cfg, tok, false, nil
	}
	b.metrics.incKey(st.keys().miss)
	if st.failErr != nil && now.Before(st.failUntil) {
		err := st.failErr
		st.mu.Unlock()
		return nil, nil, false, err
	}
	f := st.flight
	if f == nil {
		f = b.startMintLocked(st)
	}
	st.mu.Unlock()

	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, nil, false, fmt.Errorf("waiting for %s token of %q: %w", cfg.Provider, name, ctx.Err())
	}
	if f.err != nil {
		return nil, nil, false, f.err
	}
	st.mu.Lock()
	stale := st.gen != f.gen || f.tok.MintedAt.Before(st.rec.RetiredBefore)
	st.mu.Unlock()
	return cfg, f.tok, stale, nil
}

// staleWarning says, when the last refresh of a config failed, that the
// token served is the cached one and why it was not replaced.
func (b *backend) staleWarning(name string) string {
	st := b.state(name)
	st.mu.Lock()
	defer st.mu.Unlock()
	rec := st.rec
	if rec.Token == nil || !rec.LastErrorAt.After(rec.LastRefresh) {
		return ""
	}
	until := "until revalidated"
	if !rec.Token.ExpiresAt.IsZero() {
		until = "until " + formatTime(rec.Token.ExpiresAt)
	}
	return fmt.Sprintf("serving the cached token (valid %s): the last refresh at %s failed: %s", until, formatTime(rec.LastErrorAt), rec.LastError)
}

// servable reports whether tok may be handed out at now: usable, and not
// minted before an incident retirement of the config's tokens.
func (r tokenRecord) servable(tok *storedToken, now time.Time) bool {
	return usable(tok, now) && !tok.MintedAt.Before(r.RetiredBefore)
}

// startMintLocked starts the single mint of st; st.mu must be held. The mint
// runs on the backend's context, not the reader's: a reader that gives up
// does not abort the mint others are waiting on.
func (b *backend) startMintLocked(st *configState) *flight {
	f := &flight{gen: st.gen, done: make(chan struct{})}
	st.flight = f
	cfg, client, gen := st.cfg, st.client, st.gen
	secrets := effectiveSecrets(cfg, st.rec)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		ctx, cancel := context.WithTimeout(b.ctx, mintTimeout)
		defer cancel()
		b.runMint(ctx, st, cfg, client, secrets, f, gen)
	}()
	return f
}

// runMint obtains a token and stores the outcome before anyone uses it: a
// rotated long-lived secret (ChatApp) must be in storage before the token it
// came with is handed out, and a write-ahead record covers the moment
// between the broker rotating it and that write.
func (b *backend) runMint(ctx context.Context, st *configState, cfg *brokerConfig, client *upstream.Client, secrets map[string]string, f *flight, gen uint64) {
	var walID string
	if b.rotates(cfg) && b.storage != nil {
		id, err := b.putRotationWAL(ctx, st.name)
		if err != nil {
			b.finishMint(ctx, st, cfg, f, gen, nil, fmt.Errorf("recording the rotation intent: %w", err))
			return
		}
		walID = id
	}
	m, err := b.mint(ctx, cfg, client, secrets, b.reserveMake(cfg))
	persisted := b.finishMint(ctx, st, cfg, f, gen, m, err)
	if walID != "" && persisted {
		b.deleteRotationWAL(ctx, walID)
	}
}

// finishMint persists and installs a mint's outcome, then releases waiters.
// It reports whether the outcome reached storage.
func (b *backend) finishMint(ctx context.Context, st *configState, cfg *brokerConfig, f *flight, gen uint64, m *minted, err error) bool {
	now := b.now()
	st.mu.Lock()
	rec := st.rec
	if err != nil {
		rec.LastError, rec.LastErrorAt = err.Error(), now
		if rejectedSecret(err) {
			// The broker refused the long-lived secret itself (revoked,
			// expired): tokens from it are dead or about to be, so none is
			// handed out any more.
			rec.Token = nil
		}
	} else {
		rec = rec.with(m, now)
	}
	current := st.gen == gen
	st.mu.Unlock()

	// Store first, install second: a reader never gets a token whose
	// rotated secret could still be lost. Readers holding a valid token are
	// not waiting on this.
	persisted := false
	if current && b.storage != nil {
		if werr := writeTokenRecord(ctx, b.storage, st.name, rec); werr != nil {
			if m != nil && len(m.rotated) > 0 {
				b.Logger().Error("could not store a rotated secret; it is kept in memory and stored with the next refresh", "config", st.name, "error", werr)
			} else {
				b.Logger().Warn("could not persist token; a restart will mint again", "config", st.name, "error", werr)
			}
		} else {
			persisted = true
		}
	}

	st.mu.Lock()
	if st.gen == gen {
		st.rec = rec
		st.flight = nil
		if err != nil {
			st.failures++
			st.nextRetry = now.Add(min(refreshBackoff<<min(st.failures-1, 8), maxRefreshBackoff))
			if !rec.servable(rec.Token, now) {
				st.failErr, st.failUntil = err, now.Add(failFastFor)
			}
		} else {
			st.failures, st.nextRetry, st.failErr = 0, time.Time{}, nil
		}
	}
	st.mu.Unlock()

	if err != nil {
		b.metrics.incKey(st.keys().mintErr)
		b.Logger().Warn("token refresh failed", "config", st.name, "error", err)
	} else {
		b.metrics.incKey(st.keys().mintOK)
		if len(m.rotated) > 0 {
			b.metrics.incKey(st.keys().rotation)
		}
		b.Logger().Debug("token minted", "config", st.name, "expires_at", m.tok.ExpiresAt)
		if w := cfg.expiryWarning(now); w != "" {
			b.Logger().Warn(w, "config", st.name)
		}
		f.tok = m.tok
	}
	f.err = err
	close(f.done)
	if err == nil {
		b.sched.set(st.name, b.nextDue(cfg, rec))
	}
	return persisted
}

// minted is one successful Issue: the token and what it changed upstream.
type minted struct {
	tok             *storedToken
	rotated         map[string]string
	secretExpiresAt time.Time
}

// with returns the record after a successful mint: the new token, the
// rotated secrets merged in, the error cleared.
func (r tokenRecord) with(m *minted, now time.Time) tokenRecord {
	out := tokenRecord{Token: m.tok, LastRefresh: now, SecretExpiresAt: r.SecretExpiresAt, Rotated: r.Rotated, RetiredBefore: r.RetiredBefore}
	if len(m.rotated) > 0 {
		out.Rotated = make(map[string]string, len(r.Rotated)+len(m.rotated))
		for k, v := range r.Rotated {
			out.Rotated[k] = v
		}
		for k, v := range m.rotated {
			out.Rotated[k] = v
		}
	}
	if !m.secretExpiresAt.IsZero() {
		out.SecretExpiresAt = m.secretExpiresAt
	}
	return out
}

// effectiveSecrets are the config's secrets with the broker's rotations on
// top: after a ChatApp refresh, the stored refresh token is the new one.
func effectiveSecrets(cfg *brokerConfig, rec tokenRecord) map[string]string {
	if len(rec.Rotated) == 0 {
		return cfg.Secrets
	}
	out := make(map[string]string, len(cfg.Secrets)+len(rec.Rotated))
	for k, v := range cfg.Secrets {
		out[k] = v
	}
	for k, v := range rec.Rotated {
		out[k] = v
	}
	return out
}

// mint asks the provider for a token under cfg with the given secrets.
func (b *backend) mint(ctx context.Context, cfg *brokerConfig, client *upstream.Client, secrets map[string]string, reserve func(context.Context) error) (*minted, error) {
	started := b.now()
	p, ok := b.providers[cfg.Provider]
	if !ok {
		return nil, fmt.Errorf("provider %q is not supported by this plugin version", cfg.Provider)
	}
	spec := b.specs[cfg.Provider]
	endpoint := baseURL(spec, cfg)
	if !cfg.SecretExpiresAt.IsZero() && !b.now().Before(cfg.SecretExpiresAt) {
		return nil, fmt.Errorf("%w: %s", errSecretExpired, cfg.expiryWarning(b.now()))
	}
	// The allow-list may have tightened since the config was written: the
	// secret is never sent to a host it no longer allows.
	if b.storage != nil {
		ms, err := b.settings(ctx, b.storage)
		if err != nil {
			return nil, err
		}
		if !ms.hostAllowed(endpoint, spec.Environments) {
			return nil, fmt.Errorf("%w: base_url %s is not in the mount's allowed_hosts; the secret was not sent", provider.ErrGuard, endpoint)
		}
	}
	if client == nil {
		var err error
		if client, err = b.newClient(spec, cfg); err != nil {
			return nil, err
		}
		defer client.Close()
	}
	tok, err := p.Issue(ctx, provider.Request{
		BaseURL:         endpoint,
		Environment:     cfg.Environment,
		Client:          client,
		Secrets:         secrets,
		AllowedAccounts: cfg.AllowedAccounts,
		ReserveMake:     reserve,
	})
	if err != nil {
		return nil, err
	}
	st := toStored(tok)
	st.MintedAt = started
	if st.ExpiresAt.IsZero() {
		// A passthrough token's age is the age of its validation, on the
		// clock the token core judges freshness by.
		st.IssuedAt = b.now()
	}
	return &minted{tok: st, rotated: tok.Rotated, secretExpiresAt: tok.SecretExpiresAt}, nil
}

// rejectedSecret reports whether err is the broker refusing the long-lived
// secret (as opposed to failing or rate-limiting).
func rejectedSecret(err error) bool {
	ue, ok := upstream.AsError(err)
	return ok && ue.Kind == upstream.KindAuth
}

func toStored(t *provider.Token) *storedToken {
	sum := sha256.Sum256([]byte(t.AccessToken))
	accounts := t.AccountIDs
	if accounts == nil {
		accounts = []string{}
	}
	return &storedToken{
		ID:          hex.EncodeToString(sum[:12]),
		AccessToken: t.AccessToken,
		IssuedAt:    t.IssuedAt,
		ExpiresAt:   t.ExpiresAt,
		AccountIDs:  accounts,
		ReadOnly:    t.ReadOnly,
		Details:     t.Details,
	}
}

func (b *backend) newClient(spec provider.Spec, cfg *brokerConfig) (*upstream.Client, error) {
	tr, err := b.transport(cfg.CACert)
	if err != nil {
		return nil, err
	}
	return upstream.New(upstream.Options{
		Broker:        spec.Display,
		Transport:     tr,
		RatePerMinute: spec.RatePerMinute,
		RatePerOp:     spec.RatePerOp,
		MaxConcurrent: spec.MaxConcurrent,
		Observe:       b.metrics.observeUpstream(spec.Name),
	})
}

// transport returns the connection pool shared by every config that trusts
// the same CAs (most trust the system roots: one pool for the mount).
func (b *backend) transport(caPEM string) (*http.Transport, error) {
	key := sha256.Sum256([]byte(caPEM))
	b.trMu.Lock()
	defer b.trMu.Unlock()
	if tr, ok := b.transports[key]; ok {
		return tr, nil
	}
	tr, err := upstream.NewTransport(caPEM)
	if err != nil {
		return nil, err
	}
	b.transports[key] = tr
	return tr, nil
}

func baseURL(spec provider.Spec, cfg *brokerConfig) string {
	if cfg.BaseURL != "" {
		return cfg.BaseURL
	}
	return spec.Environments[cfg.Environment]
}

// install replaces a config's state after a config write: new settings, a new
// client, and the token (nil to drop it).
func (b *backend) install(name string, cfg *brokerConfig, client *upstream.Client, rec tokenRecord) {
	st := b.state(name)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.close()
	st.cfg, st.client, st.rec, st.loaded = cfg, client, rec, true
	st.gen++
	st.flight = nil
	st.failErr, st.failures, st.nextRetry = nil, 0, time.Time{}
}

// retire drops tok from a config's cache so no new lease receives it, and
// persists that. It is a no-op if the token is no longer current.
func (b *backend) retire(ctx context.Context, s logical.Storage, name, tokenID string) error {
	st := b.state(name)
	st.mu.Lock()
	if err := b.loadLocked(ctx, s, st); err != nil {
		st.mu.Unlock()
		return err
	}
	if st.cfg == nil || st.rec.Token == nil || st.rec.Token.ID != tokenID {
		st.mu.Unlock()
		return nil
	}
	st.rec.Token = nil
	rec := st.rec
	st.mu.Unlock()
	b.Logger().Info("token retired by an early lease revoke", "config", name, "token_id", tokenID)
	return writeTokenRecord(ctx, s, name, rec)
}

// retireAll is the incident switch: from now on no lease receives a token
// minted before this moment, including one a running mint is about to
// deliver. Rotated secrets such a mint brings are still stored.
func (b *backend) retireAll(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	st := b.state(name)
	st.mu.Lock()
	if err := b.loadLocked(ctx, s, st); err != nil {
		st.mu.Unlock()
		return nil, nil, err
	}
	if st.cfg == nil {
		st.mu.Unlock()
		return nil, nil, errConfigNotFound
	}
	old := st.rec.Token
	st.rec.Token = nil
	st.rec.RetiredBefore = b.now()
	st.failErr = nil
	rec, cfg := st.rec, st.cfg
	st.mu.Unlock()
	b.Logger().Warn("all tokens of the config retired", "config", name)
	return cfg, old, writeTokenRecord(ctx, s, name, rec)
}
