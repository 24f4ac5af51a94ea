package backend

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func (h *harness) writeBCS(name, token string, extra map[string]any) (*logical.Response, error) {
	h.t.Helper()
	data := map[string]any{"provider": "bcs", "refresh_token": token, "base_url": h.url}
	for k, v := range extra {
		data[k] = v
	}
	return h.do(logical.UpdateOperation, "config/"+name, data)
}

func (h *harness) mustWriteBCS(name, token string, extra map[string]any) *logical.Response {
	h.t.Helper()
	resp, err := h.writeBCS(name, token, extra)
	if msg := errText(resp, err); msg != "" {
		h.t.Fatalf("config/%s: %s", name, msg)
	}
	return resp
}

// bcsCycle retires the config's tokens and reads creds: one exchange.
func (h *harness) bcsCycle(name string) *logical.Response {
	h.t.Helper()
	h.ok(logical.UpdateOperation, "config/"+name+"/retire", nil)
	return h.ok(logical.ReadOperation, "creds/"+name, nil)
}

func noBCSSecretIn(t *testing.T, v any, tokens ...string) {
	t.Helper()
	b, _ := json.Marshal(v)
	for _, tok := range tokens {
		if tok != "" && strings.Contains(string(b), tok) {
			t.Fatalf("a refresh token shows in %s", b)
		}
	}
}

func TestMountBcsWriteVerifyAndCreds(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	rt := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	claims, _ := provider.JWTClaims(rt)
	exp := time.Unix(int64(claims["exp"].(float64)), 0).UTC().Format(time.RFC3339)

	w := h.mustWriteBCS("bcs", " "+rt+"\n", map[string]any{"require_readonly": true, "allowed_accounts": sandbox.BCSAgreement})
	if h.sb.Calls(sandbox.BCSTokenEP) != 1 || h.sb.Calls(sandbox.BCSPortfolioEP) != 1 {
		t.Fatalf("verify: %v", h.sb.AllCalls())
	}
	read := h.ok(logical.ReadOperation, "config/bcs", nil).Data
	for k, want := range map[string]any{
		"provider": "bcs", "refresh_token_set": true, "secret_expires_at": exp, "rotated_refresh_token": true,
		"readonly": true, "account_ids": "[" + sandbox.BCSAgreement + "]", "client_id": "trade-api-read", "endpoint": h.url,
		"expiry_warning": 30 * 24 * 3600,
	} {
		if fmt.Sprint(read[k]) != fmt.Sprint(want) {
			t.Errorf("config read %s = %v, want %v", k, read[k], want)
		}
	}
	if _, ok := read["rotation_fraction"]; ok {
		t.Error("rotation_fraction shown for a secret whose expiry a rotation cannot extend")
	}
	noBCSSecretIn(t, read, rt, h.storedRefresh("bcs"))
	noBCSSecretIn(t, w.Data, rt, h.storedRefresh("bcs"))

	creds := h.ok(logical.ReadOperation, "creds/bcs", nil)
	tok := creds.Data["access_token"].(string)
	if !h.sb.BCSAccessValid(tok) || creds.Data["readonly"] != true || fmt.Sprint(creds.Data["account_ids"]) != "["+sandbox.BCSAgreement+"]" || creds.Data["provider"] != "bcs" {
		t.Fatalf("creds: %v", creds.Data)
	}
	expires, _ := time.Parse(time.RFC3339, creds.Data["expires_at"].(string))
	if creds.Secret.TTL <= 0 || time.Now().Add(creds.Secret.TTL).After(expires) {
		t.Fatalf("lease %v outlives the access token (%v)", creds.Secret.TTL, expires)
	}
	// The verifying token is the first token: a read costs no call.
	for i := 0; i < 5; i++ {
		h.ok(logical.ReadOperation, "creds/bcs", nil)
	}
	if h.sb.Calls(sandbox.BCSTokenEP) != 1 || h.sb.Calls(sandbox.BCSPortfolioEP) != 1 || h.sb.BCSStats().ClientMismatches != 0 {
		t.Fatalf("calls after reads: %v %+v", h.sb.AllCalls(), h.sb.BCSStats())
	}
	// No periodic work: a fixed expiry gains nothing from refreshing ahead.
	cfg, rec, _ := h.b.view(context.Background(), h.storage, "bcs")
	if due := h.b.nextDue(cfg, rec); !due.IsZero() {
		t.Fatalf("scheduled periodic work at %v", due)
	}
	r, err := h.do(logical.UpdateOperation, "config/bcs", map[string]any{"rotation_fraction": 0.5})
	if statusOf(r, err) != 400 || !strings.Contains(errText(r, err), "rotation_fraction: does not apply to provider bcs") {
		t.Fatalf("rotation_fraction: %s", errText(r, err))
	}
	// Renew extends within the access token; revoke ends the lease only.
	lease := *creds.Secret
	lease.IssueTime = time.Now()
	rn, err := h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: &lease})
	if err != nil || rn.IsError() || rn.Secret.TTL <= 0 {
		t.Fatalf("renew: %v %v", err, rn)
	}
	if rv, err := h.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RevokeOperation, Storage: h.storage, Secret: creds.Secret}); err != nil || rv.IsError() {
		t.Fatalf("revoke: %v %v", err, rv)
	}
	if !h.sb.BCSAccessValid(tok) || h.sb.Calls(sandbox.BCSTokenEP) != 1 {
		t.Fatal("a revoke called BCS or killed the shared token")
	}
	ret := h.ok(logical.UpdateOperation, "config/bcs/retire", nil)
	if !strings.Contains(fmt.Sprint(ret.Data["note"]), "up to 24 hours") {
		t.Fatalf("retire note: %v", ret.Data)
	}
}

