package backend

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

func (b *backend) pathCreds() []*framework.Path {
	return []*framework.Path{{
		Pattern: "creds/" + framework.GenericNameRegex("name"),
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the config or role to issue a token from.", Required: true},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathCredsRead, Summary: "Issue a short-lived broker token as a lease."},
		},
		HelpSynopsis:    "Issue a short-lived access token for the broker of config/<name> (or of role <name>'s config, within the role's scope), as a Vault lease.",
		HelpDescription: fmt.Sprintf(strings.TrimSpace(credsHelp), b.helpTable(func(s provider.Spec) string { return s.DetailsHelp })),
	}}
}

const credsHelp = `
<name> is a config or a role (roles/<name>). Returns access_token, expires_at
(RFC 3339), provider, account_ids, readonly, config and role (empty for a read
of the config itself), plus what the broker reports about the token:

%s

Every reader of a config shares one cached token; it is refreshed in the
background before it expires, so reads do not wait on the broker. The lease TTL
is min(ttl, the token's remaining life): renewing extends it up to the token's
expiry, never past it. Revoking a lease ends that lease only: other readers
share the token, and no broker can kill a minted token, so it lives until its
own expiry. To stop handing out the current token, write config/<name>/retire.
`

func (b *backend) pathCredsRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	role, err := b.roleFor(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	configName, roleName := name, ""
	var (
		cfg *brokerConfig
		tok *storedToken
	)
	if role != nil {
		configName, roleName = role.Config, role.Name
		cfg, tok, err = b.roleToken(ctx, req.Storage, role)
	} else {
		cfg, tok, err = b.currentToken(ctx, req.Storage, name)
	}
	if errors.Is(err, errConfigNotFound) {
		return nil, logical.CodedError(http.StatusNotFound, fmt.Sprintf("no config or role named %q: write config/%s or roles/%s first", name, name, name))
	}
	if errors.Is(err, logical.ErrReadOnly) {
		return nil, logical.ErrReadOnly // Vault forwards it to the active node
	}
	if err != nil {
		b.countCredsError(configName, role)
		return failed(issuing, fmt.Sprintf("%s: %v", b.credsSubject(configName, role), err), err)
	}
	if err := b.checkAllGuards(cfg, role, tok); err != nil {
		return failed(issuing, fmt.Sprintf("%s: %v", b.credsSubject(configName, role), err), err)
	}
	now := b.now()
	bounds := boundsFor(cfg, role)
	ttl, err := leaseTTL(bounds, b.specs[cfg.Provider].DefaultTTL, tok, now, now)
	if err != nil {
		return nil, logical.CodedError(http.StatusBadGateway, fmt.Sprintf("%s: %v", b.credsSubject(configName, role), err))
	}

	data := map[string]any{
		"access_token": tok.AccessToken,
		"expires_at":   formatTime(tok.ExpiresAt),
		"provider":     cfg.Provider,
		"account_ids":  tok.AccountIDs,
		"readonly":     tok.ReadOnly,
		"config":       configName,
		"role":         roleName,
	}
	for k, v := range tok.details() {
		if _, taken := data[k]; !taken {
			data[k] = v
		}
	}
	resp := b.Secret(secretTokenType).Response(data, map[string]any{
		"config":   configName,
		"role":     roleName,
		"token_id": tok.ID,
		"epoch":    tok.Epoch,
		// Which config of this name issued the lease: one written again
		// after a delete never renews the old one's leases.
		"config_instance": cfg.Instance,
		"expires_at":      formatTimeNano(tok.ExpiresAt),
		"issued_at":       formatTimeNano(tok.IssuedAt),
		"account_ids":     tok.AccountIDs,
		"readonly":        tok.ReadOnly,
	})
	if w := cfg.expiryWarning(now); w != "" {
		resp.AddWarning(w)
	}
	if w := b.staleWarning(ctx, req.Storage, configName); w != "" {
		resp.AddWarning(w)
	}
	resp.Secret.TTL = ttl
	if !tok.ExpiresAt.IsZero() && ttl < shortLease {
		// A lease this short ends at the refresh point or past it: renewing
		// it cannot help (renew gives one second there), and a client that
		// renews short leases keeps the old token too long. Not renewable:
		// clients read again when it ends, and get the next token.
		resp.Secret.Renewable = false
	}
	// The lease can never be renewed past max_ttl nor past the token's end.
	resp.Secret.MaxTTL = bounds.MaxTTL
	if !tok.ExpiresAt.IsZero() {
		left := tok.ExpiresAt.Sub(now).Truncate(time.Second)
		if resp.Secret.MaxTTL == 0 || left < resp.Secret.MaxTTL {
			resp.Secret.MaxTTL = left
		}
	}
	return resp, nil
}

