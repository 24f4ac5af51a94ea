package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// issue makes one call to the broker under cfg with the given secrets. For a
// provider that rotates its long-lived secret it first writes a rotation
// record (returned as walID) so that a crash between the broker's answer and
// the storage write is recovered; the caller deletes it once the outcome is
// stored. accounts are what a broker that narrows is asked to narrow to (the
// config's allowed_accounts, or a role's); epoch is the config's retire
// epoch when the call started.
func (b *backend) issue(ctx context.Context, name string, cfg *brokerConfig, client *upstream.Client, secrets map[string]string, accounts []string, epoch uint64) (*refreshed, string, error) {
	started := b.now()
	p, ok := b.providers[cfg.Provider]
	if !ok {
		return nil, "", fmt.Errorf("provider %q is not supported by this plugin version", cfg.Provider)
	}
	spec := b.specs[cfg.Provider]
	endpoint := baseURL(spec, cfg)
	if !cfg.SecretExpiresAt.IsZero() && !started.Before(cfg.SecretExpiresAt) {
		if spec.RenewSecret != "" {
			return nil, "", fmt.Errorf("%w: %s; %s", errSecretExpired, cfg.expiryWarning(started), spec.RenewSecret)
		}
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
		Written:         cfg.Secrets,
		AllowedAccounts: accounts,
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
	st, derr := toStored(tok)
	if derr != nil {
		// A provider bug, not the broker's: the token is good, its extra
		// facts are not shown.
		b.Logger().Warn("token details not kept", "config", name, "error", derr)
	}
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

// toStored keeps a minted token as the core caches and persists it. Its
// details are kept encoded: thousands of warm configs each holding a few
// small maps cost megabytes; the bytes are decoded only when shown.
func toStored(t *provider.Token) (*storedToken, error) {
	sum := sha256.Sum256([]byte(t.AccessToken))
	details, err := encodeDetails(t.Details)
	return &storedToken{
		ID:          hex.EncodeToString(sum[:12]),
		AccessToken: t.AccessToken,
		IssuedAt:    t.IssuedAt,
		ExpiresAt:   t.ExpiresAt,
		AccountIDs:  provider.NonNil(t.AccountIDs),
		ReadOnly:    t.ReadOnly,
		Details:     details,
	}, err
}

// encodeDetails is a token's details as JSON. Its error names the keys and
// the Go types that failed, never json's own message: that may quote the
// value (an invalid json.Number, a marshaler's error), and a provider's
// details are not promised to be free of secrets.
func encodeDetails(d map[string]any) (json.RawMessage, error) {
	if len(d) == 0 {
		return nil, nil
	}
	raw, err := json.Marshal(d)
	if err == nil {
		return raw, nil
	}
	var bad []string
	for _, k := range slices.Sorted(maps.Keys(d)) {
		if _, kerr := json.Marshal(d[k]); kerr != nil {
			bad = append(bad, fmt.Sprintf("%q (%T)", k, d[k]))
		}
	}
	return nil, fmt.Errorf("encoding the token's details: %s not encodable as JSON", strings.Join(bad, ", "))
}

func baseURL(spec provider.Spec, cfg *brokerConfig) string {
	if cfg.BaseURL != "" {
		return cfg.BaseURL
	}
	return spec.Environments[cfg.Environment]
}
