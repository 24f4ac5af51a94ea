package backend

import (
	"context"
	"maps"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// renewLease renews lease as Vault's expiration manager does: with its own
// copy of the lease, and the time Vault issued it.
func (h *harness) renewLease(lease *logical.Secret, issued time.Time) (*logical.Response, error) {
	h.t.Helper()
	sec := *lease
	sec.InternalData = maps.Clone(lease.InternalData)
	sec.IssueTime = issued
	return h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: &sec})
}

// max_ttl counts from the lease's issue, not from the renew: a T-Invest
// lease issued two hours ago cannot be renewed under a max_ttl of 90
// minutes. Vault caps a lease at the max_ttl it was issued with, but not at
// one the operator lowered since, so the plugin must.
func TestRenewMaxTTLCountsFromIssue(t *testing.T) {
	cases := []struct {
		maxTTL  string
		refused bool
		// wantTTL: what is left of max_ttl two hours after the issue.
		wantTTL time.Duration
	}{
		{"90m", true, 0},
		{"150m", false, 30 * time.Minute},
	}
	for _, tc := range cases {
		t.Run("max_ttl="+tc.maxTTL, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			if resp, err := h.writeTInvest("tb", sandbox.TInvestFullToken, nil); errText(resp, err) != "" {
				t.Fatal(errText(resp, err))
			}
			issued := h.b.now()
			lease := h.ok(logical.ReadOperation, "creds/tb", nil).Secret
			h.clock.Advance(2 * time.Hour)
			// Lowered after the lease was issued.
			h.ok(logical.UpdateOperation, "config/tb", map[string]any{"max_ttl": tc.maxTTL})

			resp, err := h.renewLease(lease, issued)
			msg := errText(resp, err)
			if tc.refused {
				if statusOf(resp, err) != http.StatusBadRequest || !strings.Contains(msg, "max_ttl") {
					t.Fatalf("renew two hours after issue under max_ttl=%s: %d %q %v, want a 400 naming max_ttl", tc.maxTTL, statusOf(resp, err), msg, resp)
				}
				return
			}
			if msg != "" {
				t.Fatalf("renew under max_ttl=%s: %s", tc.maxTTL, msg)
			}
			if got := resp.Secret.TTL; got > tc.wantTTL || got < tc.wantTTL-time.Minute {
				t.Fatalf("renewed TTL %s, want what max_ttl leaves since the issue (%s)", got, tc.wantTTL)
			}
		})
	}
}

// A T-Invest lease renews only while the config holds the token it handed
// out: after token B replaces token A (rotated, perhaps because A leaked),
// a renew of A's lease fails, although the plugin can validate B. Without
// the check a replaced token keeps being renewed.
func TestRenewOfReplacedTInvestTokenFails(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeTInvest("tb", sandbox.TInvestFullToken, nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	leaseA := h.ok(logical.ReadOperation, "creds/tb", nil).Secret
	if resp, err := h.writeTInvest("tb", sandbox.TInvestReadOnlyToken, nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	credsB := h.ok(logical.ReadOperation, "creds/tb", nil)
	if credsB.Data["access_token"] != sandbox.TInvestReadOnlyToken {
		t.Fatalf("creds after the write of token B: %v", credsB.Data["access_token"])
	}

	resp, err := h.renewLease(leaseA, h.b.now())
	msg := errText(resp, err)
	if statusOf(resp, err) != http.StatusBadRequest || !strings.Contains(msg, "different") {
		t.Fatalf("renew of token A's lease after token B was written: %d %q, want a 400 saying the config holds a different token", statusOf(resp, err), msg)
	}
	if strings.Contains(msg, sandbox.TInvestFullToken) || strings.Contains(msg, sandbox.TInvestReadOnlyToken) {
		t.Fatal("the refusal shows a token")
	}
	// B's own lease renews: the refusal is about the token, not the config.
	if resp, err := h.renewLease(credsB.Secret, h.b.now()); errText(resp, err) != "" {
		t.Fatalf("renew of token B's lease: %s", errText(resp, err))
	}
}

// A lease's max TTL, which Vault enforces on renewals, is the config's
// max_ttl or the token's remaining life, whichever is shorter: a max_ttl of
// two hours on a 15-minute token must not let Vault renew the lease past
// the token's end.
func TestLeaseMaxTTLNeverPastTheTokenEnd(t *testing.T) {
	cases := []struct {
		maxTTL string
		want   time.Duration // the lease's MaxTTL, at most
	}{
		{"", 15 * time.Minute},
		{"2h", 15 * time.Minute},
		{"10m", 10 * time.Minute},
	}
	for _, tc := range cases {
		t.Run("max_ttl="+tc.maxTTL, func(t *testing.T) {
			c := newFakeHarness(t, finamLike())
			data := map[string]any{"provider": "fake", "secret": "s1"}
			if tc.maxTTL != "" {
				data["max_ttl"] = tc.maxTTL
			}
			c.ok(logical.UpdateOperation, "config/x", data)
			sec := c.ok(logical.ReadOperation, "creds/x", nil).Secret
			if sec.MaxTTL <= 0 || sec.MaxTTL > tc.want || sec.MaxTTL < tc.want-time.Second {
				t.Fatalf("lease MaxTTL %s, want %s (the token lives 15m)", sec.MaxTTL, tc.want)
			}
		})
	}
}