func TestMountBcsRotationIsStoredAndUsed(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	t0 := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	h.mustWriteBCS("bcs", t0, nil)
	r1 := h.storedRefresh("bcs")
	if r1 == "" || r1 == t0 {
		t.Fatal("the verifying exchange's refresh token was not stored")
	}
	h.bcsCycle("bcs")
	r2 := h.storedRefresh("bcs")
	if h.sb.BCSPresented(r1) != 1 || h.sb.BCSPresented(t0) != 1 || r2 == r1 {
		t.Fatalf("presented: t0 %d, r1 %d", h.sb.BCSPresented(t0), h.sb.BCSPresented(r1))
	}
	// A restart keeps the newest; rotate-root spends it.
	b2 := h.newBackend(nil)
	h.b = b2
	rot := h.ok(logical.UpdateOperation, "rotate-root/bcs", nil)
	noBCSSecretIn(t, rot.Data, t0, r1, r2, h.storedRefresh("bcs"))
	if h.sb.BCSPresented(r2) != 1 || h.storedRefresh("bcs") == r2 {
		t.Fatal("rotate-root after a restart did not present the stored newest token")
	}
	// A config update that keeps the token verifies with the newest.
	r3 := h.storedRefresh("bcs")
	h.ok(logical.UpdateOperation, "config/bcs", map[string]any{"ttl": "1h", "refresh_token": t0})
	if h.sb.BCSPresented(r3) != 1 || h.sb.BCSPresented(t0) != 1 {
		t.Fatalf("an update re-presented the written token (%d) instead of the newest (%d)", h.sb.BCSPresented(t0), h.sb.BCSPresented(r3))
	}
}

