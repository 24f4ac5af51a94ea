package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func TestBCSEndToEnd(t *testing.T) {
	e := start(t, sandbox.Options{})
	base := "base_url=" + e.sbURL

	// A read-only token under both guards: creds with the account, a lease
	// no longer than the access token lives.
	ro := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	e.cli("write", "broker/config/bcs", "provider=bcs", "refresh_token="+ro, base,
		"require_readonly=true", "allowed_accounts="+sandbox.BCSAgreement)
	var cred secretResponse
	e.cliJSON(&cred, "read", "-format=json", "broker/creds/bcs")
	expires, err := time.Parse(time.RFC3339, fmt.Sprint(cred.Data["expires_at"]))
	if err != nil || time.Now().Add(time.Duration(cred.LeaseDuration)*time.Second).After(expires.Add(time.Second)) {
		t.Fatalf("lease of %ds outlives the access token (%v): %v", cred.LeaseDuration, cred.Data["expires_at"], err)
	}
	if cred.Data["readonly"] != true || fmt.Sprint(cred.Data["account_ids"]) != "["+sandbox.BCSAgreement+"]" ||
		!e.sb.BCSAccessValid(fmt.Sprint(cred.Data["access_token"])) {
		t.Fatalf("creds: %+v", cred)
	}

	// Refused at write, nothing stored: a trade token under
	// require_readonly, another account's token, a token deleted in the web
	// terminal and one past its expiry (with BCS's reason).
	other := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, Agreement: sandbox.BCSOtherAgreement})
	deleted := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	e.sb.DeleteBCSToken(deleted)
	expired := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, IssuedAt: time.Now().Add(-91 * 24 * time.Hour)})
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"refresh_token=" + e.sb.IssueBCSToken(sandbox.BCSTokenOptions{}), "require_readonly=true"}, []string{`azp is "trade-api-write"`, "nothing was stored"}},
		{[]string{"refresh_token=" + other, "allowed_accounts=" + sandbox.BCSAgreement}, []string{"outside allowed_accounts: " + sandbox.BCSOtherAgreement, "nothing was stored"}},
		{[]string{"refresh_token=" + deleted}, []string{"HTTP 400, code invalid_grant", "Session not active", "issue a new token in the BCS web terminal", "nothing was stored"}},
		{[]string{"refresh_token=" + expired}, []string{"HTTP 400, code invalid_grant", "Token is not active", "issue a new token in the BCS web terminal", "nothing was stored"}},
		{[]string{"refresh_token=" + ro, "environment=sandbox"}, []string{`environment: bcs has no "sandbox" environment`}},
	} {
		r := e.vault.CLI(append([]string{"write", "broker/config/refused", "provider=bcs", base}, c.args...)...)
		if r.OK() || !containsAll(r.Stderr, c.want...) {
			t.Fatalf("%v: %s", c.want, r)
		}
		if r := e.vault.CLI("read", "broker/config/refused"); r.OK() {
			t.Fatalf("a refused write stored a config: %s", r)
		}
	}

	// Revoke-on-use: the rotated token is kept across a retire and a plugin
	// reload, and no token is ever presented twice.
	e.sb.SetBCSRevokeOnUse(true)
	e.cli("write", "broker/config/rot", "provider=bcs", "refresh_token="+e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true}), base)
	e.cli("read", "broker/creds/rot")
	e.cli("write", "-f", "broker/config/rot/retire")
	e.cli("read", "broker/creds/rot")
	e.cli("plugin", "reload", "-plugin=vault-plugin-secrets-broker")
	e.cli("write", "-f", "broker/config/rot/retire")
	var after secretResponse
	deadline := time.Now().Add(20 * time.Second) // the reload is asynchronous on some versions
	for {
		r := e.vault.CLIJSON(&after, "read", "-format=json", "broker/creds/rot")
		if r.OK() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("creds after a retire and a reload: %s", r)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !e.sb.BCSAccessValid(fmt.Sprint(after.Data["access_token"])) {
		t.Fatal("creds after the reload do not work")
	}
	if st := e.sb.BCSStats(); st.Reuses != 0 || st.MaxPresented != 1 || st.ClientMismatches != 0 {
		t.Fatalf("a token was presented twice, or a client_id other than its azp was sent: %+v", st)
	}
	log := e.vault.Log()
	for i, tok := range e.sb.BCSIssuedRefreshTokens() {
		if strings.Contains(log, tok) {
			t.Fatalf("BCS refresh token #%d is in the server log", i)
		}
	}
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}
