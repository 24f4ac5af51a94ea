package backend

import (
	"crypto/sha256"
	"net/http"
	"sync"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Connection pools: one HTTP client per config, over a pool shared by the
// configs that trust the same CAs.

// newClient builds the HTTP client of one config: its broker's limits over
// the connection pool shared by configs that trust the same CAs. Closing
// the client releases its share of the pool.
func (b *backend) newClient(spec provider.Spec, cfg *brokerConfig) (*upstream.Client, error) {
	tr, release, err := b.transport(cfg.CACert)
	if err != nil {
		return nil, err
	}
	c, err := upstream.New(upstream.Options{
		Broker:        spec.Display,
		Transport:     tr,
		RatePerMinute: spec.RatePerMinute,
		RatePerOp:     spec.RatePerOp,
		MaxConcurrent: spec.MaxConcurrent,
		Clock:         b.clock,
		Observe:       b.metrics.observeUpstream(spec.Name),
		OnClose:       release,
	})
	if err != nil {
		release()
	}
	return c, err
}

// sharedTransport is a connection pool and the clients using it.
type sharedTransport struct {
	tr    *http.Transport
	users int
}

// transport returns the connection pool shared by every client that trusts
// the same CAs (most trust the system roots: one pool for the mount) and
// the release its user calls when done; the last release closes the pool,
// so refused writes with made-up CAs leave nothing behind.
func (b *backend) transport(caPEM string) (*http.Transport, func(), error) {
	key := sha256.Sum256([]byte(caPEM))
	b.trMu.Lock()
	defer b.trMu.Unlock()
	sh, ok := b.transports[key]
	if !ok {
		tr, err := upstream.NewTransport(caPEM, b.extraRoots...)
		if err != nil {
			return nil, nil, err
		}
		sh = &sharedTransport{tr: tr}
		b.transports[key] = sh
	}
	sh.users++
	return sh.tr, sync.OnceFunc(func() {
		b.trMu.Lock()
		defer b.trMu.Unlock()
		if sh.users--; sh.users == 0 {
			sh.tr.CloseIdleConnections()
			if b.transports[key] == sh {
				delete(b.transports, key)
			}
		}
	}), nil
}
