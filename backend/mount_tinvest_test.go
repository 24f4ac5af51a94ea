package backend

import (
	"context"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func (h *harness) writeTInvest(name, token string, extra map[string]any) (*logical.Response, error) {
	h.t.Helper()
	data := map[string]any{"provider": "tinvest", "token": token, "base_url": h.url + sandbox.TInvestPrefix}
	for k, v := range extra {
		data[k] = v
	}
	return h.do(logical.UpdateOperation, "config/"+name, data)
}

func TestMountTInvestTokenKinds(t *testing.T) {
	cases := []struct {
		name     string
		token    string
		extra    map[string]any
		kind     string
		readonly bool
	}{
		{"full access", sandbox.TInvestFullToken, nil, "full-access", false},
		{"read-only", sandbox.TInvestReadOnlyToken, nil, "read-only", true},
		{"one account", sandbox.TInvestAccountToken, nil, "account-limited", false},
		{"sandbox", sandbox.TInvestSandboxToken, map[string]any{"environment": "sandbox", "base_url": ""}, "sandbox", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			extra := tc.extra
			if extra != nil {
				extra = map[string]any{"environment": "sandbox", "base_url": h.url + sandbox.TInvestSandboxPrefix}
			}
			resp, err := h.writeTInvest("tb", tc.token, extra)
			if msg := errText(resp, err); msg != "" {
				t.Fatal(msg)
			}
			cfg := h.ok(logical.ReadOperation, "config/tb", nil)
			if strings.Contains(cfg.Data["token_kind"].(string)+"", tc.token) {
				t.Fatal("config read shows the token")
			}
			if cfg.Data["token_kind"] != tc.kind || cfg.Data["readonly"] != tc.readonly || cfg.Data["user_id"] != sandbox.TInvestUserID {
				t.Fatalf("config status: kind=%v readonly=%v user=%v", cfg.Data["token_kind"], cfg.Data["readonly"], cfg.Data["user_id"])
			}
			creds := h.ok(logical.ReadOperation, "creds/tb", nil)
			if creds.Data["access_token"] != tc.token || creds.Data["readonly"] != tc.readonly {
				t.Fatalf("creds: %v", creds.Data)
			}
			if creds.Secret.TTL != time.Hour {
				t.Fatalf("lease TTL %v, want the default 1h", creds.Secret.TTL)
			}
			// As the wire shows it: a JSON list of objects.
			accts, _ := creds.Data["accounts"].([]any)
			if first, _ := firstObject(accts); first["access_level"] == nil || first["id"] == nil {
				t.Fatalf("accounts with access levels missing: %#v", creds.Data["accounts"])
			}
		})
	}
}

func TestMountTInvestGuards(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	cases := []struct {
		name  string
		token string
		extra map[string]any
		want  string // "" = accepted
	}{
		{"read-only token passes require_readonly", sandbox.TInvestReadOnlyToken, map[string]any{"require_readonly": true}, ""},
		{"full token refused by require_readonly", sandbox.TInvestFullToken, map[string]any{"require_readonly": true}, "can trade"},
		{"account token inside allowed_accounts", sandbox.TInvestAccountToken, map[string]any{"allowed_accounts": sandbox.TInvestAccountID}, ""},
		{"full token reaches other accounts", sandbox.TInvestFullToken, map[string]any{"allowed_accounts": sandbox.TInvestAccountID}, "outside allowed_accounts"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := h.writeTInvest(fmt.Sprintf("g%d", i), tc.token, tc.extra)
			msg := errText(resp, err)
			if tc.want == "" && msg != "" {
				t.Fatal(msg)
			}
			if tc.want != "" && (!strings.Contains(msg, tc.want) || statusOf(resp, err) != 400) {
				t.Fatalf("want a 400 with %q, got %d %q", tc.want, statusOf(resp, err), msg)
			}
			if tc.want != "" && strings.Contains(msg, tc.token) {
				t.Fatal("refusal leaks the token")
			}
		})
	}
}

