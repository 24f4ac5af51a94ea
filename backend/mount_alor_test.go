package backend

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func (h *harness) writeAlor(name, token string, extra map[string]any) (*logical.Response, error) {
	h.t.Helper()
	data := map[string]any{"provider": "alor", "refresh_token": token, "base_url": h.url}
	for k, v := range extra {
		data[k] = v
	}
	return h.do(logical.UpdateOperation, "config/"+name, data)
}

func TestMountAlorCredsNarrowedAndDescribed(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeAlor("alor", sandbox.AlorRefreshToken, map[string]any{"allowed_accounts": "D12345"}); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	if got := strings.Join(h.sb.AlorLastAllowedPortfolios(), ","); got != "D12345" {
		t.Fatalf("the broker was asked to narrow to %q", got)
	}
	creds := h.ok(logical.ReadOperation, "creds/alor", nil)
	tok := creds.Data["access_token"].(string)
	if !h.sb.AlorValid(tok) {
		t.Fatal("not a live sandbox JWT")
	}
	claims, _ := provider.JWTClaims(tok)
	if claims["portfolios"] != "D12345" {
		t.Fatalf("JWT portfolios = %v", claims["portfolios"])
	}
	if got := creds.Data["account_ids"].([]string); strings.Join(got, ",") != "D12345" {
		t.Fatalf("account_ids = %v", got)
	}
	if creds.Data["login"] != "P012345" || !strings.Contains(creds.Data["scope"].(string), "OrdersCreate") || creds.Data["readonly"] != false {
		t.Fatalf("creds = %v", creds.Data)
	}
	exp, _ := provider.NumericDate(claims, "exp")
	if time.Now().Add(creds.Secret.TTL).After(exp.Add(time.Second)) {
		t.Fatal("lease outlives the JWT")
	}
}

func TestMountAlorNarrowingIgnoredByBrokerIsRefused(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetAlorIgnoreNarrowing(true)
	resp, err := h.writeAlor("alor", sandbox.AlorRefreshToken, map[string]any{"allowed_accounts": "D12345"})
	if msg := errText(resp, err); statusOf(resp, err) != 400 || !containsAll(msg, "D67890", "nothing was stored") {
		t.Fatalf("%d %q", statusOf(resp, err), msg)
	}
	// The same at read time: a config stored unverified is refused with 403.
	h.writeAlor("alor", sandbox.AlorRefreshToken, map[string]any{"allowed_accounts": "D12345", "verify": false})
	resp, err = h.do(logical.ReadOperation, "creds/alor", nil)
	if statusOf(resp, err) != 403 || !strings.Contains(errText(resp, err), "D67890") {
		t.Fatalf("%d %q", statusOf(resp, err), errText(resp, err))
	}
}

// TestMountAlorRequireReadOnlyRefused: every refresh token self-issued on the
// ALOR portal carries full rights (its JWT scope holds OrdersCreate), and no
// public source shows a read-only one: require_readonly refuses the config,
// saying the token can trade.
func TestMountAlorRequireReadOnlyRefused(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	resp, err := h.writeAlor("rw", sandbox.AlorRefreshToken, map[string]any{"require_readonly": true})
	if statusOf(resp, err) != 400 || !containsAll(errText(resp, err), "can trade", "nothing was stored") {
		t.Fatalf("trading scope passed require_readonly: %d %q", statusOf(resp, err), errText(resp, err))
	}
	if r, err := h.do(logical.ReadOperation, "config/rw", nil); r != nil && err == nil && !r.IsError() {
		t.Fatal("a refused config was stored")
	}
}

func TestMountAlorRejectedRefreshTokenStopsServing(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetAlorTokenLifetime(9 * time.Second)
	if resp, err := h.writeAlor("alor", sandbox.AlorRefreshToken, nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	h.sb.RevokeAlorRefreshToken(sandbox.AlorRefreshToken)
	h.clock.Advance(6 * time.Second) // refresh due (3 s left of 9, less the JWT iat rounding): the background refresh meets 403
	h.ok(logical.ReadOperation, "creds/alor", nil)
	waitIdle(t, h.b, "alor") // the background refresh has answered
	if st := h.ok(logical.ReadOperation, "config/alor", nil); !strings.Contains(st.Data["last_error"].(string), "HTTP 403") {
		t.Fatal("the 403 is not in the config status")
	}
	resp, err := h.do(logical.ReadOperation, "creds/alor", nil)
	msg := errText(resp, err)
	if statusOf(resp, err) != 502 || !containsAll(msg, "ALOR", "403", "developer portal") {
		t.Fatalf("a token of a rejected refresh token was served or the error is unclear: %d %q", statusOf(resp, err), msg)
	}
	if strings.Contains(msg, sandbox.AlorRefreshToken) {
		t.Fatal("error leaks the refresh token")
	}
}

func TestMountAlorEnvironments(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	resp, err := h.writeAlor("dev", sandbox.AlorDevRefreshToken, map[string]any{"environment": "sandbox", "base_url": h.url + sandbox.AlorDevPrefix})
	if errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	resp, err = h.writeAlor("prod", sandbox.AlorDevRefreshToken, nil)
	if msg := errText(resp, err); statusOf(resp, err) != 400 || !containsAll(msg, "403", "production") {
		t.Fatalf("a test-environment token on production: %d %q", statusOf(resp, err), msg)
	}
}

func TestMountAlorRefreshTokenExpiry(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	soon := time.Now().Add(10 * 24 * time.Hour).UTC().Format(time.RFC3339)
	resp, err := h.writeAlor("alor", sandbox.AlorRefreshToken, map[string]any{"refresh_token_expires_at": soon})
	if errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	for _, path := range []string{"config/alor", "creds/alor"} {
		r := h.ok(logical.ReadOperation, path, nil)
		if len(r.Warnings) == 0 || !strings.Contains(r.Warnings[0], "expires at") {
			t.Fatalf("%s: no expiry warning: %v", path, r.Warnings)
		}
	}
	if r := h.ok(logical.ReadOperation, "config/alor", nil); r.Data["secret_expires_at"] != soon {
		t.Fatalf("secret_expires_at = %v", r.Data["secret_expires_at"])
	}
	// An expired one is refused at write, and not used once it has passed.
	resp, err = h.writeAlor("old", sandbox.AlorRefreshToken, map[string]any{"refresh_token_expires_at": "2020-01-01"})
	if !strings.Contains(errText(resp, err), "refresh_token_expires_at") {
		t.Fatalf("past expiry accepted: %q", errText(resp, err))
	}
	h.clock.Advance(11 * 24 * time.Hour)
	h.b.forgetName("alor") // forget the cached token: a mint is needed
	before := h.sb.Calls(sandbox.AlorRefreshEP)
	resp, err = h.do(logical.ReadOperation, "creds/alor", nil)
	if statusOf(resp, err) != 400 || !strings.Contains(errText(resp, err), "expired") {
		t.Fatalf("expired refresh token used: %d %q", statusOf(resp, err), errText(resp, err))
	}
	if h.sb.Calls(sandbox.AlorRefreshEP) != before {
		t.Fatal("the broker was called with a refresh token known to be expired")
	}
	// A field of another provider is refused by name.
	resp, err = h.do(logical.UpdateOperation, "config/alor", map[string]any{"validation_interval": "1h"})
	if !strings.Contains(errText(resp, err), "validation_interval: does not apply to provider alor") {
		t.Fatalf("%q", errText(resp, err))
	}
}
