package backend

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

const secretTokenType = "broker_token"

// A revoke this close to the lease's end is Vault expiring it, not a person
// revoking it early; expiry must not evict a token other leases share.
const naturalExpirySlack = 2 * time.Second

func (b *backend) secretToken() *framework.Secret {
	return &framework.Secret{
		Type: secretTokenType,
		Fields: map[string]*framework.FieldSchema{
			"access_token": {Type: framework.TypeString, Description: "The short-lived broker token."},
			"expires_at":   {Type: framework.TypeString, Description: "When the token expires upstream (RFC 3339)."},
			"provider":     {Type: framework.TypeString, Description: "The broker."},
			"account_ids":  {Type: framework.TypeStringSlice, Description: "Accounts the token reaches."},
			"readonly":     {Type: framework.TypeBool, Description: "Whether the broker reports the token cannot trade."},
		},
		Renew:  b.renewToken,
		Revoke: b.revokeToken,
	}
}

// renewToken extends a lease up to the token's expiry, never past it, and
// only while the config exists and its guards still hold.
func (b *backend) renewToken(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	in, err := parseInternal(req.Secret.InternalData)
	if err != nil {
		return nil, err
	}
	cfg, err := b.config(ctx, req.Storage, in.config)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q was deleted: the lease cannot be renewed; read creds of an existing config", in.config))
	}
	spec := b.specs[cfg.Provider]
	tok := &storedToken{ExpiresAt: in.expiresAt, AccountIDs: in.accounts, ReadOnly: in.readonly}
	if spec.Kind == provider.Passthrough {
		// The lease holds the long-lived token itself: renewing means asking
		// the broker again whether it still lives and what it can reach.
		_, fresh, err := b.tokenNoOlderThan(ctx, req.Storage, in.config, renewMaxAge)
		if err != nil {
			if rejectedSecret(err) {
				return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q: cannot renew: %v", in.config, err))
			}
			return nil, upstreamFailure(in.config, err)
		}
		if fresh.ID != in.tokenID {
			return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q: cannot renew: the config now holds a different %s token; read creds/%s again", in.config, spec.Display, in.config))
		}
		tok = fresh
	}
	if err := checkGuards(cfg, tok); err != nil {
		return nil, logical.CodedError(http.StatusForbidden, fmt.Sprintf("config %q: %v", in.config, err))
	}
	now := b.now()
	ttl, err := leaseTTL(cfg, spec.DefaultTTL, tok, req.Secret.IssueTime, now)
	if err != nil {
		return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q: cannot renew: %v; read creds/%s for a new token", in.config, err, in.config))
	}
	resp := &logical.Response{Secret: req.Secret}
	resp.Secret.TTL = ttl
	resp.Secret.InternalData["lease_end"] = formatTimeNano(now.Add(ttl))
	return resp, nil
}

// revokeToken never fails for a token that is already gone. An early revoke
// retires the token from the cache; one at the lease's natural end does not.
func (b *backend) revokeToken(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	in, err := parseInternal(req.Secret.InternalData)
	if err != nil {
		// A lease we cannot read must still go: a stuck lease blocks
		// `vault secrets disable`.
		b.Logger().Warn("revoking a lease with unreadable internal data", "error", err)
		return nil, nil
	}
	if in.leaseEnd.IsZero() || !b.now().Before(in.leaseEnd.Add(-naturalExpirySlack)) {
		return nil, nil
	}
	if err := b.retire(ctx, req.Storage, in.config, in.tokenID); err != nil {
		return nil, fmt.Errorf("retiring the token of %q: %w", in.config, err)
	}
	return nil, nil
}

type leaseInternal struct {
	config    string
	tokenID   string
	expiresAt time.Time
	leaseEnd  time.Time
	accounts  []string
	readonly  bool
}

// parseInternal reads a lease's internal data, which arrives JSON-decoded
// (strings, bools, []any) after crossing the plugin boundary.
func parseInternal(m map[string]any) (leaseInternal, error) {
	var in leaseInternal
	var ok bool
	if in.config, ok = m["config"].(string); !ok || in.config == "" {
		return in, fmt.Errorf("lease has no config name")
	}
	in.tokenID, _ = m["token_id"].(string)
	in.readonly, _ = m["readonly"].(bool)
	for _, k := range []struct {
		key string
		dst *time.Time
	}{{"expires_at", &in.expiresAt}, {"lease_end", &in.leaseEnd}} {
		if s, _ := m[k.key].(string); s != "" {
			t, err := time.Parse(time.RFC3339Nano, s)
			if err != nil {
				return in, fmt.Errorf("lease %s: %w", k.key, err)
			}
			*k.dst = t
		}
	}
	switch v := m["account_ids"].(type) {
	case []string:
		in.accounts = v
	case []any:
		for _, a := range v {
			if s, ok := a.(string); ok {
				in.accounts = append(in.accounts, s)
			}
		}
	}
	return in, nil
}