func TestMountBcsFallsBackOnceToTheWrittenToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	t0 := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	h.mustWriteBCS("bcs", t0, nil)
	r1 := h.storedRefresh("bcs")

	// BCS refuses the newest: the written token is presented once, and its
	// answer's refresh token becomes the newest.
	h.sb.RefuseBCSToken(r1)
	creds := h.bcsCycle("bcs")
	if creds.Data["fell_back"] != true || h.sb.BCSPresented(r1) != 1 || h.sb.BCSPresented(t0) != 2 {
		t.Fatalf("fallback: %v; presented r1 %d, t0 %d", creds.Data, h.sb.BCSPresented(r1), h.sb.BCSPresented(t0))
	}
	r2 := h.storedRefresh("bcs")
	if r2 == r1 || r2 == t0 {
		t.Fatal("the fallback's refresh token was not stored")
	}
	h.bcsCycle("bcs")
	if h.sb.BCSPresented(r2) != 1 || h.sb.BCSPresented(t0) != 2 {
		t.Fatal("after a fallback the plugin did not go back to the newest token")
	}

	// Both refused: one try each, a refusal naming both, and no loop.
	r3 := h.storedRefresh("bcs")
	h.sb.RefuseBCSToken(r3)
	h.sb.RefuseBCSToken(t0)
	before := h.sb.Calls(sandbox.BCSTokenEP)
	h.ok(logical.UpdateOperation, "config/bcs/retire", nil)
	r, err := h.do(logical.ReadOperation, "creds/bcs", nil)
	msg := errText(r, err)
	if statusOf(r, err) != 502 || !containsAll(msg, "Invalid refresh token", "was tried once because BCS refused the newest") ||
		h.sb.Calls(sandbox.BCSTokenEP)-before != 2 || h.sb.BCSPresented(t0) != 3 {
		t.Fatalf("both refused: %d %q after %d calls", statusOf(r, err), msg, h.sb.Calls(sandbox.BCSTokenEP)-before)
	}
	noBCSSecretIn(t, msg, t0, r3)

	// A deleted token condemns the written one too (same session): no
	// fallback at all.
	h2 := newSandboxHarness(t, sandbox.Options{})
	u0 := h2.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	h2.mustWriteBCS("bcs", u0, nil)
	h2.sb.DeleteBCSToken(u0)
	h2.ok(logical.UpdateOperation, "config/bcs/retire", nil)
	r, err = h2.do(logical.ReadOperation, "creds/bcs", nil)
	if !strings.Contains(errText(r, err), "Session not active") || h2.sb.BCSPresented(u0) != 1 {
		t.Fatalf("deleted: %q, written presented %d", errText(r, err), h2.sb.BCSPresented(u0))
	}
	if st := h2.b.staleWarning(context.Background(), h2.storage, "bcs"); st != "" {
		t.Fatalf("a refused secret left a token to serve: %s", st)
	}
}

func TestMountBcsRevokeOnUseNeverPresentsAUsedToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetBCSRevokeOnUse(true)
	t0 := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	h.mustWriteBCS("bcs", t0, map[string]any{"require_readonly": true})
	seen := []string{t0, h.storedRefresh("bcs")}
	for i := 0; i < 3; i++ {
		creds := h.bcsCycle("bcs")
		if !h.sb.BCSAccessValid(creds.Data["access_token"].(string)) {
			t.Fatal("creds do not work")
		}
		seen = append(seen, h.storedRefresh("bcs"))
	}
	h.ok(logical.UpdateOperation, "rotate-root/bcs", nil)
	h.ok(logical.UpdateOperation, "config/bcs", map[string]any{"ttl": "2h"})
	// The same token written again with another setting that drops the
	// cached token: the newest is still the one presented.
	h.mustWriteBCS("bcs", t0, map[string]any{"allowed_accounts": sandbox.BCSAgreement})
	// A restart (a plugin reload) keeps the newest token.
	h.b = h.newBackend(nil)
	h.bcsCycle("bcs")
	seen = append(seen, h.storedRefresh("bcs"))
	if st := h.sb.BCSStats(); st.Reuses != 0 || st.MaxPresented != 1 {
		t.Fatalf("a used token was presented again: %+v", st)
	}
	rec, _ := readTokenRecord(context.Background(), h.storage, "bcs")
	noBCSSecretIn(t, h.ok(logical.ReadOperation, "config/bcs", nil).Data, seen...)
	if rec.LastError != "" {
		t.Fatalf("last error: %s", rec.LastError)
	}

	// An exchange whose answer was lost (the newest is used, storage does
	// not know): BCS says it retires used tokens, so the used written token
	// is not presented again either.
	newest := h.storedRefresh("bcs")
	h.sb.SetBCSRevokeOnUse(true)
	h.useBCS(newest)
	before := h.sb.BCSPresented(t0)
	h.ok(logical.UpdateOperation, "config/bcs/retire", nil)
	r, err := h.do(logical.ReadOperation, "creds/bcs", nil)
	if !containsAll(errText(r, err), "Maximum allowed refresh token reuse exceeded", "retires a refresh token once it is used") || h.sb.BCSPresented(t0) != before {
		t.Fatalf("lost answer: %q, written presented again: %v", errText(r, err), h.sb.BCSPresented(t0) != before)
	}
}

// useBCS exchanges a refresh token outside the plugin, as an exchange whose
// answer never reached storage would have.
func (h *harness) useBCS(token string) {
	h.t.Helper()
	b := h.freshBackend()
	if _, err := b.providers["bcs"].Issue(context.Background(), provider.Request{
		BaseURL: h.url, Client: mustClient(h.t, b), Secrets: map[string]string{"refresh_token": token},
	}); err != nil {
		h.t.Fatal(err)
	}
}

