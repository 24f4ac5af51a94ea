package backend

import (
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// A refresh token the broker rotated belongs to the endpoint it came from:
// a config write that keeps the endpoint keeps it (changing another secret
// does not end it), but one that moves base_url drops it, so it is never
// presented to the new endpoint. The config read's rotated_refresh_token
// says which.
func TestRotatedSecretStaysWithItsEndpoint(t *testing.T) {
	cases := []struct {
		name   string
		change map[string]any
		kept   bool
	}{
		{"same endpoint, new secret", map[string]any{"secret": "s2"}, true},
		{"base_url moved", map[string]any{"secret": "s1", "base_url": "https://other.example"}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := chatLike()
			c := newFakeHarness(t, f)
			// No refresh_token written: the one the plugin holds is the
			// broker's rotation, and only the token record has it.
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1"})
			if c.ok(logical.ReadOperation, "config/x", nil).Data["rotated_refresh_token"] != true {
				t.Fatal("the first write's refresh left no rotated refresh token")
			}
			change := map[string]any{"verify": false}
			for k, v := range tc.change {
				change[k] = v
			}
			c.ok(logical.UpdateOperation, "config/x", change)
			if got := c.ok(logical.ReadOperation, "config/x", nil).Data["rotated_refresh_token"]; got != tc.kept {
				t.Fatalf("rotated_refresh_token = %v after the write, want %v", got, tc.kept)
			}
		})
	}
}