// credsSubject names what a creds read or renew was for, in messages.
func (b *backend) credsSubject(config string, role *roleEntry) string {
	if role == nil {
		return fmt.Sprintf("config %q", config)
	}
	return fmt.Sprintf("role %q (config %q)", role.Name, config)
}

// checkAllGuards applies the config's guards and, for a role, the role's.
func (b *backend) checkAllGuards(cfg *brokerConfig, role *roleEntry, tok *storedToken) error {
	if err := checkGuards(cfg, tok); err != nil {
		return err
	}
	if role != nil {
		return checkRoleGuards(b.specs[cfg.Provider], role, tok)
	}
	return nil
}

// leaseTTL is min(ttl, the shaped life of a lease on the token (see
// shapedTTL), what max_ttl leaves since issued). defaultTTL applies when the
// config sets no ttl; zero means as long as the token allows.
func leaseTTL(cfg *brokerConfig, defaultTTL time.Duration, tok *storedToken, issued, now time.Time) (time.Duration, error) {
	ttl := cfg.TTL
	if ttl == 0 {
		ttl = defaultTTL
	}
	if !tok.ExpiresAt.IsZero() {
		remaining := tok.ExpiresAt.Sub(now).Truncate(time.Second)
		if remaining <= 0 {
			return 0, fmt.Errorf("the %s token expired at %s", cfg.Provider, formatTime(tok.ExpiresAt))
		}
		if shaped := shapedTTL(tok, now); ttl == 0 || shaped < ttl {
			ttl = shaped
		}
	}
	if cfg.MaxTTL > 0 {
		left := issued.Add(cfg.MaxTTL).Sub(now).Truncate(time.Second)
		if left <= 0 {
			return 0, fmt.Errorf("the lease reached max_ttl (%s)", cfg.MaxTTL)
		}
		ttl = min(ttl, left)
	}
	if ttl <= 0 {
		ttl = time.Hour
	}
	return ttl, nil
}

// shortLease: a lease shorter than this on a minted token is not renewable.
// LifetimeWatcher and Agent give up renewing once a renewal stops extending
// the lease within 10-20 % of its length; below ten seconds that margin is
// under Vault's one-second granularity.
const shortLease = 10 * time.Second

// minLease is the shortest lease handed out while the token allows it.
// Agent (consul-template) drops a read that lands in the same wall-clock
// second as the one before ("no new data (index was the same)"), and it
// re-reads a non-renewable lease at 85-95 % of it: a one-second lease made
// it drop the new token and keep the old one to its end.
const minLease = 2 * time.Second

// shapedTTL is how long a lease on tok lasts so that its holder (Vault
// Agent, a LifetimeWatcher, a bot re-reading at its lease's end) moves to
// the next token with well over a quarter of the old one's life left, not a
// tenth: a Vault blip or an Agent restart at that moment must not leave a
// bot holding a dying token. Clients re-read a little before their lease
// ends, so the lease ends where the refresh ahead is due; a read after
// that point (which starts the refresh) gets a short lease, and the next
// read gets the new token. The refresh rate does not change.
func shapedTTL(tok *storedToken, now time.Time) time.Duration {
	life := tok.ExpiresAt.Sub(tok.IssuedAt)
	remaining := tok.ExpiresAt.Sub(now)
	if tok.IssuedAt.IsZero() {
		life = 0 // a lease from before issued_at was recorded: no shaping
	}
	if until := remaining - refreshLeft(life); until >= minLease {
		// Every lease on one token would end in the same second, and Vault
		// would revoke them in one burst that stalls reads on every mount;
		// ending each up to a tenth (at most 30 s) early spreads them out.
		// Never under minLease (the spread on an until of 2.1 s made 1 s
		// leases, which Agent mishandles); minLease <= until, so the lease
		// still ends at the refresh point at the latest.
		ttl := until - rand.N(min(until/10, 30*time.Second)+1)
		return max(ttl.Truncate(time.Second), minLease)
	}
	short := min(max(life/40, minLease), remaining)
	return max(short.Truncate(time.Second), time.Second)
}

func formatTimeNano(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}
