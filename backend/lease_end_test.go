package backend

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// Where a lease ends decides how much life the old token has left when its
// holder moves on: leases end at the refresh point (two fifths of the life
// left) and a read a moment before it starts the refresh, so a client that
// re-reads when its lease ends, however late in its lease and however
// slowly (a busy machine), moves to the next token with over a quarter of
// the old one's life left, while mints stay at most one per half life. At
// the old refresh point (a third left) the real Agent swapped with 24%.
func TestLeaseEndLeavesAQuarterAtTheSwap(t *testing.T) {
	const life = 40 * time.Second // the Agent measurements' token life
	cases := []struct {
		// reread is when in its lease the client reads again (Agent:
		// 85-95 %), and lag how late that read lands (a loaded machine).
		reread float64
		lag    time.Duration
	}{
		{0.85, 0}, {0.95, 0}, {1, 0},
		{0.85, time.Second}, {0.95, time.Second}, {1, time.Second},
		{1, 2 * time.Second},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("at %.0f%% of the lease, %s late", 100*tc.reread, tc.lag), func(t *testing.T) {
			f := finamLike()
			f.life = life
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
			start := c.clock.Now()
			cur := c.ok(logical.ReadOperation, "creds/x", nil)
			exp, _ := time.Parse(time.RFC3339Nano, cur.Secret.InternalData["expires_at"].(string))
			worst, swaps := 1.0, 0
			for reads := 0; swaps < 10; reads++ {
				if reads > 200 {
					t.Fatalf("only %d swaps in %d reads", swaps, reads)
				}
				c.clock.Advance(time.Duration(float64(cur.Secret.TTL)*tc.reread) + tc.lag)
				c.waitIdle("x") // a refresh the last read started has answered
				next := c.ok(logical.ReadOperation, "creds/x", nil)
				if next.Data["access_token"] != cur.Data["access_token"] {
					left := exp.Sub(c.clock.Now()).Seconds() / life.Seconds()
					worst = min(worst, left)
					swaps++
					exp, _ = time.Parse(time.RFC3339Nano, next.Secret.InternalData["expires_at"].(string))
				}
				cur = next
			}
			if worst < 0.25 {
				t.Errorf("the worst of ten swaps left %.0f%% of the old token's life, want at least 25%%", 100*worst)
			}
			elapsed := c.clock.Now().Sub(start)
			if bound := int(elapsed/(life/2)) + 1; f.callCount() > bound {
				t.Errorf("%d mints in %s: more than one per half life (%d)", f.callCount(), elapsed, bound)
			}
			t.Logf("worst swap left %.0f%% of the life; %d mints in %s", 100*worst, f.callCount(), elapsed.Round(time.Second))
		})
	}
}
