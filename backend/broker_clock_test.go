package backend

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// The waits of a backend's broker calls, the per-config rate limit (Finam)
// and the per-user budget (T-Invest), refill and wait on the backend's
// clock, the one its tokens age by: on a frozen clock each wait is a Sleep
// of that clock, none is made on the wall clock.
func TestBrokerCallWaitsAreOnTheBackendClock(t *testing.T) {
	cases := []struct {
		name string
		// spend makes more calls at one instant than the broker's burst.
		spend func(h *harness)
		// longest is the longest wait expected: one call's share of the
		// rate, or a wait the broker asked for (T-Invest's reset header),
		// which a reader's call makes up to upstream.MaxForegroundWait.
		longest time.Duration
	}{
		{
			name:    "finam rate limit of a config",
			longest: time.Minute/180 + time.Millisecond,
			spend: func(h *harness) {
				h.writeFinam("f", map[string]any{"verify": false})
				// Each retire and read is a mint at the same instant:
				// one sessions call and one details call.
				for i := range 21 {
					h.ok(logical.UpdateOperation, "config/f/retire", nil)
					if tok := h.token("creds/f"); !h.sb.FinamValid(tok) {
						h.t.Fatalf("mint %d: not a sandbox token", i)
					}
				}
			},
		},
		{
			name:    "t-invest budget of a user",
			longest: upstream.MaxForegroundWait,
			spend: func(h *harness) {
				h.sb.AddTInvestToken("clock-user", false, tinvestAccounts(sandbox.TInvestFullAccess)...)
				// Every write validates the token: calls drawn from the
				// one user's budget.
				for i := range 20 {
					h.ok(logical.UpdateOperation, fmt.Sprintf("config/t%d", i), map[string]any{
						"provider": "tinvest", "token": "clock-user", "base_url": h.url + sandbox.TInvestPrefix})
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clk := newFakeClock()
			h := sandboxHarnessOn(t, clk, sandbox.Options{})
			start := clk.Now()
			tc.spend(h)
			slept := clk.Slept()
			if len(slept) == 0 {
				t.Fatal("no wait on the backend clock: the calls over the burst waited on another clock")
			}
			var total time.Duration
			for _, d := range slept {
				if d <= 0 || d > tc.longest {
					t.Fatalf("a wait of %v; the longest expected is %v", d, tc.longest)
				}
				total += d
			}
			if moved := clk.Now().Sub(start); moved != total {
				t.Fatalf("the clock moved %v, its waits add up to %v", moved, total)
			}
		})
	}
}
