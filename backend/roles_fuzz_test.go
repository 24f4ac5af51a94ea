package backend

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// FuzzRoleWrite: any role write either stores a role no broader than its
// config (accounts within the config's, lease bounds within the config's)
// or is refused with a 4xx and stores nothing (an update leaves the role as
// it was); it never panics and never shows the config's secret.
func FuzzRoleWrite(f *testing.F) {
	type seed struct {
		config, accounts, readonly, ttl, maxTTL, extraKey, extraVal string
		narrowing, existing                                         bool
	}
	for _, s := range []seed{
		{"cfg", "", "", "", "", "", "", false, false},
		{"cfg", "A1", "true", "10m", "20m", "", "", false, true},
		{"cfg", "D1", "", "", "", "", "", true, false},
		{"cfg", "D1,D2,D1", "false", "1h", "", "", "", true, true},
		{"nope", "", "", "", "", "", "", false, false},
		{"cfg", "B7", "", "", "", "", "", true, false},
		{"cfg", " ,", "", "", "", "", "", false, false},
		{"cfg", "", "maybe", "-5", "soon", "", "", false, false},
		{"cfg", "", "", "", "", "config", "other", false, true},
		{"cfg", "", "", "", "", "secret", "s1-secret-value", true, false},
		{"", "", "", "", "", "", "", false, false},
	} {
		f.Add(s.config, s.accounts, s.readonly, s.ttl, s.maxTTL, s.extraKey, s.extraVal, s.narrowing, s.existing)
	}
	f.Fuzz(func(t *testing.T, config, accounts, readonly, ttl, maxTTL, extraKey, extraVal string, narrowing, existing bool) {
		fb := finamLike()
		if narrowing {
			fb = alorLike()
			fb.name = "fake"
		}
		c := newFakeHarness(t, fb)
		const secret = "s1-secret-value"
		c.ok(logical.UpdateOperation, "config/cfg", map[string]any{"provider": "fake", "secret": secret, "allowed_accounts": "A1,D1,D2", "ttl": "1h", "max_ttl": "2h"})
		if existing {
			c.ok(logical.UpdateOperation, "roles/r", map[string]any{"config": "cfg"})
		}
		before, _ := c.raw.Get(t.Context(), rolePrefix+"r")
		data := map[string]any{}
		for k, v := range map[string]string{"config": config, "allowed_accounts": accounts, "require_readonly": readonly, "ttl": ttl, "max_ttl": maxTTL, extraKey: extraVal} {
			if k != "" && v != "" {
				data[k] = v
			}
		}
		resp, err := c.do(logical.UpdateOperation, "roles/r", data)
		status := statusOf(resp, err)
		if text := errText(resp, err); strings.Contains(text, secret) {
			t.Fatalf("the response shows the config's secret: %s", text)
		}
		after, _ := c.raw.Get(t.Context(), rolePrefix+"r")
		if status != 200 {
			if status < 400 || status >= 500 && status != 502 {
				t.Fatalf("a refused role write answered %d: %s", status, errText(resp, err))
			}
			if (before == nil) != (after == nil) || before != nil && string(before.Value) != string(after.Value) {
				t.Fatalf("a refused role write (%d %s) changed storage", status, errText(resp, err))
			}
			return
		}
		r, err := readRole(t.Context(), c.raw, "r")
		if err != nil || r == nil {
			t.Fatalf("an accepted role write stored no readable role: %v", err)
		}
		if r.Config != "cfg" {
			t.Fatalf("stored a role over %q", r.Config)
		}
		for _, a := range r.AllowedAccounts {
			if !slices.Contains([]string{"A1", "D1", "D2"}, a) {
				t.Fatalf("stored a role broader than its config: %v", r.AllowedAccounts)
			}
		}
		if r.TTL > time.Hour || r.MaxTTL > 2*time.Hour || r.TTL < 0 || r.MaxTTL < 0 {
			t.Fatalf("stored lease bounds beyond the config's: ttl %s max_ttl %s", r.TTL, r.MaxTTL)
		}
	})
}
