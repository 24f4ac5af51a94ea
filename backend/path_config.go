package backend

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

func (b *backend) pathConfig() []*framework.Path {
	allowed := make([]any, len(b.names))
	for i, name := range b.names {
		allowed[i] = name
	}
	fields := map[string]*framework.FieldSchema{
		"name": {Type: framework.TypeString, Description: "Name of the config; creds are read at creds/<name>.", Required: true},
		"provider": {Type: framework.TypeString, Description: "The broker: " + orList(b.names) + ". Required on create; cannot change later.",
			AllowedValues: allowed},
		"environment": {Type: framework.TypeString, Default: "production",
			Description: "production (default)" + b.otherEnvironments() + ". An environment the provider lacks is an error."},
		"base_url": {Type: framework.TypeString, Description: "Override the broker's endpoint (a proxy or test double). https is required, except for loopback addresses."},
		"ca_cert":  {Type: framework.TypeString, Description: "PEM bundle trusted for the broker's endpoint, replacing the system roots."},
		"ttl": {Type: framework.TypeDurationSecond,
			Description: "Lease TTL. Default: as long as the token lives" + b.defaultTTLs() + ". A lease never outlives the upstream token."},
		"max_ttl":          {Type: framework.TypeDurationSecond, Description: "Longest a lease may be renewed to, counted from its issue."},
		"require_readonly": {Type: framework.TypeBool, Description: "Refuse to issue a token that the broker reports can trade."},
		"allowed_accounts": {Type: framework.TypeCommaStringSlice,
			Description: "Accounts the issued token may reach; a token reaching any other account is refused (or narrowed, where the broker can)."},
		"verify": {Type: framework.TypeBool, Default: true,
			Description: "Check the secret against the broker before storing it (default true). Not stored."},
	}
	// The providers' own fields and the options that apply to them.
	maps.Copy(fields, b.fields)
	return []*framework.Path{
		{
			Pattern: "config/?$",
			Operations: map[logical.Operation]framework.OperationHandler{
				logical.ListOperation: &framework.PathOperation{Callback: b.pathConfigList, Summary: "List the configs."},
			},
			HelpSynopsis:    "List broker configs.",
			HelpDescription: "Lists the names of the configs; read config/<name> for one's settings and status.",
		},
		{
			Pattern:        "config/" + framework.GenericNameRegex("name"),
			Fields:         fields,
			ExistenceCheck: b.pathConfigExists,
			Operations: map[logical.Operation]framework.OperationHandler{
				// Paths that change something upstream before they write
				// storage run on the node that can write.
				logical.CreateOperation: &framework.PathOperation{Callback: b.pathConfigWrite, Summary: "Store a broker's long-lived secret.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
				logical.UpdateOperation: &framework.PathOperation{Callback: b.pathConfigWrite, Summary: "Update a config; omitted fields keep their values.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
				logical.ReadOperation:   &framework.PathOperation{Callback: b.pathConfigRead, Summary: "Settings and status; never a secret."},
				logical.DeleteOperation: &framework.PathOperation{Callback: b.pathConfigDelete, Summary: "Delete a config and its cached token.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
			},
			HelpSynopsis:    "Keep one broker's long-lived secret and the rules for the tokens issued from it.",
			HelpDescription: fmt.Sprintf(strings.TrimSpace(configHelp), b.helpTable(configFieldsLine)),
		},
	}
}

const configHelp = `
Stores a broker's long-lived secret. Fields (and options) by provider:

%s

Secret fields are write-only: a read shows "<field>_set" instead, and surrounding
whitespace is trimmed (so secret=@file works). A write checks the secret with
the broker before storing it unless verify=false; require_readonly and
allowed_accounts are checked then and again at every creds read and renew.

A read shows the settings and the status: when the current token expires, the
accounts and read-only flag the broker reported, the last refresh and the last
upstream error.
`

func (b *backend) pathConfigExists(ctx context.Context, req *logical.Request, d *framework.FieldData) (bool, error) {
	c, err := readConfig(ctx, req.Storage, d.Get("name").(string))
	return c != nil, err
}

func (b *backend) pathConfigList(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	keys, err := req.Storage.List(ctx, configPrefix)
	if err != nil {
		return nil, fmt.Errorf("listing configs: %w", err)
	}
	return logical.ListResponse(keys), nil
}

func (b *backend) pathConfigDelete(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	return nil, b.deleteConfig(ctx, req.Storage, d.Get("name").(string))
}

func (b *backend) pathConfigRead(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	cfg, rec, err := b.view(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return nil, nil
	}
	resp := &logical.Response{Data: b.configData(cfg, rec)}
	if q := b.specs[cfg.Provider].Quota; q != nil {
		n, err := b.quotaUsedToday(ctx, req.Storage, q, cfg)
		if err != nil {
			return nil, err
		}
		resp.Data["makes_today"] = n
	}
	if w := cfg.expiryWarning(b.now()); w != "" {
		resp.AddWarning(w)
	}
	return resp, nil
}

// configData is what a config read shows: settings and status, and for each
// secret field only whether it is set.
func (b *backend) configData(cfg *brokerConfig, rec tokenRecord) map[string]any {
	data := map[string]any{
		"provider":          cfg.Provider,
		"environment":       cfg.Environment,
		"base_url":          cfg.BaseURL,
		"ca_cert":           cfg.CACert,
		"ttl":               int64(cfg.TTL / time.Second),
		"max_ttl":           int64(cfg.MaxTTL / time.Second),
		"require_readonly":  cfg.RequireReadOnly,
		"allowed_accounts":  provider.NonNil(cfg.AllowedAccounts),
		"updated_at":        formatTime(cfg.UpdatedAt),
		"last_refresh":      formatTime(rec.LastRefresh),
		"last_error":        rec.LastError,
		"last_error_at":     formatTime(rec.LastErrorAt),
		"token_expires_at":  "",
		"secret_expires_at": formatTime(cmp.Or(rec.SecretExpiresAt, cfg.SecretExpiresAt)),
		"account_ids":       []string{},
		"readonly":          nil,
	}
	if spec, ok := b.specs[cfg.Provider]; ok {
		data["endpoint"] = baseURL(spec, cfg)
		if declaredExpiry(spec) {
			data["refresh_token_expires_at"] = formatTime(cfg.SecretExpiresAt)
		}
		showOptions(data, cfg, spec)
		if rotating(spec) {
			data["rotated_refresh_token"] = len(rec.Rotated) > 0
		}
		if passthrough(spec) {
			data["last_validated"] = formatTime(rec.LastRefresh)
		}
		for _, f := range spec.Fields {
			if f.Secret {
				data[f.Name+"_set"] = cfg.Secrets[f.Name] != ""
			}
		}
	}
	if t := rec.Token; t != nil {
		// What the broker reported about the token (accounts, scope, ...):
		// never secret, and what an auditor wants.
		for k, v := range t.details() {
			if _, taken := data[k]; !taken {
				data[k] = v
			}
		}
		data["token_expires_at"] = formatTime(t.ExpiresAt)
		data["account_ids"] = t.AccountIDs
		data["readonly"] = t.ReadOnly
	}
	return data
}

func (b *backend) pathConfigWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	var verify bool
	cfg, rec, err := b.putConfig(ctx, req.Storage, name, func(old *brokerConfig) (*configChange, error) {
		ch, err := b.prepareConfig(ctx, req.Storage, d, old)
		if ch != nil {
			verify = ch.verify
		}
		return ch, err
	})
	var (
		r  *refusal
		ve *verifyError
	)
	switch {
	case errors.As(err, &r):
		return logical.ErrorResponse(r.msg), nil
	case errors.As(err, &ve):
		return failed(verifying, ve.msg, ve.err)
	case err != nil:
		return nil, err
	}
	resp := &logical.Response{Data: b.configData(cfg, rec)}
	if w := cfg.expiryWarning(b.now()); w != "" {
		resp.AddWarning(w)
	}
	if !verify {
		resp.AddWarning("verify=false: the secret was stored without checking it with the broker")
	}
	return resp, nil
}

// prepareConfig is a config write's parse and checks over the stored
// config: every refusal names its field, and comes before anything is sent.
func (b *backend) prepareConfig(ctx context.Context, s logical.Storage, d *framework.FieldData, old *brokerConfig) (*configChange, error) {
	cfg, verify, err := b.parseConfig(d, old)
	if err != nil {
		return nil, refuse("%v", err)
	}
	spec := b.specs[cfg.Provider]
	// A stored secret goes only to the endpoint it was written with: a
	// caller who can update the config but never had its secret must not
	// point it elsewhere and have the plugin send the secret there.
	given := func(field string) bool { _, ok := d.Raw[field]; return ok }
	if missing := secretsToResend(given, old, cfg, spec); len(missing) > 0 {
		return nil, refuse("%s: changing base_url, ca_cert or environment needs the secret fields again in the same write (%s); the stored secret goes only to the endpoint it was written with; nothing was stored", strings.Join(missing, ", "), strings.Join(missing, ", "))
	}
	ms, err := b.settings(ctx, s)
	if err != nil {
		return nil, err
	}
	if !ms.hostAllowed(baseURL(spec, cfg), spec.Environments) {
		return nil, refuse("base_url: host is not in this mount's allowed_hosts (%s); ask an operator to add it to broker/settings", strings.Join(ms.AllowedHosts, ", "))
	}
	return &configChange{cfg: cfg, verify: verify, given: given}, nil
}

// secretsToResend lists the secret fields an update must carry because it
// moves the config to another endpoint (base_url, ca_cert or environment).
func secretsToResend(given func(string) bool, old, cfg *brokerConfig, spec provider.Spec) []string {
	if old == nil || old.sameEndpoint(cfg) {
		return nil
	}
	var missing []string
	for _, f := range spec.Fields {
		if f.Secret && old.Secrets[f.Name] != "" && !given(f.Name) {
			missing = append(missing, f.Name)
		}
	}
	return missing
}

// otherEnvironments lists the environments besides production and the
// providers that have each, for the environment field's description.
func (b *backend) otherEnvironments() string {
	has := map[string][]string{}
	for _, name := range b.names {
		for env := range b.specs[name].Environments {
			if env != "production" {
				has[env] = append(has[env], name)
			}
		}
	}
	var out []string
	for _, env := range slices.Sorted(maps.Keys(has)) {
		out = append(out, fmt.Sprintf("%s (%s)", env, strings.Join(has[env], ", ")))
	}
	if len(out) == 0 {
		return ""
	}
	return " or " + strings.Join(out, ", ")
}

// defaultTTLs names the providers whose leases default to a fixed TTL.
func (b *backend) defaultTTLs() string {
	var out []string
	for _, name := range b.names {
		if ttl := b.specs[name].DefaultTTL; ttl > 0 {
			out = append(out, name+": "+shortDuration(ttl))
		}
	}
	if len(out) == 0 {
		return ""
	}
	return " (" + strings.Join(out, ", ") + ")"
}

func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}
