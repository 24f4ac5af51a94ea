package backend

import (
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// TestOptionAccessorsGiveTheDefaultTheDescriptionNames: a config that sets
// no option gets the default its description states, and a set value wins.
func TestOptionAccessorsGiveTheDefaultTheDescriptionNames(t *testing.T) {
	spec := provider.Spec{Display: "X", Quota: &provider.Quota{Call: "x.make", Limit: 100, DefaultBudget: 7}}
	var unset brokerConfig
	for opt, want := range map[string]string{
		"rotation_fraction":   "Default 0.5.",
		"make_budget":         "Default 7.",
		"validation_interval": "Default 24h.",
	} {
		if d := providerOptions[opt].describe(spec); !strings.Contains(d, want) {
			t.Errorf("%s: %q does not say %q", opt, d, want)
		}
	}
	if unset.rotationFraction() != 0.5 || unset.makeBudget(spec) != 7 || unset.validationInterval().Hours() != 24 {
		t.Fatalf("defaults: %v %v %v", unset.rotationFraction(), unset.makeBudget(spec), unset.validationInterval())
	}
	set := brokerConfig{RotationFraction: 0.25, MakeBudget: 3, ValidationInterval: 3600e9}
	if set.rotationFraction() != 0.25 || set.makeBudget(spec) != 3 || set.validationInterval().Hours() != 1 {
		t.Fatalf("set values: %v %v %v", set.rotationFraction(), set.makeBudget(spec), set.validationInterval())
	}
}
