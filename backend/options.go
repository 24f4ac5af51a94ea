package backend

import (
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// The option table: every config option that some providers take, each in
// one entry with its default, the providers it applies to, its
// description, how a written value is parsed and checked, and what a config
// read shows; and beside them the accessors that give a config's effective
// value. Code that needs an option's value asks the accessor: nothing else
// knows a default.

const (
	// defaultRotationFraction: a rotating secret is refreshed once half its
	// life has passed.
	defaultRotationFraction = 0.5
	// defaultValidationInterval: a broker may kill a passthrough token
	// some time after its last use (months); a daily validation keeps them
	// alive and shows a revocation early.
	defaultValidationInterval = 24 * time.Hour
)

// defaultQuotaBudget is the quota budget of a config that sets none: the
// provider's own (Spec.Quota.DefaultBudget), below the broker's limit.
func defaultQuotaBudget(s provider.Spec) int { return s.Quota.DefaultBudget }

// rotationFraction is the share of the rotating secret's life after which
// it is refreshed (rotation_fraction).
func (c *brokerConfig) rotationFraction() float64 {
	if c.RotationFraction > 0 {
		return c.RotationFraction
	}
	return defaultRotationFraction
}

// quotaBudget is how many calls of spec's quota a day the config may spend;
// spec must have a Quota. Its public field is make_budget, a name kept from
// the first quota (ChatApp's tokens.make) for compatibility, as is the
// storage prefix of the counts (quotaPrefix, "makes/").
func (c *brokerConfig) quotaBudget(spec provider.Spec) int {
	if c.MakeBudget > 0 {
		return c.MakeBudget
	}
	return defaultQuotaBudget(spec)
}

// validationInterval is how often a passthrough token is validated in the
// background (validation_interval).
func (c *brokerConfig) validationInterval() time.Duration {
	if c.ValidationInterval > 0 {
		return c.ValidationInterval
	}
	return defaultValidationInterval
}

// expiryWarningWindow is how long before the declared expiry of the
// long-lived secret the plugin warns (expiry_warning).
func (c *brokerConfig) expiryWarningWindow() time.Duration {
	if c.ExpiryWarning > 0 {
		return c.ExpiryWarning
	}
	return defaultExpiryWarning
}

// providerOption is a non-secret config field that applies to the
// providers whose Spec has some property (a rotating secret, a quota, ...).
type providerOption struct {
	schema framework.FieldSchema // type and default; the description is built
	// applies says whether the option applies to a provider.
	applies func(provider.Spec) bool
	// describe says what the option does for a provider that takes it,
	// without naming the provider.
	describe func(provider.Spec) string
	// parse sets the option on cfg from a written value (of the schema's
	// type), refusing a bad one with an error that names the field.
	parse func(b *backend, v any, cfg *brokerConfig, spec provider.Spec) error
	// show is what a config read shows: the effective value.
	show func(cfg *brokerConfig, spec provider.Spec) any
}

// providerOptions are the options some providers take, by field name.
var providerOptions = map[string]providerOption{
	"make_budget": {
		schema:  framework.FieldSchema{Type: framework.TypeInt},
		applies: hasQuota,
		describe: func(s provider.Spec) string {
			return fmt.Sprintf("most %s calls a day (UTC) the plugin makes for one login; %s allows %d. Default %d.", s.Quota.Call, s.Display, s.Quota.Limit, defaultQuotaBudget(s))
		},
		parse: func(_ *backend, v any, cfg *brokerConfig, spec provider.Spec) error {
			cfg.MakeBudget = v.(int)
			if limit := spec.Quota.Limit; cfg.MakeBudget < 1 || cfg.MakeBudget > limit {
				return badField("make_budget", "must be between 1 and %d (%s's daily limit)", limit, spec.Display)
			}
			return nil
		},
		show: func(cfg *brokerConfig, spec provider.Spec) any { return cfg.quotaBudget(spec) },
	},
	"rotation_fraction": {
		schema:  framework.FieldSchema{Type: framework.TypeFloat},
		applies: rotatesAhead,
		describe: func(provider.Spec) string {
			return fmt.Sprintf("refresh the rotating long-lived secret once this share of its life has passed (0 < f < 1). Default %g.", defaultRotationFraction)
		},
		parse: func(_ *backend, v any, cfg *brokerConfig, _ provider.Spec) error {
			cfg.RotationFraction = v.(float64)
			if cfg.RotationFraction <= 0 || cfg.RotationFraction >= 1 {
				return badField("rotation_fraction", "must be between 0 and 1 (exclusive)")
			}
			return nil
		},
		show: func(cfg *brokerConfig, _ provider.Spec) any { return cfg.rotationFraction() },
	},
	"keep_alive": {
		schema:  framework.FieldSchema{Type: framework.TypeBool, Default: true},
		applies: passthrough,
		describe: func(provider.Spec) string {
			return "validate the token in the background every validation_interval (default true). It keeps a token nobody reads alive; false lets such a token die of disuse."
		},
		parse: func(_ *backend, v any, cfg *brokerConfig, _ provider.Spec) error {
			cfg.NoKeepAlive = !v.(bool)
			return nil
		},
		show: func(cfg *brokerConfig, _ provider.Spec) any { return !cfg.NoKeepAlive },
	},
	"validation_interval": {
		schema:  framework.FieldSchema{Type: framework.TypeDurationSecond},
		applies: passthrough,
		describe: func(provider.Spec) string {
			return "how often the token is validated in the background, which keeps it alive and shows a revocation early. Default " + shortDuration(defaultValidationInterval) + "."
		},
		parse: func(_ *backend, v any, cfg *brokerConfig, _ provider.Spec) error {
			cfg.ValidationInterval = time.Duration(v.(int)) * time.Second
			if cfg.ValidationInterval != 0 && cfg.ValidationInterval < time.Minute {
				return badField("validation_interval", "must be at least 1m")
			}
			return nil
		},
		show: func(cfg *brokerConfig, _ provider.Spec) any { return int64(cfg.validationInterval() / time.Second) },
	},
	"refresh_token_expires_at": {
		schema:  framework.FieldSchema{Type: framework.TypeString},
		applies: declaredExpiry,
		describe: func(provider.Spec) string {
			return "when the long-lived secret expires, as the broker's portal shows it (RFC 3339 or YYYY-MM-DD). The plugin warns before and refuses to use it after."
		},
		parse: func(b *backend, v any, cfg *brokerConfig, _ provider.Spec) error {
			cfg.SecretExpiresAt = time.Time{}
			s := strings.TrimSpace(v.(string))
			if s == "" {
				return nil
			}
			t, err := parseDate(s)
			if err != nil {
				return badField("refresh_token_expires_at", "%v", err)
			}
			if !t.After(b.now()) {
				return badField("refresh_token_expires_at", "%s is in the past: the refresh token has expired; create a new one on the developer portal", formatTime(t))
			}
			cfg.SecretExpiresAt = t
			return nil
		},
		show: func(cfg *brokerConfig, _ provider.Spec) any { return formatTime(cfg.SecretExpiresAt) },
	},
	"expiry_warning": {
		schema:  framework.FieldSchema{Type: framework.TypeDurationSecond},
		applies: knownExpiry,
		describe: func(provider.Spec) string {
			return fmt.Sprintf("warn in config reads, creds responses and the log when the long-lived secret has less than this left. Default %s (%d days).", shortDuration(defaultExpiryWarning), int(defaultExpiryWarning.Hours()/24))
		},
		parse: func(_ *backend, v any, cfg *brokerConfig, _ provider.Spec) error {
			cfg.ExpiryWarning = time.Duration(v.(int)) * time.Second
			if cfg.ExpiryWarning < 0 {
				return badField("expiry_warning", "must not be negative")
			}
			return nil
		},
		show: func(cfg *brokerConfig, _ provider.Spec) any { return int64(cfg.expiryWarningWindow() / time.Second) },
	},
}

// showOptions adds to a config read's data the effective value of every
// option that applies to the config's provider.
func showOptions(data map[string]any, cfg *brokerConfig, spec provider.Spec) {
	for name, o := range providerOptions {
		if o.applies(spec) {
			data[name] = o.show(cfg, spec)
		}
	}
}

func rotating(s provider.Spec) bool       { return s.RotatesSecret }
func hasQuota(s provider.Spec) bool       { return s.Quota != nil }
func passthrough(s provider.Spec) bool    { return s.Issuance == provider.Passthrough }
func declaredExpiry(s provider.Spec) bool { return s.DeclaredExpiry }

// knownExpiry: the long-lived secret's expiry is known, declared by the
// operator or read from the secret itself.
func knownExpiry(s provider.Spec) bool { return s.DeclaredExpiry || s.SecretExpiry != nil }

// rotatesAhead: a rotating secret whose life a refresh extends, so it is
// refreshed ahead to keep it alive. A secret with a fixed expiry
// (Spec.SecretExpiry) gains nothing from it.
func rotatesAhead(s provider.Spec) bool { return s.RotatesSecret && s.SecretExpiry == nil }
