package backend

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// Guards (require_readonly, allowed_accounts) are checked at the config
// write, and again at every creds read and every renew: what the broker
// grants can change after the write (T-Invest lets the user change a token's
// access), and a config can be tightened with verify=false. These tests fail
// if either check is skipped at read or at renew, for every provider that has
// guards. ChatApp has none it could prove: its guards are refused outright.

const (
	guardTInvestToken = "guards-tinvest-token"
	guardOtherAccount = "2000000002"
)

// tinvestAccounts are the accounts a T-Invest token reaches, with this
// token's access level to each: levels[i] for account 200000000<i+1>.
func tinvestAccounts(levels ...string) []sandbox.TInvestAccount {
	ids := []string{sandbox.TInvestAccountID, guardOtherAccount}
	var out []sandbox.TInvestAccount
	for i, l := range levels {
		out = append(out, sandbox.TInvestAccount{
			ID: ids[i], Type: "ACCOUNT_TYPE_TINKOFF", Name: "Брокерский счёт", Status: "ACCOUNT_STATUS_OPEN",
			OpenedDate: time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC), AccessLevel: l,
		})
	}
	return out
}

// guardCase is one guard of one provider: a config that passes it, and how
// to make the same config (or the broker) stop passing it after creds were
// read.
type guardCase struct {
	name string
	// config is config/<name>'s data; guard holds the guard fields.
	config func(h *harness) map[string]any
	guard  map[string]any
	// setup prepares the sandbox before the first write.
	setup func(h *harness)
	// breakAtBroker changes what the broker grants (T-Invest): the guard is
	// then written verified and the broker, not the config, breaks it.
	breakAtBroker func(h *harness)
	// want is in the refusal.
	want string
}

var (
	finamConfig = func(h *harness) map[string]any {
		return map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url}
	}
	alorConfig = func(h *harness) map[string]any {
		return map[string]any{"provider": "alor", "refresh_token": sandbox.AlorRefreshToken, "base_url": h.url}
	}
	tinvestConfig = func(h *harness) map[string]any {
		return map[string]any{"provider": "tinvest", "token": guardTInvestToken, "base_url": h.url + sandbox.TInvestPrefix}
	}
)

func guardCases() []guardCase {
	finam, alor, tinvest := finamConfig, alorConfig, tinvestConfig
	return []guardCase{
		{name: "finam require_readonly", config: finam, guard: map[string]any{"require_readonly": true}, want: "can trade"},
		{name: "finam allowed_accounts", config: finam, guard: map[string]any{"allowed_accounts": "1899011"}, want: "1899012"},
		// Every self-issued ALOR refresh token can trade.
		{name: "alor require_readonly", config: alor, guard: map[string]any{"require_readonly": true}, want: "can trade"},
		{name: "alor allowed_accounts", config: alor, guard: map[string]any{"allowed_accounts": "D12345"}, want: "D67890",
			// Else ALOR narrows the JWT and a read has nothing to refuse.
			setup: func(h *harness) { h.sb.SetAlorIgnoreNarrowing(true) }},
		{name: "tinvest require_readonly", config: tinvest, guard: map[string]any{"require_readonly": true}, want: "can trade",
			setup: func(h *harness) {
				h.sb.AddTInvestToken(guardTInvestToken, false, tinvestAccounts(sandbox.TInvestReadOnly)...)
			},
			breakAtBroker: func(h *harness) {
				h.sb.AddTInvestToken(guardTInvestToken, false, tinvestAccounts(sandbox.TInvestFullAccess)...)
			}},
		// Tightened in the config while a validated token is cached: the read
		// reuses the recent validation, so only the read check refuses it.
		{name: "tinvest require_readonly, tightened in the config", config: tinvest, guard: map[string]any{"require_readonly": true}, want: "can trade",
			setup: func(h *harness) {
				h.sb.AddTInvestToken(guardTInvestToken, false, tinvestAccounts(sandbox.TInvestFullAccess)...)
			}},
		{name: "tinvest allowed_accounts", config: tinvest, guard: map[string]any{"allowed_accounts": sandbox.TInvestAccountID}, want: guardOtherAccount,
			setup: func(h *harness) {
				h.sb.AddTInvestToken(guardTInvestToken, false, tinvestAccounts(sandbox.TInvestFullAccess, sandbox.TInvestNoAccess)...)
			},
			// The user widens the token to a second account.
			breakAtBroker: func(h *harness) {
				h.sb.AddTInvestToken(guardTInvestToken, false, tinvestAccounts(sandbox.TInvestFullAccess, sandbox.TInvestFullAccess)...)
			}},
	}
}

