package backend

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// parseConfig builds the new config from the request over old (nil on
// create), part by part; every error names its field and nothing is
// stored on one. It also returns whether to verify the secret first.
func (b *backend) parseConfig(d *framework.FieldData, old *brokerConfig) (*brokerConfig, bool, error) {
	for k := range d.Raw {
		if _, ok := d.Schema[k]; !ok {
			return nil, false, badField(k, "unknown field")
		}
		if _, _, err := d.GetOkErr(k); err != nil {
			return nil, false, badField(k, "invalid value: %v", err)
		}
	}
	cfg := &brokerConfig{Environment: "production", Secrets: map[string]string{}}
	if old != nil {
		c := *old
		c.Secrets = make(map[string]string, len(old.Secrets))
		maps.Copy(c.Secrets, old.Secrets) // never nil, even from an old record
		cfg = &c
	}
	spec, err := b.parseProvider(d, old, cfg)
	if err != nil {
		return nil, false, err
	}
	for _, parse := range []func(*framework.FieldData, *brokerConfig, provider.Spec) error{
		parseEndpoint,
		b.parseSecrets,
		b.parseSecretExpiry,
		parseLeaseBounds,
		b.parseOptions,
		parseGuards,
	} {
		if err := parse(d, cfg, spec); err != nil {
			return nil, false, err
		}
	}
	return cfg, d.Get("verify").(bool), nil
}

// parseProvider sets the provider on create; it never changes after.
func (b *backend) parseProvider(d *framework.FieldData, old, cfg *brokerConfig) (provider.Spec, error) {
	if v, ok := d.GetOk("provider"); ok {
		name := strings.TrimSpace(v.(string))
		if old != nil && name != old.Provider {
			return provider.Spec{}, badField("provider", "cannot change from %q to %q; delete the config and create it again", old.Provider, name)
		}
		cfg.Provider = name
	} else if old == nil {
		return provider.Spec{}, badField("provider", "is required when creating a config (one of %s)", strings.Join(b.names, ", "))
	}
	spec, ok := b.specs[cfg.Provider]
	if !ok {
		return provider.Spec{}, badField("provider", "unknown provider %q (one of %s)", cfg.Provider, strings.Join(b.names, ", "))
	}
	return spec, nil
}

// parseEndpoint sets where the secret goes: environment, base_url, ca_cert.
func parseEndpoint(d *framework.FieldData, cfg *brokerConfig, spec provider.Spec) error {
	if v, ok := d.GetOk("environment"); ok {
		cfg.Environment = strings.TrimSpace(v.(string))
	}
	if _, ok := spec.Environments[cfg.Environment]; !ok {
		return badField("environment", "%s has no %q environment (it has: %s)", cfg.Provider, cfg.Environment, strings.Join(slices.Sorted(maps.Keys(spec.Environments)), ", "))
	}
	if v, ok := d.GetOk("base_url"); ok {
		cfg.BaseURL = ""
		if s := strings.TrimSpace(v.(string)); s != "" {
			u, err := validateBaseURL(s)
			if err != nil {
				return err
			}
			cfg.BaseURL = u
		}
	}
	if v, ok := d.GetOk("ca_cert"); ok {
		cfg.CACert = strings.TrimSpace(v.(string))
		if cfg.CACert != "" {
			if err := validateCACert(cfg.CACert); err != nil {
				return err
			}
		}
	}
	return nil
}

// parseSecrets takes the provider's own secret fields only, trimmed; the
// required ones must be set once the write is applied.
func (b *backend) parseSecrets(d *framework.FieldData, cfg *brokerConfig, spec provider.Spec) error {
	own := map[string]bool{}
	for _, f := range spec.Fields {
		own[f.Name] = true
	}
	for _, field := range b.providerFieldNames() {
		v, ok := d.GetOk(field)
		if !ok {
			continue
		}
		if !own[field] {
			return badField(field, "does not apply to provider %s (it takes: %s)", cfg.Provider, strings.Join(fieldNames(spec.Fields), ", "))
		}
		s := strings.TrimSpace(v.(string))
		if s == "" {
			return badField(field, "is empty")
		}
		cfg.Secrets[field] = s
	}
	for _, f := range spec.Fields {
		if f.Required && cfg.Secrets[f.Name] == "" {
			return badField(f.Name, "is required for provider %s", cfg.Provider)
		}
	}
	return nil
}

