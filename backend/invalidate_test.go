package backend

import (
	"context"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// Two backends on one storage are two nodes of a cluster (or a mount and
// its performance standby). When one changes a config's token record or
// settings, Vault calls the other's Invalidate with the key; the other must
// drop what it caches and serve what storage now holds. Each row checks
// first that the second node really does serve its cached token before the
// invalidation, so the row cannot pass on a node that caches nothing.
func TestInvalidateDropsWhatAnotherNodeChanged(t *testing.T) {
	cases := []struct {
		name   string
		key    string
		change func(c *harness)
		// want reports whether a token the second node serves after the
		// invalidation is right.
		want func(c *harness, old, got string) bool
	}{
		{
			name:   "token/ after a retire on the other node",
			key:    tokenPrefix + "x",
			change: func(c *harness) { c.ok(logical.UpdateOperation, "config/x/retire", nil) },
			want:   func(_ *harness, old, got string) bool { return got != old },
		},
		{
			name: "config/ after a new secret on the other node",
			key:  configPrefix + "x",
			change: func(c *harness) {
				c.ok(logical.UpdateOperation, "config/x", map[string]any{"secret": "s2"})
			},
			want: func(c *harness, _, got string) bool { return c.brokers["fake"].secretOf[got] == "s2" },
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newFakeHarness(t, finamLike())
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
			other := c.newBackend(nil)
			read := func() string {
				t.Helper()
				resp, err := c.doOn(other, logical.ReadOperation, "creds/x", nil)
				if errText(resp, err) != "" {
					t.Fatalf("creds/x on the second node: %s", errText(resp, err))
				}
				return resp.Data["access_token"].(string)
			}
			old := read()

			tc.change(c) // through the first node
			if got := read(); got != old {
				t.Fatalf("the second node dropped its cached token before any invalidation (%q -> %q): this test would prove nothing", old, got)
			}
			other.InvalidateKey(context.Background(), tc.key)
			if got := read(); !tc.want(c, old, got) {
				t.Errorf("after invalidating %s the second node serves %q (it served %q before the change)", tc.key, got, old)
			}
		})
	}
}