func merged(maps ...map[string]any) map[string]any {
	out := map[string]any{}
	for _, m := range maps {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// renew renews a lease through the backend, as Vault's expiration manager
// does.
func (h *harness) renew(s *logical.Secret) (*logical.Response, error) {
	h.t.Helper()
	s.IssueTime = time.Now()
	return h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: s})
}

func wantRefused(t *testing.T, what string, resp *logical.Response, err error, want string) {
	t.Helper()
	msg := errText(resp, err)
	if statusOf(resp, err) != 403 || !strings.Contains(msg, want) {
		t.Fatalf("%s: want 403 naming %q, got %d %q", what, want, statusOf(resp, err), msg)
	}
}

// TestGuardsEnforcedAtRead: a creds read refuses a token the guards do not
// allow, whether the config was tightened unverified after a token was
// cached or the broker widened the token after a verified write.
func TestGuardsEnforcedAtRead(t *testing.T) {
	for _, tc := range guardCases() {
		t.Run(tc.name, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			if tc.setup != nil {
				tc.setup(h)
			}
			if tc.breakAtBroker != nil {
				// Verified: the guard holds at the write.
				h.ok(logical.UpdateOperation, "config/g", merged(tc.config(h), tc.guard))
				h.ok(logical.ReadOperation, "creds/g", nil)
				tc.breakAtBroker(h)
				// Past the reuse of the last validation: the read asks again.
				h.clock.Advance(passthroughMaxAge + time.Minute)
			} else {
				// A token is cached without the guard; the guard is then
				// written unverified. require_readonly keeps the cached token
				// (only the backend's read check stands between it and the
				// reader); allowed_accounts drops it, and the read mints anew.
				h.ok(logical.UpdateOperation, "config/g", tc.config(h))
				h.ok(logical.ReadOperation, "creds/g", nil)
				h.ok(logical.UpdateOperation, "config/g", merged(tc.guard, map[string]any{"verify": false}))
			}
			resp, err := h.do(logical.ReadOperation, "creds/g", nil)
			wantRefused(t, "creds read", resp, err, tc.want)
		})
	}
}

// TestGuardsEnforcedAtRenew: a renew refuses a lease whose token the guards
// no longer allow: tightened in the config (unverified) after the read, or
// widened at the broker (T-Invest, which renew asks every time).
func TestGuardsEnforcedAtRenew(t *testing.T) {
	for _, tc := range guardCases() {
		t.Run(tc.name, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			if tc.setup != nil {
				tc.setup(h)
			}
			var lease *logical.Response
			if tc.breakAtBroker != nil {
				h.ok(logical.UpdateOperation, "config/g", merged(tc.config(h), tc.guard))
				lease = h.ok(logical.ReadOperation, "creds/g", nil)
				// The guard holds: the renew passes...
				if resp, err := h.renew(lease.Secret); errText(resp, err) != "" {
					t.Fatalf("renew while the guard holds: %s", errText(resp, err))
				}
				tc.breakAtBroker(h)
			} else {
				h.ok(logical.UpdateOperation, "config/g", tc.config(h))
				lease = h.ok(logical.ReadOperation, "creds/g", nil)
				if resp, err := h.renew(lease.Secret); errText(resp, err) != "" {
					t.Fatalf("renew without a guard: %s", errText(resp, err))
				}
				h.ok(logical.UpdateOperation, "config/g", merged(tc.guard, map[string]any{"verify": false}))
			}
			// ...and no longer once the guard fails.
			resp, err := h.renew(lease.Secret)
			wantRefused(t, "renew", resp, err, tc.want)
		})
	}
}

