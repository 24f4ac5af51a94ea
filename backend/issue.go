package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"sync"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// issue makes one call to the broker under cfg with the given secrets. For a
// provider that rotates its long-lived secret it first writes a rotation
// record (returned as walID) so that a crash between the broker's answer and
// the storage write is recovered; the caller deletes it once the outcome is
// stored. epoch is the config's retire epoch when the call started.
func (b *backend) issue(ctx context.Context, name string, cfg *brokerConfig, client *upstream.Client, secrets map[string]string, epoch uint64) (*refreshed, string, error) {
	started := b.now()
	p, ok := b.providers[cfg.Provider]
	if !ok {
		return nil, "", fmt.Errorf("provider %q is not supported by this plugin version", cfg.Provider)
	}
	spec := b.specs[cfg.Provider]
	endpoint := baseURL(spec, cfg)
	if !cfg.SecretExpiresAt.IsZero() && !started.Before(cfg.SecretExpiresAt) {
		return nil, "", fmt.Errorf("%w: %s", errSecretExpired, cfg.expiryWarning(started))
	}
	// The allow-list may have tightened since the config was written: the
	// secret is never sent to a host it no longer allows.
	ms, err := b.settings(ctx, b.storage)
	if err != nil {
		return nil, "", err
	}
	if !ms.hostAllowed(endpoint, spec.Environments) {
		return nil, "", fmt.Errorf("%w: base_url %s is not in the mount's allowed_hosts; the secret was not sent", provider.ErrGuard, endpoint)
	}
	if client == nil {
		if client, err = b.newClient(spec, cfg); err != nil {
			return nil, "", err
		}
		defer client.Close()
	}
	var walID string
	if spec.RotatesSecret {
		if !b.canWrite() {
			return nil, "", logical.ErrReadOnly
		}
		if walID, err = b.putRotationWAL(ctx, name); err != nil {
			return nil, "", fmt.Errorf("recording the rotation intent: %w", err)
		}
	}
	tok, err := p.Issue(ctx, provider.Request{
		BaseURL:         endpoint,
		Environment:     cfg.Environment,
		Client:          client,
		Secrets:         secrets,
		AllowedAccounts: cfg.AllowedAccounts,
		RequireReadOnly: cfg.RequireReadOnly,
		ReserveQuota:    b.reserveQuota(cfg),
		Now:             b.now,
	})
	if err != nil {
		var re *provider.RotatedError
		if errors.As(err, &re) && len(re.Rotated) > 0 {
			// Failed after the broker replaced the secret: the rotation is
			// stored all the same.
			return &refreshed{rotated: re.Rotated, secretExpiresAt: re.SecretExpiresAt}, walID, err
		}
		return nil, walID, err
	}
	st := toStored(tok)
	st.RefreshStarted = started
	st.Epoch = epoch
	if st.ExpiresAt.IsZero() {
		// A passthrough token's age is the age of its validation, on the
		// clock the token core judges freshness by.
		st.IssuedAt = b.now()
	}
	return &refreshed{tok: st, rotated: tok.Rotated, secretExpiresAt: tok.SecretExpiresAt}, walID, nil
}

// rejectedSecret reports whether err is the broker refusing the long-lived
// secret (as opposed to failing or rate-limiting).
func rejectedSecret(err error) bool {
	ue, ok := upstream.AsError(err)
	return ok && ue.Failure == upstream.Unauthorized
}

func toStored(t *provider.Token) *storedToken {
	sum := sha256.Sum256([]byte(t.AccessToken))
	return &storedToken{
		ID:          hex.EncodeToString(sum[:12]),
		AccessToken: t.AccessToken,
		IssuedAt:    t.IssuedAt,
		ExpiresAt:   t.ExpiresAt,
		AccountIDs:  provider.NonNil(t.AccountIDs),
		ReadOnly:    t.ReadOnly,
		Details:     t.Details,
	}
}

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

func baseURL(spec provider.Spec, cfg *brokerConfig) string {
	if cfg.BaseURL != "" {
		return cfg.BaseURL
	}
	return spec.Environments[cfg.Environment]
}