func mustClient(t testing.TB, b *backend) *upstream.Client {
	t.Helper()
	c, err := b.newClient(b.specs["bcs"], &brokerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestMountBcsGuards(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	trade := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{})
	r, err := h.writeBCS("t", trade, map[string]any{"require_readonly": true})
	if statusOf(r, err) != 400 || !containsAll(errText(r, err), "require_readonly", `azp is "trade-api-write"`, "nothing was stored") || h.sb.Calls(sandbox.BCSTokenEP) != 0 {
		t.Fatalf("trade token under require_readonly: %d %q (calls %d)", statusOf(r, err), errText(r, err), h.sb.Calls(sandbox.BCSTokenEP))
	}
	if r := h.ok(logical.ReadOperation, "config/t", nil); r != nil {
		t.Fatal("a refused write stored a config")
	}
	// A trade token is fine without the guard, and says it can trade.
	h.mustWriteBCS("t", trade, nil)
	if c := h.ok(logical.ReadOperation, "creds/t", nil); c.Data["readonly"] != false || c.Data["client_id"] != "trade-api-write" {
		t.Fatalf("trade creds: %v", c.Data)
	}

	other := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, Agreement: sandbox.BCSOtherAgreement})
	r, err = h.writeBCS("o", other, map[string]any{"allowed_accounts": sandbox.BCSAgreement})
	if statusOf(r, err) != 400 || !containsAll(errText(r, err), "outside allowed_accounts: "+sandbox.BCSOtherAgreement, "nothing was stored") {
		t.Fatalf("another account: %d %q", statusOf(r, err), errText(r, err))
	}
	h.sb.SetBCSEmptyPortfolio(true)
	r, err = h.writeBCS("o", other, map[string]any{"allowed_accounts": sandbox.BCSOtherAgreement})
	if statusOf(r, err) != 400 || !strings.Contains(errText(r, err), "bcs listed no account for this token") {
		t.Fatalf("empty portfolio: %d %q", statusOf(r, err), errText(r, err))
	}
	h.sb.SetBCSEmptyPortfolio(false)
	h.mustWriteBCS("o", other, map[string]any{"allowed_accounts": sandbox.BCSOtherAgreement})
	// The guard holds at every read: the broker showing nothing is refused.
	h.sb.SetBCSEmptyPortfolio(true)
	h.ok(logical.UpdateOperation, "config/o/retire", nil)
	r, err = h.do(logical.ReadOperation, "creds/o", nil)
	if statusOf(r, err) != 403 || !strings.Contains(errText(r, err), "allowed_accounts cannot be checked") {
		t.Fatalf("creds with no evidence: %d %q", statusOf(r, err), errText(r, err))
	}
	// The exchange that was refused by the guard still stored its token.
	if h.sb.BCSPresented(h.storedRefresh("o")) != 0 {
		t.Fatal("the guard-refused read's refresh token was not kept")
	}
}