// TestGuardsNeedEvidence: where the broker does not tell what a guard needs,
// the guard is refused, saying why: at the write, and at the read of a
// config stored unverified. ChatApp tells nothing of accounts or rights;
// Finam may list no account (proto3 JSON drops an empty list); ALOR's JWT
// may lack the portfolios claim (whether it shows the narrowing is not
// documented: the sandbox's strict switch leaves it out).
func TestGuardsNeedEvidence(t *testing.T) {
	chat := map[string]any{"provider": "chatapp", "email": sandbox.ChatAppEmail, "password": sandbox.ChatAppPassword, "app_id": sandbox.ChatAppAppID}
	cases := []struct {
		name   string
		setup  func(h *harness)
		config func(h *harness) map[string]any
		// refusedAtParse: refused before any broker call, verify or not.
		refusedAtParse bool
		want           string
	}{
		{name: "chatapp require_readonly", refusedAtParse: true, want: "require_readonly",
			config: func(h *harness) map[string]any {
				return merged(chat, map[string]any{"base_url": h.url, "require_readonly": true})
			}},
		{name: "chatapp allowed_accounts", refusedAtParse: true, want: "allowed_accounts",
			config: func(h *harness) map[string]any {
				return merged(chat, map[string]any{"base_url": h.url, "allowed_accounts": "1"})
			}},
		{name: "finam lists no account", want: "allowed_accounts cannot be checked",
			setup: func(h *harness) { h.sb.AddFinamSecret("guards-no-accounts", nil, false) },
			config: func(h *harness) map[string]any {
				return map[string]any{"provider": "finam", "secret": "guards-no-accounts", "base_url": h.url, "allowed_accounts": "1899011"}
			}},
		{name: "alor JWT without portfolios", want: "narrowing cannot be verified",
			setup: func(h *harness) { h.sb.SetAlorOmitPortfolios(true) },
			config: func(h *harness) map[string]any {
				return map[string]any{"provider": "alor", "refresh_token": sandbox.AlorRefreshToken, "base_url": h.url, "allowed_accounts": "D12345"}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			if tc.setup != nil {
				tc.setup(h)
			}
			resp, err := h.do(logical.UpdateOperation, "config/g", tc.config(h))
			if msg := errText(resp, err); statusOf(resp, err) != 400 || !strings.Contains(msg, tc.want) {
				t.Fatalf("verified write: want 400 naming %q, got %d %q", tc.want, statusOf(resp, err), msg)
			}
			resp, err = h.do(logical.UpdateOperation, "config/g", merged(tc.config(h), map[string]any{"verify": false}))
			if tc.refusedAtParse {
				if msg := errText(resp, err); statusOf(resp, err) != 400 || !strings.Contains(msg, tc.want) {
					t.Fatalf("unverified write: want 400 naming %q, got %d %q", tc.want, statusOf(resp, err), msg)
				}
				return
			}
			if errText(resp, err) != "" {
				t.Fatalf("unverified write: %s", errText(resp, err))
			}
			resp, err = h.do(logical.ReadOperation, "creds/g", nil)
			wantRefused(t, "creds read", resp, err, tc.want)
		})
	}
}
func TestRenewRefusesAllowedAccountsWithoutEvidence(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(h *harness)
		cfg   func(h *harness) map[string]any
		guard string
	}{
		{"finam", func(h *harness) { h.sb.AddFinamSecret("gap-none", nil, false) },
			func(h *harness) map[string]any {
				return map[string]any{"provider": "finam", "secret": "gap-none", "base_url": h.url}
			}, "1899011"},
		{"alor", func(h *harness) { h.sb.SetAlorOmitPortfolios(true) }, alorConfig, "D12345"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			tc.setup(h)
			h.ok(logical.UpdateOperation, "config/g", tc.cfg(h))
			lease := h.ok(logical.ReadOperation, "creds/g", nil)
			h.ok(logical.UpdateOperation, "config/g", map[string]any{"allowed_accounts": tc.guard, "verify": false})
			resp, err := h.renew(lease.Secret)
			wantRefused(t, "renew", resp, err, "allowed_accounts cannot be checked")
		})
	}
}
