package backend

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func TestCredsFinam(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{FinamTokenLifetime: 15 * time.Minute})
	h.writeFinam("finam", map[string]any{"ttl": "5m"})
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)

	tok, _ := resp.Data["access_token"].(string)
	if !h.sb.FinamValid(tok) {
		t.Fatalf("access_token is not a JWT the sandbox accepts: %q", tok)
	}
	claims, err := provider.JWTClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	exp, _ := provider.NumericDate(claims, "exp")
	got, err := time.Parse(time.RFC3339, resp.Data["expires_at"].(string))
	if err != nil || got.Unix() != exp.Unix() {
		t.Fatalf("expires_at %v != JWT exp %v", resp.Data["expires_at"], exp)
	}
	if resp.Data["provider"] != "finam" || resp.Data["readonly"] != false {
		t.Fatalf("data = %v", resp.Data)
	}
	if accts := resp.Data["account_ids"].([]string); strings.Join(accts, ",") != "1899011,1899012" {
		t.Fatalf("account_ids = %v", accts)
	}
	perms, _ := resp.Data["md_permissions"].([]any)
	if first, _ := firstObject(perms); len(perms) != 2 || first["mic"] != "MISX" || first["quote_level"] != "QUOTE_LEVEL_LAST_PRICE" {
		t.Fatalf("md_permissions = %#v", resp.Data["md_permissions"])
	}
	if resp.Secret == nil || resp.Secret.TTL != 5*time.Minute {
		t.Fatalf("lease TTL = %v, want the configured 5m", resp.Secret.TTL)
	}
}

func TestCredsLeaseNeverOutlivesToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{FinamTokenLifetime: 10 * time.Minute})
	h.writeFinam("finam", map[string]any{"ttl": "2h"})
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)
	exp, _ := time.Parse(time.RFC3339, resp.Data["expires_at"].(string))
	if ttl := resp.Secret.TTL; ttl <= 0 || time.Now().Add(ttl).After(exp.Add(time.Second)) {
		t.Fatalf("lease TTL %v outlives the token (expires %v)", ttl, exp)
	}

	// Renew never extends past the token's expiry.
	req := &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: resp.Secret}
	req.Secret.IssueTime = time.Now()
	rr, err := h.b.HandleRequest(context.Background(), req)
	if err != nil || rr.IsError() {
		t.Fatalf("renew: %v %v", err, rr)
	}
	if time.Now().Add(rr.Secret.TTL).After(exp.Add(time.Second)) {
		t.Fatalf("renewed TTL %v goes past the token's expiry %v", rr.Secret.TTL, exp)
	}
}

func TestRenewFailsOnceTokenExpired(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", nil)
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)
	resp.Secret.InternalData["expires_at"] = time.Now().Add(-time.Second).UTC().Format(time.RFC3339Nano)
	resp.Secret.IssueTime = time.Now().Add(-time.Hour)
	rr, err := h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: resp.Secret})
	if msg := errText(rr, err); !containsAll(msg, "cannot renew", "expired", "read creds/finam") {
		t.Fatalf("renew of an expired token: %q", msg)
	}
}

func TestConcurrentColdReadsMintOnce(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetLatency(50 * time.Millisecond) // widen the race window
	h.writeFinam("finam", map[string]any{"verify": false})
	const readers = 200
	var wg sync.WaitGroup
	tokens := make([]string, readers)
	errs := make([]string, readers)
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := h.do(logical.ReadOperation, "creds/finam", nil)
			if msg := errText(resp, err); msg != "" {
				errs[i] = msg
				return
			}
			tokens[i] = resp.Data["access_token"].(string)
		}()
	}
	waitGroup(t, &wg, "a concurrent creds read never returned")
	for i := range readers {
		if errs[i] != "" {
			t.Fatalf("reader %d: %s", i, errs[i])
		}
		if tokens[i] != tokens[0] {
			t.Fatal("readers got different tokens")
		}
	}
	if n := h.sb.Calls(sessionsEP); n != 1 {
		t.Fatalf("%d concurrent cold reads made %d mints, want 1", readers, n)
	}
}

func TestRefreshAheadServesWithoutWaiting(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	first := c.token("creds/x")
	// Due for a refresh (a third of the life left); the broker then holds
	// the refresh: reads must not wait on it.
	entered, release := f.holdNext()
	if got := c.dueRefresh("creds/x"); got != first {
		t.Fatal("a still-valid token was not served while the refresh was due")
	}
	waitFor(t, entered, "the refresh never reached the broker")
	for range 5 {
		if got := c.token("creds/x"); got != first {
			t.Fatal("the token changed before the refresh finished")
		}
	}
	if n := f.callCount(); n != 2 {
		t.Fatalf("reads during the refresh started more mints: %d, want 2", n)
	}
	release()
	c.waitIdle("x")
	if got := c.token("creds/x"); got == first || f.callCount() != 2 {
		t.Fatalf("the refreshed token is not served (%d mints)", f.callCount())
	}
}

func TestNearlyExpiredTokenIsNeverHandedOut(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{FinamTokenLifetime: 3 * time.Second})
	h.writeFinam("finam", nil)
	h.sb.InjectFault(sessionsEP, 503, -1)    // no refresh can succeed
	h.clock.Advance(2600 * time.Millisecond) // 0.4 s left < a sixth of 3 s
	resp, err := h.do(logical.ReadOperation, "creds/finam", nil)
	if statusOf(resp, err) != 502 || !strings.Contains(errText(resp, err), "HTTP 503") {
		t.Fatalf("a nearly expired token was served or the error is unclear: %d %s", statusOf(resp, err), errText(resp, err))
	}
	// The failure is cached briefly: a second read fails fast without a call.
	before := h.sb.Calls(sessionsEP)
	h.do(logical.ReadOperation, "creds/finam", nil)
	if h.sb.Calls(sessionsEP) != before {
		t.Fatal("reads keep hammering a failing broker")
	}
	st := h.ok(logical.ReadOperation, "config/finam", nil)
	if !strings.Contains(st.Data["last_error"].(string), "HTTP 503") {
		t.Fatalf("status does not show the failure: %v", st.Data["last_error"])
	}
}

func TestFailingBrokerStillServesValidToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{FinamTokenLifetime: 9 * time.Second})
	h.writeFinam("finam", nil)
	first := h.ok(logical.ReadOperation, "creds/finam", nil).Data["access_token"]
	h.sb.InjectFault(sessionsEP, 503, -1)
	h.clock.Advance(6600 * time.Millisecond) // refresh due, still servable
	for range 5 {
		if got := h.ok(logical.ReadOperation, "creds/finam", nil).Data["access_token"]; got != first {
			t.Fatal("token changed while the broker fails")
		}
	}
}

func TestRestartDoesNotMintAgain(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", nil)
	tok := h.ok(logical.ReadOperation, "creds/finam", nil).Data["access_token"]
	mints := h.sb.Calls(sessionsEP)

	b2 := h.newBackend(nil)
	resp, err := h.doOn(b2, logical.ReadOperation, "creds/finam", nil)
	if errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	if resp.Data["access_token"] != tok || h.sb.Calls(sessionsEP) != mints {
		t.Fatalf("restart minted again (%d -> %d mints)", mints, h.sb.Calls(sessionsEP))
	}
}

func TestRevokeNeverEvictsTheSharedToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", map[string]any{"ttl": "5m"})
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)
	first := resp.Data["access_token"]
	revoke := &logical.Request{Operation: logical.RevokeOperation, Storage: h.storage, Secret: resp.Secret}
	for i := range 2 { // idempotent: a second revoke is harmless
		if rr, err := h.b.HandleRequest(context.Background(), revoke); errText(rr, err) != "" {
			t.Fatalf("revoke %d: %s", i+1, errText(rr, err))
		}
	}
	mints := h.sb.Calls(sessionsEP)
	if next := h.ok(logical.ReadOperation, "creds/finam", nil).Data["access_token"]; next != first || h.sb.Calls(sessionsEP) != mints {
		t.Fatal("a lease revoke evicted the token every reader shares")
	}
	// A lease from before this version carries lease_end: still nothing evicted.
	resp.Secret.InternalData["lease_end"] = time.Now().Add(time.Hour).UTC().Format(time.RFC3339Nano)
	if rr, err := h.b.HandleRequest(context.Background(), revoke); errText(rr, err) != "" {
		t.Fatal(errText(rr, err))
	}
	if next := h.ok(logical.ReadOperation, "creds/finam", nil).Data["access_token"]; next != first {
		t.Fatal("an old lease's revoke evicted the shared token")
	}
}

func TestRevokeOfGoneConfigSucceeds(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", nil)
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)
	h.ok(logical.DeleteOperation, "config/finam", nil)
	resp.Secret.InternalData["lease_end"] = time.Now().Add(time.Hour).UTC().Format(time.RFC3339Nano)
	rr, err := h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RevokeOperation, Storage: h.storage, Secret: resp.Secret})
	if errText(rr, err) != "" {
		t.Fatalf("revoke after config delete failed: %s", errText(rr, err))
	}
	rr, err = h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: resp.Secret})
	if !strings.Contains(errText(rr, err), "was deleted") {
		t.Fatalf("renew after delete: %q", errText(rr, err))
	}
}

func TestGuardsCheckedAtReadAndRenew(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", nil)
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)
	// Tighten the guard without re-verifying: reads and renews must refuse.
	h.ok(logical.UpdateOperation, "config/finam", map[string]any{"allowed_accounts": "1899011", "verify": false})
	r, err := h.do(logical.ReadOperation, "creds/finam", nil)
	if statusOf(r, err) != 403 || !strings.Contains(errText(r, err), "1899012") {
		t.Fatalf("read with failing guard: %d %s", statusOf(r, err), errText(r, err))
	}
	rr, err := h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: resp.Secret})
	if statusOf(rr, err) != 403 || !strings.Contains(errText(rr, err), "allowed_accounts") {
		t.Fatalf("renew with failing guard: %s", errText(rr, err))
	}

	// A read-only secret passes require_readonly.
	h.sb.AddFinamSecret("ro-secret", []string{"1899011"}, true)
	h.ok(logical.UpdateOperation, "config/ro", map[string]any{"provider": "finam", "secret": "ro-secret", "base_url": h.url, "require_readonly": true, "allowed_accounts": "1899011"})
	if got := h.ok(logical.ReadOperation, "creds/ro", nil).Data["readonly"]; got != true {
		t.Fatalf("readonly = %v", got)
	}
}

func TestSecretChangeDropsOldToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", nil)
	first := h.ok(logical.ReadOperation, "creds/finam", nil).Data["access_token"]
	h.sb.AddFinamSecret("second-secret", []string{"42"}, true)
	h.ok(logical.UpdateOperation, "config/finam", map[string]any{"secret": "second-secret", "verify": false})
	resp := h.ok(logical.ReadOperation, "creds/finam", nil)
	if resp.Data["access_token"] == first || strings.Join(resp.Data["account_ids"].([]string), ",") != "42" {
		t.Fatal("a token of the old secret is still served")
	}
}

// firstObject is the first element of a JSON list as a JSON object.
func firstObject(list []any) (map[string]any, bool) {
	if len(list) == 0 {
		return nil, false
	}
	m, ok := list[0].(map[string]any)
	return m, ok
}
