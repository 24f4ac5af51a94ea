package backend

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

const secretTokenType = "broker_token"

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
	var role *roleEntry
	if in.role != "" {
		if role, err = b.roleFor(ctx, req.Storage, in.role); err != nil {
			return nil, err
		}
		if role == nil || role.Config != in.config {
			return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("role %q was deleted: the lease cannot be renewed; read creds of an existing role", in.role))
		}
	}
	cfg, rec, err := b.view(ctx, req.Storage, in.config)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q was deleted: the lease cannot be renewed; read creds of an existing config", in.config))
	}
	subject := b.credsSubject(in.config, role)
	if in.configInstance != cfg.Instance {
		return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q was deleted and written again since this lease was issued: the lease cannot be renewed; read creds/%s for a new token", in.config, cmp.Or(in.role, in.config)))
	}
	spec := b.specs[cfg.Provider]
	tok := &storedToken{IssuedAt: in.issuedAt, ExpiresAt: in.expiresAt, AccountIDs: in.accounts, ReadOnly: in.readonly}
	if spec.Issuance == provider.Passthrough {
		// The lease holds the long-lived token itself: renewing means asking
		// the broker again whether it still lives and what it can reach.
		// Every renew asks the broker (concurrent renews share one call).
		freshCfg, fresh, err := b.refreshNow(ctx, req.Storage, in.config)
		if err != nil {
			return failed(renewing, fmt.Sprintf("%s: cannot renew: %v", subject, err), err)
		}
		cfg = freshCfg // the guards that hold now, not those read before the call
		if fresh.ID != in.tokenID {
			return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("config %q: cannot renew: the config now holds a different %s token; read creds/%s again", in.config, spec.Display, cmp.Or(in.role, in.config)))
		}
		tok = fresh
	}
	if err := b.checkAllGuards(cfg, role, tok); err != nil {
		return failed(renewing, fmt.Sprintf("%s: %v", subject, err), err)
	}
	now := b.now()
	ttl, err := leaseTTL(boundsFor(cfg, role), spec.DefaultTTL, tok, req.Secret.IssueTime, now)
	if err != nil {
		return nil, logical.CodedError(http.StatusBadRequest, fmt.Sprintf("%s: cannot renew: %v; read creds/%s for a new token", subject, err, cmp.Or(in.role, in.config)))
	}
	if spec.Issuance != provider.Passthrough && !tok.IssuedAt.IsZero() && dueForRefresh(tok, now) {
		// Past the refresh point a renew gives one second: a client that
		// only renews (Agent, a LifetimeWatcher) sees the lease stop
		// growing and reads again, and finds the next token, whose refresh
		// this starts. (An error instead makes Agent back off for long.)
		b.nudgeRefresh(ctx, req.Storage, in.config, role)
		ttl = time.Second
	}
	resp := &logical.Response{Secret: req.Secret}
	if spec.Issuance != provider.Passthrough && in.epoch < rec.RetireEpoch {
		// The lease's token was retired (config/<name>/retire): the lease
		// ends now, so Agent, a LifetimeWatcher or a bot reads again and
		// moves to a token minted after the retire.
		ttl = time.Second
		resp.AddWarning(fmt.Sprintf("config %q: the token of this lease was retired at %s; the lease ends now: read creds/%s for a new token", in.config, formatTime(rec.RetiredBefore), cmp.Or(in.role, in.config)))
	}
	resp.Secret.TTL = ttl
	return resp, nil
}

// revokeToken ends the lease and nothing else. Vault calls it for an
// operator's lease revoke, for every lease of a reader's Vault token that is
// revoked or expires, for max_lease_ttl and for tools that end leases as
// routine; it cannot tell them apart, so it never evicts the token other
// readers share (config/<name>/retire is the incident switch). No broker
// can revoke a minted token, so there is nothing to call upstream.
func (b *backend) revokeToken(context.Context, *logical.Request, *framework.FieldData) (*logical.Response, error) {
	return nil, nil
}

type leaseInternal struct {
	config  string
	role    string // empty for a lease of the config itself
	tokenID string
	// configInstance is the issuing config's Instance (empty for configs
	// and leases from before it was kept).
	configInstance string
	// epoch is the retire epoch the token was obtained under (0 for leases
	// from before it was recorded: any retire ends them).
	epoch     uint64
	expiresAt time.Time
	issuedAt  time.Time
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
	in.role, _ = m["role"].(string)
	in.configInstance, _ = m["config_instance"].(string)
	in.readonly, _ = m["readonly"].(bool)
	switch e := m["epoch"].(type) {
	case float64:
		in.epoch = uint64(e)
	case json.Number:
		n, _ := e.Int64()
		in.epoch = uint64(n)
	case uint64:
		in.epoch = e
	case int:
		in.epoch = uint64(e)
	}
	for _, k := range []struct {
		key string
		dst *time.Time
	}{{"expires_at", &in.expiresAt}, {"issued_at", &in.issuedAt}} {
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
