package backend

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

var (
	errConfigNotFound = errors.New("config not found")
	// errSecretExpired: the operator-declared expiry of the long-lived
	// secret has passed; the plugin will not use it.
	errSecretExpired = errors.New("long-lived secret expired")
	// errClosing: the mount is being unloaded; no new broker call starts.
	errClosing = errors.New("the mount is being unloaded")
)

// configState is everything the backend holds for one config name: its
// locks, its settings, its HTTP client and its current token, shared by
// every reader.
//
// The state belongs to the name, not to a config: it stays in the map while
// anyone uses it (refs), across deletes, re-creates and invalidations, so
// its locks are the name's locks and there is never a second owner of one
// name. It is dropped only when nobody uses it and no config is loaded.
//
// Three locks, always taken in this order:
//   - upstream serialises calls to the broker: one at a time per name, so
//     a rotating refresh token is never presented twice and a config write
//     never verifies beside a refresh.
//   - owner serialises every read of the name's storage into memory and
//     every change of it, in memory and in storage (a load, a refresh
//     installed, a retire, a config write, a delete, an invalidation): it
//     is held across the storage call, so none can undo another and a load
//     never sees half of one.
//   - mu guards the fields below; it is never held across a broker or
//     storage call, so readers of a valid token never wait.
//
// Only the core's files (state.go, core.go, refresh.go) take these locks;
// path handlers call the core.
type configState struct {
	name string
	// counts are the config's metric counters (see countCollector).
	counts counts
	// refs counts the requests and refreshes using the state (see
	// acquire); present mirrors cfg != nil so that release needs no lock
	// on the read path.
	refs    atomic.Int32
	present atomic.Bool

	upstream sync.Mutex
	owner    sync.Mutex
	// waiting counts goroutines blocked on upstream or owner; tests use it
	// to know a writer is queued, instead of sleeping.
	waiting atomic.Int32

	mu sync.Mutex
	// loaded: cfg and rec are what storage holds (cfg nil: no config).
	loaded bool
	cfg    *brokerConfig
	client *upstream.Client
	rec    tokenRecord
	// gen changes whenever the config changes (a write, a delete, an
	// invalidation), so a refresh started under the old settings is not
	// installed.
	gen uint64
	// own is the refresh bookkeeping of the config's own token, narrowed
	// that of each narrowed token (by request key).
	own      slot
	narrowed map[string]*slot
	// unstored: rec holds a rotated secret that storage does not (its
	// write failed); pendingWALs are the rotation records kept until it is.
	unstored    bool
	pendingWALs []string
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

// counts are the counters of a config or a role, exported at scrape time
// by countCollector: a few atomics per config, where a labelled series per
// counter costs a kilobyte or so of the metrics library's memory each.
type counts struct {
	hit, miss, credsErr           atomic.Uint64 // creds reads
	refreshOK, refreshErr, rotate atomic.Uint64 // a config's own only
}

// reset zeroes the counters (the config was deleted: a config written
// again under its name counts from zero, as a new series).
func (c *counts) reset() {
	for _, v := range []*atomic.Uint64{&c.hit, &c.miss, &c.credsErr, &c.refreshOK, &c.refreshErr, &c.rotate} {
		v.Store(0)
	}
}

// acquire returns the state of name, created if needed, and counts the
// caller as its user until release. While counted, the state is the only
// one of its name.
func (b *backend) acquire(name string) *configState {
	b.mu.RLock()
	st := b.states[name]
	if st != nil {
		st.refs.Add(1)
	}
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
	st.refs.Add(1)
	return st
}

// release ends a use of st; the last user of a state with no config drops
// it, so reads of made-up names leave nothing behind in memory.
func (b *backend) release(st *configState) {
	if st.refs.Add(-1) > 0 || st.present.Load() {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	// Users count themselves under b.mu (read), so none can appear now.
	if st.refs.Load() > 0 || st.present.Load() || b.states[st.name] != st {
		return
	}
	delete(b.states, st.name)
	st.mu.Lock()
	st.setClientLocked(nil)
	st.mu.Unlock()
}

// setClientLocked replaces st's HTTP client, closing the old one; st.mu
// must be held.
func (st *configState) setClientLocked(c *upstream.Client) {
	if st.client != nil && st.client != c {
		st.client.Close()
	}
	st.client = c
}

// ensureLoaded reads the name's config and token record from storage
// unless memory already holds them.
func (b *backend) ensureLoaded(ctx context.Context, s logical.Storage, st *configState) error {
	st.mu.Lock()
	loaded := st.loaded
	st.mu.Unlock()
	if loaded {
		return nil
	}
	st.lockOwner()
	defer st.owner.Unlock()
	return b.loadOwned(ctx, s, st)
}

// loadOwned is ensureLoaded for a caller holding st.owner. Every writer of
// the name's storage holds the owner lock and updates memory before it lets
// go, so what this reads is whole.
func (b *backend) loadOwned(ctx context.Context, s logical.Storage, st *configState) error {
	st.mu.Lock()
	loaded := st.loaded
	st.mu.Unlock()
	if loaded {
		return nil
	}
	cfg, err := readConfig(ctx, s, st.name)
	if err != nil {
		return err
	}
	var (
		rec    tokenRecord
		client *upstream.Client
	)
	if cfg != nil {
		rec, err = readTokenRecord(ctx, s, st.name)
		switch {
		case errors.Is(err, errUndecodable):
			// Only a record that cannot be decoded is given up: start
			// without a token (a rotated secret in it is lost; the provider
			// then falls back on its quota, if it has one) and say so. A
			// storage error is an error, retried by whoever comes next.
			b.Logger().Error("dropping an undecodable token record", "config", st.name, "error", err)
			rec = tokenRecord{}
		case err != nil:
			return err
		}
		rec = rec.boundTo(cfg)
		if spec, ok := b.specs[cfg.Provider]; ok {
			if client, err = b.newClient(spec, cfg); err != nil {
				return err
			}
		}
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	st.setClientLocked(client)
	st.cfg, st.rec, st.loaded = cfg, rec, true
	st.present.Store(cfg != nil)
	st.gen++
	st.unstored, st.pendingWALs = false, nil
	st.resetSlotsLocked()
	return nil
}

// view returns the config (nil if none) and a copy of its token record.
func (b *backend) view(ctx context.Context, s logical.Storage, name string) (*brokerConfig, tokenRecord, error) {
	st := b.acquire(name)
	defer b.release(st)
	if err := b.ensureLoaded(ctx, s, st); err != nil {
		return nil, tokenRecord{}, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.cfg, st.rec, nil
}

// config returns the stored config (nil if none).
func (b *backend) config(ctx context.Context, s logical.Storage, name string) (*brokerConfig, error) {
	cfg, _, err := b.view(ctx, s, name)
	return cfg, err
}

// forgetName drops what memory holds of name (another node changed it):
// the next use reads storage again, and work in flight under the old
// settings can no longer install anything.
func (b *backend) forgetName(name string) {
	b.mu.RLock()
	st := b.states[name]
	if st != nil {
		st.refs.Add(1)
	}
	b.mu.RUnlock()
	if st == nil {
		return // nothing cached: the next use reads storage anyway
	}
	defer b.release(st)
	st.lockOwner()
	defer st.owner.Unlock()
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.unstored {
		b.Logger().Error("another node changed the config while a rotated secret of it was not yet stored here; storage's version wins", "config", name)
	}
	st.unloadLocked()
}

// unloadLocked empties st so the next use reads storage; st.mu must be held.
func (st *configState) unloadLocked() {
	st.setClientLocked(nil)
	st.cfg, st.rec, st.loaded = nil, tokenRecord{}, false
	st.present.Store(false)
	st.gen++
	st.unstored, st.pendingWALs = false, nil
	st.resetSlotsLocked()
}

// stored records that rec is in storage now: the rotation records that
// covered it are returned for deletion. st.mu must be held.
func (st *configState) storedLocked() []string {
	ids := st.pendingWALs
	st.unstored, st.pendingWALs = false, nil
	return ids
}

// unstoredLocked records that rec holds a rotation storage lacks, covered by
// walID (kept until it is stored). st.mu must be held.
func (st *configState) unstoredLocked(walID string) {
	st.unstored = true
	if walID != "" {
		st.pendingWALs = append(st.pendingWALs, walID)
	}
}

// logUnstoredRotation says a rotated secret lives only in memory for now:
// the one line an operator greps for when storage failed under a rotation.
func (b *backend) logUnstoredRotation(name string, err error) {
	b.Logger().Error("could not store a rotated secret; it is kept in memory and stored with the next refresh or at unload", "config", name, "error", err)
}

// resetSlotsLocked forgets failure backoffs (the config changed); flights
// under way finish on their own, and find the generation changed.
func (st *configState) resetSlotsLocked() {
	st.own = slot{flight: st.own.flight}
	for k, sl := range st.narrowed {
		if sl.flight == nil {
			delete(st.narrowed, k)
		} else {
			*sl = slot{flight: sl.flight}
		}
	}
}

// eachLoaded calls fn with every config memory holds (for the expiry
// gauges), without holding any lock while fn runs.
func (b *backend) eachLoaded(fn func(name string, cfg *brokerConfig, rec tokenRecord)) {
	b.mu.RLock()
	states := make([]*configState, 0, len(b.states))
	for _, st := range b.states {
		states = append(states, st)
	}
	b.mu.RUnlock()
	for _, st := range states {
		st.mu.Lock()
		cfg, rec := st.cfg, st.rec
		st.mu.Unlock()
		if cfg != nil {
			fn(st.name, cfg, rec)
		}
	}
}

// countCredsError counts a failed creds read of a config that exists (or of
// a role).
func (b *backend) countCredsError(config string, role *roleEntry) {
	if role != nil {
		role.counts.credsErr.Add(1)
		return
	}
	b.mu.RLock()
	st := b.states[config]
	b.mu.RUnlock()
	if st != nil {
		st.counts.credsErr.Add(1)
	}
}

// eachState calls fn with the counters of every config memory holds.
func (b *backend) eachState(fn func(name string, c *counts)) {
	b.mu.RLock()
	states := make([]*configState, 0, len(b.states))
	for _, st := range b.states {
		if st.present.Load() {
			states = append(states, st)
		}
	}
	b.mu.RUnlock()
	for _, st := range states {
		fn(st.name, &st.counts)
	}
}