func TestMountTInvestRenewRevalidatesAndFailsOnceRevoked(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeTInvest("tb", sandbox.TInvestFullToken, nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	creds := h.ok(logical.ReadOperation, "creds/tb", nil)
	renew := func() (*logical.Response, error) {
		// Vault hands every renew its own copy of the lease.
		sec := *creds.Secret
		sec.InternalData = maps.Clone(creds.Secret.InternalData)
		sec.IssueTime = time.Now()
		req := &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: &sec}
		return h.b.HandleRequest(context.Background(), req)
	}
	// Every renew asks T-Invest, however recent the last validation
	// (concurrent renews sharing one call: TestPassthroughRenewsShareOneCall).
	h.sb.ResetCalls()
	for i := 1; i <= 2; i++ {
		if r, err := renew(); errText(r, err) != "" {
			t.Fatal(errText(r, err))
		}
		if n := h.sb.Calls(sandbox.TInvestGetAccountsEP); n != i {
			t.Fatalf("%d renews made %d validations", i, n)
		}
	}

	// Revoked at the broker seconds after a validation: the next renew fails.
	h.sb.RevokeTInvestToken(sandbox.TInvestFullToken)
	r, err := renew()
	msg := errText(r, err)
	if !containsAll(msg, "cannot renew", "40003", "T-Invest settings") {
		t.Fatalf("renew of a revoked token: %q", msg)
	}
	if strings.Contains(msg, sandbox.TInvestFullToken) {
		t.Fatal("error leaks the token")
	}
	if r, err := h.do(logical.ReadOperation, "creds/tb", nil); statusOf(r, err) != 502 {
		t.Fatalf("creds of a revoked token: %d %s", statusOf(r, err), errText(r, err))
	}
	st := h.ok(logical.ReadOperation, "config/tb", nil)
	if !strings.Contains(st.Data["last_error"].(string), "40003") {
		t.Fatalf("status does not show the revocation: %v", st.Data["last_error"])
	}
}

func TestMountTInvestSandboxTokenOnProductionIsExplained(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	resp, err := h.writeTInvest("tb", sandbox.TInvestSandboxToken, nil)
	msg := errText(resp, err)
	if statusOf(resp, err) != 400 || !containsAll(msg, "40003", "sandbox") {
		t.Fatalf("%d %q", statusOf(resp, err), msg)
	}
}

func TestMountTInvestKeepAliveTouchesOnlyDueConfigs(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	for _, name := range []string{"a", "b", "c"} {
		if resp, err := h.writeTInvest(name, sandbox.TInvestReadOnlyToken, nil); errText(resp, err) != "" {
			t.Fatal(errText(resp, err))
		}
	}
	h.writeFinam("finam", nil)
	tick := func() {
		if err := h.b.periodicFunc(context.Background(), &logical.Request{Storage: h.storage}); err != nil {
			t.Fatal(err)
		}
	}
	h.sb.ResetCalls()
	tick()
	if n := h.sb.Calls(sandbox.TInvestGetInfoEP); n != 0 {
		t.Fatalf("a tick with nothing due made %d calls", n)
	}
	// Make "b" due by having a 1-minute interval and moving the clock.
	h.ok(logical.UpdateOperation, "config/b", map[string]any{"validation_interval": "1m", "verify": false})
	h.clock.Advance(90 * time.Second)
	tick()
	if n := h.sb.Calls(sandbox.TInvestGetInfoEP); n != 1 {
		t.Fatalf("one due config cost %d validations", n)
	}
	if n := h.sb.Calls("POST /v1/sessions"); n != 0 {
		t.Fatalf("the tick minted Finam tokens (%d)", n)
	}
	st := h.ok(logical.ReadOperation, "config/b", nil)
	if st.Data["last_validated"] == "" {
		t.Fatal("last_validated not shown")
	}
	tick()
	if n := h.sb.Calls(sandbox.TInvestGetInfoEP); n != 1 {
		t.Fatalf("a config validated twice in one interval (%d)", n)
	}
	// A fresh backend on the same storage builds its schedule from storage.
	b2 := h.newBackend(nil)
	h.clock.Advance(25*time.Hour - 90*time.Second)
	if err := b2.periodicFunc(context.Background(), &logical.Request{Storage: h.storage}); err != nil {
		t.Fatal(err)
	}
	if n := h.sb.Calls(sandbox.TInvestGetInfoEP); n != 4 {
		t.Fatalf("after a day all three should be validated once more: %d calls", n)
	}
}
