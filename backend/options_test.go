package backend

import (
	"reflect"
	"strings"
	"testing"
	"time"

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
	if unset.rotationFraction() != 0.5 || unset.quotaBudget(spec) != 7 || unset.validationInterval() != 24*time.Hour {
		t.Fatalf("defaults: %v %v %v", unset.rotationFraction(), unset.quotaBudget(spec), unset.validationInterval())
	}
	set := brokerConfig{RotationFraction: 0.25, MakeBudget: 3, ValidationInterval: time.Hour}
	if set.rotationFraction() != 0.25 || set.quotaBudget(spec) != 3 || set.validationInterval() != time.Hour {
		t.Fatalf("set values: %v %v %v", set.rotationFraction(), set.quotaBudget(spec), set.validationInterval())
	}
}

// TestConfigReadShowsEachOptionAsTheTableDoes: for every registered
// provider, a config read shows each option that applies with the value
// the option table's show gives, set or unset.
func TestConfigReadShowsEachOptionAsTheTableDoes(t *testing.T) {
	b := New(Options{})
	for _, name := range b.names {
		spec := b.specs[name]
		for _, cfg := range []*brokerConfig{
			{Provider: name},
			{Provider: name, RotationFraction: 0.3, MakeBudget: 2, ValidationInterval: 2 * time.Hour, NoKeepAlive: true,
				ExpiryWarning: 48 * time.Hour, SecretExpiresAt: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)},
		} {
			data := b.configData(cfg, tokenRecord{})
			want := map[string]any{}
			showOptions(want, cfg, spec)
			for opt := range providerOptions {
				w, applies := want[opt]
				got, shown := data[opt]
				if applies != shown || !reflect.DeepEqual(got, w) {
					t.Errorf("%s %s: read shows %v (%v), the table %v (%v)", name, opt, got, shown, w, applies)
				}
			}
		}
	}
}
