// Package backend is the Vault secrets engine: it keeps brokers' long-lived
// secrets under config/<name> and hands out short-lived tokens at
// creds/<name> as Vault leases. Everything Vault-shaped lives here; broker
// protocols live in one package per provider.
package backend

import (
	"cmp"
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Storage prefixes. Both hold secrets and are seal-wrapped.
const (
	configPrefix = "config/"
	tokenPrefix  = "token/"
)

type backend struct {
	*framework.Backend

	providers map[string]provider.Provider
	// specs are the providers' Specs, built once: Spec() allocates, and the
	// creds read path needs one on every read.
	specs map[string]provider.Spec
	// names are the providers' names in registry order (sorted for
	// Options.Providers), for messages, help and allowed values.
	names []string
	// fields are the providers' own config fields, merged by name.
	fields map[string]*framework.FieldSchema
	// storage outlives requests, for background refreshes.
	storage logical.Storage
	// ctx is cancelled when the backend is unloaded; background work uses it.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// closing: the mount is being unloaded; no new refresh starts (set and
	// read with wg.Add under lifeMu).
	closing atomic.Bool
	lifeMu  sync.Mutex

	mu            sync.RWMutex
	states        map[string]*configState
	roles         roleCache
	sched         *schedule
	settingsCache atomic.Pointer[mountSettings]
	metrics       *metrics
	// transports are connection pools shared by configs, by CA bundle.
	trMu       sync.Mutex
	transports map[[32]byte]*sharedTransport
	// quotaMu serialises quota count updates.
	quotaMu sync.Mutex

	// clock is the one clock: freshness, schedules and leases read it (now
	// is its Now), providers get it through the request, and the broker
	// calls' rate limits refill and wait on it.
	clock upstream.Clock
	now   func() time.Time
	// extraRoots are the providers' own CAs, each trusted for its broker's
	// hosts only, in every connection pool without a ca_cert.
	extraRoots []upstream.HostRoots
	// refreshTimeout bounds one broker call (tests shorten it).
	refreshTimeout time.Duration
	// refused is set when storage was written by a newer schema: the
	// message every request but help and revoke gets (migrations.go).
	refused atomic.Pointer[string]
}

// Options are what a backend is built from. The zero value is the plugin as
// shipped; tests inject providers and a clock so they never sleep.
type Options struct {
	// Version is reported as the plugin's running version.
	Version string
	// Providers replace the built-in registry when set, by name. Everything
	// the backend accepts and says about a provider (fields, options,
	// messages, help, OpenAPI) comes from their Specs.
	Providers map[string]provider.Provider
	// Clock is the backend's time source and what its broker calls wait on
	// (rate limits, retry backoff); the system clock when nil.
	Clock upstream.Clock
	// WALRollbackMinAge is how old a rotation record must be before Vault
	// replays it (default 2m, longer than a refresh may run). Tests of crash
	// recovery shorten it; production leaves it alone.
	WALRollbackMinAge time.Duration
}

// Factory returns a logical.Factory that reports version as the plugin's
// running version.
func Factory(version string) logical.Factory {
	return FactoryWith(Options{Version: version})
}

// FactoryWith returns a logical.Factory for a backend built from opts.
func FactoryWith(opts Options) logical.Factory {
	return func(ctx context.Context, conf *logical.BackendConfig) (logical.Backend, error) {
		b := New(opts)
		if err := b.Setup(ctx, conf); err != nil {
			return nil, err
		}
		b.storage = conf.StorageView
		return b, nil
	}
}

// New builds a backend; Setup must still be called (FactoryWith does).
func New(opts Options) *backend {
	ctx, cancel := context.WithCancel(context.Background())
	clock := opts.Clock
	if clock == nil {
		clock = upstream.SystemClock{}
	}
	providers, names := opts.Providers, slices.Sorted(maps.Keys(opts.Providers))
	if providers == nil {
		providers, names = map[string]provider.Provider{}, nil
		for _, p := range registry(clock) {
			name := p.Spec().Name
			providers[name] = p
			names = append(names, name)
		}
	}
	version := opts.Version
	specs := make(map[string]provider.Spec, len(providers))
	var roots []upstream.HostRoots
	for name, p := range providers {
		specs[name] = p.Spec()
		if r := specs[name].TrustedRoots; r != nil {
			roots = append(roots, *r)
		}
	}
	b := &backend{
		providers:      providers,
		specs:          specs,
		names:          names,
		ctx:            ctx,
		cancel:         cancel,
		states:         map[string]*configState{},
		sched:          newSchedule(),
		transports:     map[[32]byte]*sharedTransport{},
		metrics:        newMetrics(),
		clock:          clock,
		now:            clock.Now,
		extraRoots:     roots,
		refreshTimeout: defaultRefreshTimeout,
	}
	b.fields = b.providerFields()
	b.Backend = &framework.Backend{
		Help:           b.backendHelp(),
		BackendType:    logical.TypeLogical,
		RunningVersion: version,
		PathsSpecial: &logical.Paths{
			SealWrapStorage: []string{configPrefix, tokenPrefix},
			// A rotation record belongs to the cluster whose node made the
			// call: a performance secondary rotates nothing and must not
			// replay a primary's record (azure, gcp and openldap do the same).
			LocalStorage: []string{framework.WALPrefix},
		},
		Paths: framework.PathAppend(
			b.pathConfig(),
			b.pathRoles(),
			b.pathCreds(),
			b.pathRotateRoot(),
			b.pathRetire(),
			b.pathSettings(),
			b.pathMetrics(),
		),
		Secrets:        []*framework.Secret{b.secretToken()},
		Invalidate:     b.invalidate,
		Clean:          b.clean,
		PeriodicFunc:   b.periodicFunc,
		WALRollback:    b.walRollback,
		InitializeFunc: b.initialize,
		// An interrupted rotation is recovered once its record is this old.
		WALRollbackMinAge: cmp.Or(opts.WALRollbackMinAge, walRecoverAfter),
	}
	return b
}

// clean lets the refreshes under way finish and be stored before the mount
// is unloaded (a reload, a step-down, a seal): a rotation the broker has
// applied is gone for good if it is dropped here. The wait is bounded by
// the broker call's own timeout; only then are calls still waiting on the
// broker cancelled. A rotated secret whose storage write failed earlier is
// tried once more.
func (b *backend) clean(context.Context) {
	b.lifeMu.Lock()
	b.closing.Store(true)
	b.lifeMu.Unlock()
	done := make(chan struct{})
	go func() {
		b.wg.Wait()
		close(done)
	}()
	timer := time.NewTimer(b.refreshTimeout)
	select {
	case <-done:
	case <-timer.C:
	}
	timer.Stop()
	b.cancel()
	<-done

	ctx, cancel := context.WithTimeout(context.Background(), persistTimeout)
	defer cancel()
	b.unloadAll(ctx)
	b.trMu.Lock()
	for _, sh := range b.transports {
		sh.tr.CloseIdleConnections()
	}
	b.transports = map[[32]byte]*sharedTransport{}
	b.trMu.Unlock()
}

// invalidate drops the in-memory state of a config another node changed.
func (b *backend) invalidate(_ context.Context, key string) {
	if key == settingsKey {
		b.settingsCache.Store(nil)
		return
	}
	if name, ok := strings.CutPrefix(key, rolePrefix); ok {
		b.roles.invalidate(name)
		return
	}
	for _, p := range []string{configPrefix, tokenPrefix} {
		if name, ok := strings.CutPrefix(key, p); ok {
			b.forgetName(name)
			// Re-read at the next tick: the change may alter its schedule.
			b.sched.set(name, b.now())
		}
	}
}

// backendHelp is the mount's help, naming the registered brokers.
func (b *backend) backendHelp() string {
	displays := make([]string, len(b.names))
	for i, name := range b.names {
		displays[i] = b.specs[name].Display
	}
	return fmt.Sprintf(`The broker secrets engine keeps trading brokers' long-lived API secrets
(%s) and hands out short-lived access tokens as Vault leases.

Write a broker's secret to config/<name>; read creds/<name> for a token.
Secrets are write-only: config reads show settings and status only.`, strings.Join(displays, ", "))
}