func TestMountBcsSecretExpiry(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	now := time.Now()
	soon := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, IssuedAt: now.Add(-80 * 24 * time.Hour), Expires: now.Add(10 * 24 * time.Hour)})
	w := h.mustWriteBCS("bcs", soon, map[string]any{"expiry_warning": "720h"})
	if !strings.Contains(strings.Join(w.Warnings, " "), "expires at") {
		t.Fatalf("write warnings: %v", w.Warnings)
	}
	read := h.ok(logical.ReadOperation, "config/bcs", nil)
	if read.Data["secret_expires_at"] != now.Add(10*24*time.Hour).UTC().Truncate(time.Second).Format(time.RFC3339) ||
		!strings.Contains(strings.Join(read.Warnings, " "), "(in 9 days)") {
		t.Fatalf("config read: %v %v", read.Data["secret_expires_at"], read.Warnings)
	}
	creds := h.ok(logical.ReadOperation, "creds/bcs", nil)
	if !strings.Contains(strings.Join(creds.Warnings, " "), "expires at") {
		t.Fatalf("creds warnings: %v", creds.Warnings)
	}
	m := h.ok(logical.ReadOperation, "metrics", nil)
	if body := string(m.Data[logical.HTTPRawBody].([]byte)); !strings.Contains(body, `broker_secret_expiry_seconds{config="bcs",provider="bcs"} 8`) {
		t.Fatalf("expiry metric missing:\n%s", body)
	}
	// After exp: refused without a call, saying what to do.
	h.clock.Advance(11 * 24 * time.Hour)
	calls := h.sb.Calls(sandbox.BCSTokenEP)
	r, err := h.do(logical.ReadOperation, "creds/bcs", nil)
	if statusOf(r, err) != 400 || !containsAll(errText(r, err), "expired at", "issue a new token in the BCS web terminal") || h.sb.Calls(sandbox.BCSTokenEP) != calls {
		t.Fatalf("after expiry: %d %q", statusOf(r, err), errText(r, err))
	}
	h.clock.Advance(-11 * 24 * time.Hour)

	// A token already expired, or deleted, is refused at write with BCS's
	// reason, and nothing is stored.
	expired := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, IssuedAt: now.Add(-91 * 24 * time.Hour)})
	deleted := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	h.sb.DeleteBCSToken(deleted)
	for tok, want := range map[string]string{expired: "Token is not active", deleted: "Session not active"} {
		r, err := h.writeBCS("dead", tok, nil)
		if statusOf(r, err) != 400 || !containsAll(errText(r, err), want, "issue a new token in the BCS web terminal", "nothing was stored") {
			t.Fatalf("%s: %d %q", want, statusOf(r, err), errText(r, err))
		}
		if r := h.ok(logical.ReadOperation, "config/dead", nil); r != nil {
			t.Fatal("a refused write stored a config")
		}
	}
}

func TestMountBcsRefusesWhatIsNotABcsToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	rt := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	for _, c := range []struct {
		data map[string]any
		want string
	}{
		{map[string]any{"environment": "sandbox"}, `environment: bcs has no "sandbox" environment (it has: production)`},
		{map[string]any{"refresh_token": "eyJh**********lCGA"}, "refresh_token: the value is not a BCS refresh token"},
		{map[string]any{"refresh_token": "not a token", "verify": false}, "refresh_token: the value is not a BCS refresh token"},
		{map[string]any{"refresh_token_expires_at": "2030-01-01"}, "refresh_token_expires_at: does not apply to provider bcs"},
	} {
		data := map[string]any{"provider": "bcs", "refresh_token": rt, "base_url": h.url}
		for k, v := range c.data {
			data[k] = v
		}
		r, err := h.do(logical.UpdateOperation, "config/x", data)
		if statusOf(r, err) != 400 || !strings.Contains(errText(r, err), c.want) {
			t.Errorf("%v: %d %q", c.data, statusOf(r, err), errText(r, err))
		}
		noBCSSecretIn(t, errText(r, err), rt)
	}
	if h.sb.Calls(sandbox.BCSTokenEP) != 0 {
		t.Fatal("a refused write called BCS")
	}
}

// BCS cannot narrow a token: roles over a BCS config share the config's
// token and only check it (design.md, roles).
func TestMountBcsRolesShareTheConfigsToken(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	trade := h.sb.IssueBCSToken(sandbox.BCSTokenOptions{})
	h.mustWriteBCS("bcs", trade, nil)
	h.ok(logical.UpdateOperation, "roles/desk", map[string]any{"config": "bcs", "allowed_accounts": sandbox.BCSAgreement, "ttl": "1h"})
	r, err := h.do(logical.UpdateOperation, "roles/reports", map[string]any{"config": "bcs", "require_readonly": true})
	if statusOf(r, err) != 400 || !strings.Contains(errText(r, err), "require_readonly") {
		t.Fatalf("a read-only role over a trade token: %d %q", statusOf(r, err), errText(r, err))
	}
	cfgCreds := h.ok(logical.ReadOperation, "creds/bcs", nil)
	role := h.ok(logical.ReadOperation, "creds/desk", nil)
	if role.Data["access_token"] != cfgCreds.Data["access_token"] || role.Data["role"] != "desk" || role.Secret.TTL > time.Hour {
		t.Fatalf("role creds: %v (ttl %v)", role.Data, role.Secret.TTL)
	}
	if h.sb.Calls(sandbox.BCSTokenEP) != 1 {
		t.Fatalf("a role cost its own exchange: %d", h.sb.Calls(sandbox.BCSTokenEP))
	}
}
