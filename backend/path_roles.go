package backend

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

func (b *backend) pathRoles() []*framework.Path {
	fields := map[string]*framework.FieldSchema{
		"name": {Type: framework.TypeString, Description: "Name of the role; its readers read creds/<name>. Configs and roles share one namespace.", Required: true},
		"config": {Type: framework.TypeString,
			Description: "The config whose secret the role uses. Required on create; cannot change later."},
		"allowed_accounts": {Type: framework.TypeCommaStringSlice,
			Description: "Accounts the role's tokens may reach, within the config's own allowed_accounts. Brokers that narrow at issue (ALOR allowedPortfolios) mint the role's token narrowed; for any other broker the role is refused while the config's token reaches another account."},
		"require_readonly": {Type: framework.TypeBool,
			Description: "Refuse the role's tokens unless the broker reports they cannot trade (checked at role write, creds read and renew)."},
		"ttl":     {Type: framework.TypeDurationSecond, Description: "Lease TTL of the role's creds, never above the config's. Default: the config's."},
		"max_ttl": {Type: framework.TypeDurationSecond, Description: "Longest a lease of the role may be renewed to, counted from its issue; never above the config's."},
	}
	return []*framework.Path{
		{
			Pattern: "roles/?$",
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: b.pathRolesList, Summary: "List the roles."},
			},
			HelpSynopsis:    "List roles.",
			HelpDescription: "Lists the names of the roles; read roles/<name> for one's fields and what its token reaches.",
		},
		{
			Pattern:        "roles/" + framework.GenericNameRegex("name"),
			Fields:         fields,
			ExistenceCheck: b.pathRoleExists,
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.CreateOperation: &framework.PathOperation{Callback: b.pathRoleWrite, Summary: "Create a role: one consumer's scope over a config.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRoleWrite, Summary: "Update a role; omitted fields keep their values.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
				logical.ReadOperation:   &framework.PathOperation{Callback: b.pathRoleRead, Summary: "The role's fields and what its current token reaches; never a token."},
				logical.DeleteOperation: &framework.PathOperation{Callback: b.pathRoleDelete, Summary: "Delete a role; its leases no longer renew.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
			},
			HelpSynopsis:    "A narrower view of one config for one kind of consumer: fewer accounts, no trading rights, a shorter lease.",
			HelpDescription: strings.TrimSpace(rolesHelp),
		},
	}
}

const rolesHelp = `
A role gives its readers (creds/<role>) tokens of its config's secret, never
broader than the config allows: the config's guards always apply, and the
role's own allowed_accounts and require_readonly on top. The secret is stored
once, in the config, and rotated once.

Tokens are shared by what the broker is asked for: a role that asks the broker
for the same token as its config (any role over a broker that cannot narrow,
or an ALOR role without allowed_accounts of its own) shares the config's
cached token; an ALOR role with its own allowed_accounts gets a token minted
narrowed to them, cached and refreshed like the config's.

Deleting a role ends nothing upstream; its leases can no longer be renewed.
config/<name>/retire retires the tokens of the config and of all its roles.
`

func (b *backend) pathRoleExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	r, err := readRole(ctx, req.Storage, d.Get("name").(string))
	return r != nil, err
}

func (b *backend) pathRolesList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	keys, err := req.Storage.List(ctx, rolePrefix)
	if err != nil {
		return nil, fmt.Errorf("listing roles: %w", err)
	}
	return logical.ListResponse(keys), nil
}

func (b *backend) pathRoleWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	r, err := b.putRole(ctx, req.Storage, name, func(old *roleEntry) (*roleEntry, error) {
		return parseRole(d, old)
	})
	var (
		rf *refusal
		ve *verifyError
	)
	switch {
	case errors.As(err, &rf):
		return logical.ErrorResponse(rf.msg), nil
	case errors.As(err, &ve):
		return failed(verifying, ve.msg, ve.err)
	case err != nil:
		return nil, err
	}
	return &logical.Response{Data: b.roleData(ctx, req.Storage, r)}, nil
}

// parseRole builds the role from the request over old (nil on create);
// every error names its field and nothing is stored on one.
func parseRole(d *framework.FieldData, old *roleEntry) (*roleEntry, error) {
	for k := range d.Raw {
		if _, ok := d.Schema[k]; !ok {
			return nil, refuse("%s: unknown field", k)
		}
		if _, _, err := d.GetOkErr(k); err != nil {
			return nil, refuse("%s: invalid value: %v", k, err)
		}
	}
	r := &roleEntry{}
	if old != nil {
		r = &roleEntry{Config: old.Config, AllowedAccounts: old.AllowedAccounts, RequireReadOnly: old.RequireReadOnly, TTL: old.TTL, MaxTTL: old.MaxTTL}
	}
	if v, ok := d.GetOk("config"); ok {
		c := strings.TrimSpace(v.(string))
		if old != nil && c != old.Config {
			return nil, refuse("config: cannot change from %q to %q; delete the role and create it again", old.Config, c)
		}
		r.Config = c
	}
	if r.Config == "" {
		return nil, refuse("config: required: the config whose secret the role uses")
	}
	if v, ok := d.GetOk("allowed_accounts"); ok {
		accts, err := normalizeAccounts(v.([]string))
		if err != nil {
			return nil, refuse("%v", err)
		}
		r.AllowedAccounts = accts
	}
	if v, ok := d.GetOk("require_readonly"); ok {
		r.RequireReadOnly = v.(bool)
	}
	for _, f := range []struct {
		name string
		dst  *time.Duration
	}{{"ttl", &r.TTL}, {"max_ttl", &r.MaxTTL}} {
		if v, ok := d.GetOk(f.name); ok {
			secs := v.(int)
			if secs < 0 {
				return nil, refuse("%s: must not be negative", f.name)
			}
			*f.dst = time.Duration(secs) * time.Second
		}
	}
	if r.MaxTTL > 0 && r.TTL > r.MaxTTL {
		return nil, refuse("ttl: %s is above max_ttl (%s)", r.TTL, r.MaxTTL)
	}
	return r, nil
}

func (b *backend) pathRoleRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	r, err := b.roleFor(ctx, req.Storage, d.Get("name").(string))
	if err != nil || r == nil {
		return nil, err
	}
	return &logical.Response{Data: b.roleData(ctx, req.Storage, r)}, nil
}

// roleData is what a role read shows: its fields and what its current
// token reaches, never the token.
func (b *backend) roleData(ctx context.Context, s logical.Storage, r *roleEntry) map[string]any {
	data := map[string]any{
		"config":           r.Config,
		"allowed_accounts": provider.NonNil(r.AllowedAccounts),
		"require_readonly": r.RequireReadOnly,
		"ttl":              int64(r.TTL / time.Second),
		"max_ttl":          int64(r.MaxTTL / time.Second),
		"updated_at":       formatTime(r.UpdatedAt),
		"narrowed":         false,
		"token_expires_at": "",
		"account_ids":      []string{},
		"readonly":         nil,
	}
	cfg, rec, err := b.view(ctx, s, r.Config)
	if err != nil || cfg == nil {
		return data
	}
	req := b.requestFor(cfg, r)
	data["narrowed"] = req.key != ""
	if tok := rec.tokenOf(req.key); tok != nil {
		data["token_expires_at"] = formatTime(tok.ExpiresAt)
		data["account_ids"] = tok.AccountIDs
		data["readonly"] = tok.ReadOnly
	}
	return data
}

func (b *backend) pathRoleDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	return nil, b.deleteRole(ctx, req.Storage, d.Get("name").(string))
}