// parseSecretExpiry records the expiry a secret carries in itself
// (Spec.SecretExpiry) when this write brings the secret. An expiry already
// past is not recorded: the verifying call then puts the secret to the
// broker, whose own refusal (and reason) is the one the operator sees, and
// clocks that disagree with the broker's refuse nothing by themselves.
func (b *backend) parseSecretExpiry(d *framework.FieldData, cfg *brokerConfig, spec provider.Spec) error {
	if spec.SecretExpiry == nil {
		return nil
	}
	given := false
	for _, f := range spec.Fields {
		if _, ok := d.Raw[f.Name]; ok && f.Secret {
			given = true
		}
	}
	if !given {
		return nil // the stored secret's expiry carries over
	}
	t, err := spec.SecretExpiry(cfg.Secrets)
	if err != nil {
		return err
	}
	cfg.SecretExpiresAt = time.Time{}
	if t.After(b.now()) {
		cfg.SecretExpiresAt = t.UTC()
	}
	return nil
}

// parseLeaseBounds sets ttl and max_ttl.
func parseLeaseBounds(d *framework.FieldData, cfg *brokerConfig, _ provider.Spec) error {
	if v, ok := d.GetOk("ttl"); ok {
		cfg.TTL = time.Duration(v.(int)) * time.Second
	}
	if v, ok := d.GetOk("max_ttl"); ok {
		cfg.MaxTTL = time.Duration(v.(int)) * time.Second
	}
	if cfg.TTL < 0 {
		return badField("ttl", "must not be negative")
	}
	if cfg.MaxTTL < 0 {
		return badField("max_ttl", "must not be negative")
	}
	if cfg.MaxTTL > 0 && cfg.TTL > cfg.MaxTTL {
		return badField("ttl", "(%s) must not exceed max_ttl (%s)", cfg.TTL, cfg.MaxTTL)
	}
	return nil
}

// parseOptions sets the options some providers take (providerOptions),
// refusing one that does not apply to this provider.
func (b *backend) parseOptions(d *framework.FieldData, cfg *brokerConfig, spec provider.Spec) error {
	opts := slices.Sorted(maps.Keys(providerOptions))
	for _, opt := range opts {
		applies := providerOptions[opt].applies
		if _, ok := d.GetOk(opt); ok && !applies(spec) {
			return badField(opt, "does not apply to provider %s (only to %s)", cfg.Provider, strings.Join(b.providersWhere(applies), ", "))
		}
	}
	for _, opt := range opts {
		if v, ok := d.GetOk(opt); ok {
			if err := providerOptions[opt].parse(b, v, cfg, spec); err != nil {
				return err
			}
		}
	}
	return nil
}

// parseGuards sets require_readonly and allowed_accounts, refusing a guard
// the provider's broker gives no evidence for: it must not look checked.
func parseGuards(d *framework.FieldData, cfg *brokerConfig, spec provider.Spec) error {
	if v, ok := d.GetOk("require_readonly"); ok {
		cfg.RequireReadOnly = v.(bool)
	}
	if v, ok := d.GetOk("allowed_accounts"); ok {
		accts, err := normalizeAccounts(v.([]string))
		if err != nil {
			return err
		}
		cfg.AllowedAccounts = accts
	}
	if spec.ReportsNoAccess {
		if cfg.RequireReadOnly {
			return badField("require_readonly", "cannot be checked for %s: %s reports no read-only flag", cfg.Provider, spec.Display)
		}
		if len(cfg.AllowedAccounts) > 0 {
			return badField("allowed_accounts", "cannot be checked for %s: %s reports no accounts", cfg.Provider, spec.Display)
		}
	}
	return nil
}

// parseDate accepts RFC 3339 or a plain date (end of that day, UTC, so a
// portal's "valid until" date is not cut short).
func parseDate(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t.UTC(), nil
	}
	if t, err := time.Parse("2006-01-02", s); err == nil {
		return t.Add(24*time.Hour - time.Second).UTC(), nil
	}
	return time.Time{}, fmt.Errorf("%q is neither RFC 3339 (2027-01-31T00:00:00Z) nor a date (2027-01-31)", s)
}

func fieldNames(fs []provider.Field) []string {
	out := make([]string, len(fs))
	for i, f := range fs {
		out[i] = f.Name
	}
	return out
}
