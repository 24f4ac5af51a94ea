package backend

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

var (
	errConfigNotFound = errors.New("config not found")
	// errSecretExpired: the operator-declared expiry of the long-lived
	// secret has passed; the plugin will not use it.
	errSecretExpired = errors.New("long-lived secret expired")
)

// configState is the in-memory state of one config: its settings, its HTTP
// client and its current token, shared by every reader.
//
// Three locks, always taken in this order:
//   - upstream serialises calls to the broker: one at a time per config, so
//     a rotating refresh token is never presented twice and a config write
//     never verifies beside a refresh.
//   - owner serialises every change of the config's token state, in memory
//     and in storage (a refresh installed, a retire, a config write, a
//     delete): it is held across the storage write, so none can undo
//     another.
//   - mu guards the fields below; it is never held across a broker call,
//     so readers of a valid token never wait.
type configState struct {
	name  string
	mkeys atomic.Pointer[metricKeys]

	upstream sync.Mutex
	owner    sync.Mutex
	// waiting counts goroutines blocked on upstream or owner; tests use it
	// to know a writer is queued, instead of sleeping.
	waiting atomic.Int32
	// pins counts writers using the state; guarded by backend.mu. A pinned
	// state is never forgotten.
	pins int

	mu     sync.Mutex
	loaded bool
	// dead: the config was deleted or changed on another node; a fresh
	// state replaces this one, and nothing may be installed or stored
	// through it any more.
	dead   bool
	cfg    *brokerConfig
	client *upstream.Client
	rec    tokenRecord
	// gen changes whenever the config changes, so a refresh started under the
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

func (st *configState) lockUpstream() {
	st.waiting.Add(1)
	st.upstream.Lock()
	st.waiting.Add(-1)
}

func (st *configState) lockOwner() {
	st.waiting.Add(1)
	st.owner.Lock()
	st.waiting.Add(-1)
}

// metricKeys are a config's counters, looked up once: the read path only
// bumps a counter, with no label hashing.
type metricKeys struct{ hit, miss, refreshOK, refreshErr, rotation counter }

func (st *configState) keys(m *metrics) *metricKeys {
	if k := st.mkeys.Load(); k != nil {
		return k
	}
	k := &metricKeys{
		hit:        m.creds.WithLabelValues(st.name, "hit"),
		miss:       m.creds.WithLabelValues(st.name, "miss"),
		refreshOK:  m.mints.WithLabelValues(st.name, "ok"),
		refreshErr: m.mints.WithLabelValues(st.name, "error"),
		rotation:   m.rotations.WithLabelValues(st.name),
	}
	st.mkeys.Store(k)
	return k
}

// killLocked marks st dead; st.mu must be held.
func (st *configState) killLocked() {
	st.dead = true
	st.gen++
	st.cfg = nil
	st.rec = tokenRecord{}
	if st.client != nil {
		st.client.Close()
		st.client = nil
	}
}

// lookup returns the loaded state of an existing config, or nil when there
// is none. Names that do not exist leave nothing behind in memory.
func (b *backend) lookup(ctx context.Context, s logical.Storage, name string) (*configState, error) {
	for {
		b.mu.RLock()
		st := b.states[name]
		b.mu.RUnlock()
		if st == nil {
			cfg, err := readConfig(ctx, s, name)
			if err != nil || cfg == nil {
				return nil, err
			}
			st = b.stateFor(name, false)
		}
		st.mu.Lock()
		err := b.loadLocked(ctx, s, st)
		dead, exists := st.dead, st.cfg != nil
		st.mu.Unlock()
		switch {
		case err != nil:
			b.forget(st)
			return nil, err
		case dead:
			continue // deleted or invalidated meanwhile: look again
		case !exists:
			b.forget(st)
			return nil, nil
		}
		return st, nil
	}
}

// stateFor returns the state of name, creating an empty one; pin marks it
// in use by a writer (release with unpin).
func (b *backend) stateFor(name string, pin bool) *configState {
	b.mu.Lock()
	defer b.mu.Unlock()
	st := b.states[name]
	if st == nil {
		st = &configState{name: name}
		b.states[name] = st
	}
	if pin {
		st.pins++
	}
	return st
}

// pin returns the live state of name for a writer, created if needed.
func (b *backend) pin(name string) *configState { return b.stateFor(name, true) }

func (b *backend) unpin(st *configState) {
	b.mu.Lock()
	st.pins--
	b.mu.Unlock()
	b.forget(st)
}

// forget drops st from the map when it holds no config and no writer uses
// it: reads of made-up names must not grow memory.
func (b *backend) forget(st *configState) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.states[st.name] != st || st.pins > 0 {
		return
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.cfg == nil {
		st.killLocked()
		delete(b.states, st.name)
	}
}

// dropState forgets a config's in-memory state (deleted here, or changed on
// another node): in-flight work on it can no longer install or store.
func (b *backend) dropState(name string) {
	b.mu.Lock()
	st := b.states[name]
	delete(b.states, name)
	b.mu.Unlock()
	if st != nil {
		st.mu.Lock()
		st.killLocked()
		st.mu.Unlock()
	}
}

// loadLocked reads the config and its token from storage once, and builds
// the config's HTTP client (its connection pool and rate limit live as long
// as the state). st.mu must be held.
func (b *backend) loadLocked(ctx context.Context, s logical.Storage, st *configState) error {
	if st.loaded || st.dead {
		return nil
	}
	cfg, err := readConfig(ctx, s, st.name)
	if err != nil {
		return err
	}
	rec, err := readTokenRecord(ctx, s, st.name)
	if err != nil {
		// An unreadable record must not lock the config for good: start
		// without a token (a rotated secret in it is lost; the provider
		// then falls back on its quota, if it has one) and say so.
		b.Logger().Error("dropping an unreadable token record", "config", st.name, "error", err)
		rec = tokenRecord{}
	}
	if cfg != nil && rec.ConfigHash != "" && rec.ConfigHash != cfg.upstreamHash() {
		// Written for other settings by a config write that failed half
		// way: its token is not this config's.
		rec.Token = nil
	}
	if cfg != nil {
		if spec, ok := b.specs[cfg.Provider]; ok {
			client, err := b.newClient(spec, cfg)
			if err != nil {
				return err
			}
			st.client = client
		}
	}
	st.cfg, st.rec, st.loaded = cfg, rec, true
	return nil
}

// config returns the cached config (nil if none).
func (b *backend) config(ctx context.Context, s logical.Storage, name string) (*brokerConfig, error) {
	cfg, _, err := b.status(ctx, s, name)
	return cfg, err
}

// status returns the config (nil if none) and a copy of its token record.
func (b *backend) status(ctx context.Context, s logical.Storage, name string) (*brokerConfig, tokenRecord, error) {
	st, err := b.lookup(ctx, s, name)
	if err != nil || st == nil {
		return nil, tokenRecord{}, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.cfg, st.rec, nil
}

// install sets a config's state after a config write: new settings, a new
// client, and the token record. st.owner must be held.
func (st *configState) install(cfg *brokerConfig, client *upstream.Client, rec tokenRecord) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.client != nil && st.client != client {
		st.client.Close()
	}
	st.cfg, st.client, st.rec, st.loaded = cfg, client, rec, true
	st.gen++
	st.failErr, st.failures, st.nextRetry = nil, 0, time.Time{}
}
