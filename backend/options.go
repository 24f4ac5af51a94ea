package backend

import (
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/framework"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// The option table: the config options some providers take, each with its
// default, its description and the accessor that gives a config's
// effective value. Code that needs an option's value asks the accessor;
// nothing else knows a default. (Parsing and range checks are in
// config_parse.go, the read's display in path_config.go's configData.)

const (
	// defaultRotationFraction: a rotating secret is refreshed once half its
	// life has passed.
	defaultRotationFraction = 0.5
	// defaultValidationInterval: a broker may kill a passthrough token
	// some time after its last use (months); a daily validation keeps them
	// alive and shows a revocation early.
	defaultValidationInterval = 24 * time.Hour
)

// defaultMakeBudget is the quota budget of a config that sets none: the
// provider's own (Spec.Quota.DefaultBudget), below the broker's limit.
func defaultMakeBudget(s provider.Spec) int { return s.Quota.DefaultBudget }

// rotationFraction is the share of the rotating secret's life after which
// it is refreshed (rotation_fraction).
func (c *brokerConfig) rotationFraction() float64 {
	if c.RotationFraction > 0 {
		return c.RotationFraction
	}
	return defaultRotationFraction
}

// makeBudget is how many calls of spec's quota a day the config may spend
// (make_budget); spec must have a Quota.
func (c *brokerConfig) makeBudget(spec provider.Spec) int {
	if c.MakeBudget > 0 {
		return c.MakeBudget
	}
	return defaultMakeBudget(spec)
}

// validationInterval is how often a passthrough token is validated in the
// background (validation_interval).
func (c *brokerConfig) validationInterval() time.Duration {
	if c.ValidationInterval > 0 {
		return c.ValidationInterval
	}
	return defaultValidationInterval
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
}

// providerOptions are the options some providers take, by field name.
var providerOptions = map[string]providerOption{
	"make_budget": {
		schema:  framework.FieldSchema{Type: framework.TypeInt},
		applies: hasQuota,
		describe: func(s provider.Spec) string {
			return fmt.Sprintf("most %s calls a day (UTC) the plugin makes for one login; %s allows %d. Default %d.", s.Quota.Call, s.Display, s.Quota.Limit, defaultMakeBudget(s))
		},
	},
	"rotation_fraction": {
		schema:  framework.FieldSchema{Type: framework.TypeFloat},
		applies: rotating,
		describe: func(provider.Spec) string {
			return fmt.Sprintf("refresh the rotating long-lived secret once this share of its life has passed (0 < f < 1). Default %g.", defaultRotationFraction)
		},
	},
	"keep_alive": {
		schema:  framework.FieldSchema{Type: framework.TypeBool, Default: true},
		applies: passthrough,
		describe: func(provider.Spec) string {
			return "validate the token in the background every validation_interval (default true). It keeps a token nobody reads alive; false lets such a token die of disuse."
		},
	},
	"validation_interval": {
		schema:  framework.FieldSchema{Type: framework.TypeDurationSecond},
		applies: passthrough,
		describe: func(provider.Spec) string {
			return "how often the token is validated in the background, which keeps it alive and shows a revocation early. Default " + shortDuration(defaultValidationInterval) + "."
		},
	},
	"refresh_token_expires_at": {
		schema:  framework.FieldSchema{Type: framework.TypeString},
		applies: declaredExpiry,
		describe: func(provider.Spec) string {
			return "when the long-lived secret expires, as the broker's portal shows it (RFC 3339 or YYYY-MM-DD). The plugin warns before and refuses to use it after."
		},
	},
	"expiry_warning": {
		schema:  framework.FieldSchema{Type: framework.TypeDurationSecond},
		applies: declaredExpiry,
		describe: func(provider.Spec) string {
			return fmt.Sprintf("warn in config reads, creds responses and the log when the long-lived secret has less than this left. Default %s (%d days).", shortDuration(defaultExpiryWarning), int(defaultExpiryWarning.Hours()/24))
		},
	},
}

func rotating(s provider.Spec) bool       { return s.RotatesSecret }
func hasQuota(s provider.Spec) bool       { return s.Quota != nil }
func passthrough(s provider.Spec) bool    { return s.Issuance == provider.Passthrough }
func declaredExpiry(s provider.Spec) bool { return s.DeclaredExpiry }
