package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/cmd/broker-sandbox/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/scripts/vaulttest"
)

// TestNoLongLivedSecretLeaks runs every provider's flows, failures included,
// with a file audit device on, then searches the audit log, the server log
// and every CLI response for each long-lived secret in plain text.
func TestNoLongLivedSecretLeaks(t *testing.T) {
	e := start(t, sandbox.Options{})
	auditPath := filepath.Join(e.vault.Dir, "audit.log")
	e.cli("audit", "enable", "file", "file_path="+auditPath)

	var responses strings.Builder
	var passthroughResponses strings.Builder // creds/renew of tinvest carry the token by design
	run := func(expectOK bool, args ...string) vaulttest.CLIResult {
		t.Helper()
		r := e.vault.CLI(args...)
		if r.OK() != expectOK {
			t.Fatalf("vault %v: want ok=%v: %s", args, expectOK, r)
		}
		responses.WriteString(r.Stdout + r.Stderr)
		return r
	}
	leaseOf := func(r vaulttest.CLIResult) string {
		for _, line := range strings.Split(r.Stdout, "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "lease_id" {
				return f[1]
			}
		}
		t.Fatalf("no lease in %s", r.Stdout)
		return ""
	}
	flows := func(name string, cfg ...string) {
		t.Helper()
		run(true, append([]string{"write", "broker/config/" + name}, cfg...)...)
		run(true, "read", "broker/config/"+name)
		lease := leaseOf(run(true, "read", "broker/creds/"+name))
		run(true, "lease", "renew", lease)
		run(true, "lease", "revoke", lease)
		run(true, "write", "-f", "broker/config/"+name+"/retire")
		run(true, "read", "broker/creds/"+name)
		run(true, "lease", "revoke", "-prefix", "broker/creds/"+name)
	}

	flows("finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL)
	flows("alor", "provider=alor", "refresh_token="+sandbox.AlorRefreshToken, "base_url="+e.sbURL)
	flows("chat", "provider=chatapp", "email="+sandbox.ChatAppEmail, "password="+sandbox.ChatAppPassword,
		"app_id="+sandbox.ChatAppAppID, "base_url="+e.sbURL)
	run(true, "write", "-f", "broker/rotate-root/chat")
	// T-Invest: the creds and renew responses carry the token itself.
	run(true, "write", "broker/config/tb", "provider=tinvest", "token="+sandbox.TInvestFullToken, "base_url="+e.sbURL+sandbox.TInvestPrefix)
	run(true, "read", "broker/config/tb")
	r := e.vault.CLI("read", "broker/creds/tb")
	passthroughResponses.WriteString(r.Stdout)
	run(true, "lease", "revoke", "-prefix", "broker/creds/tb")

	// Failures: wrong secrets, a revoked secret, a failing broker.
	run(false, "write", "broker/config/bad1", "provider=finam", "secret="+sandbox.FinamSecret+"x", "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad2", "provider=alor", "refresh_token="+sandbox.AlorRefreshToken+"x", "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad3", "provider=chatapp", "email="+sandbox.ChatAppEmail, "password="+sandbox.ChatAppPassword+"x",
		"app_id="+sandbox.ChatAppAppID, "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad4", "provider=tinvest", "token="+sandbox.TInvestFullToken+"x", "base_url="+e.sbURL+sandbox.TInvestPrefix)
	e.sb.InjectFault("POST /v1/sessions", 503, -1)
	run(true, "write", "-f", "broker/config/finam/retire")
	run(false, "read", "broker/creds/finam")
	e.sb.InjectFault("POST /v1/sessions", 0, 0)
	e.sb.RevokeChatAppRefresh(e.sb.ChatAppIssuedRefreshTokens()[len(e.sb.ChatAppIssuedRefreshTokens())-1])
	run(true, "write", "-f", "broker/rotate-root/chat") // refused refresh falls back to make
	e.cli("audit", "disable", "file")

	audit, err := os.ReadFile(auditPath)
	if err != nil || len(audit) < 1000 {
		t.Fatalf("audit log missing or empty: %v (%d bytes)", err, len(audit))
	}
	secrets := map[string]string{
		"Finam secret":         sandbox.FinamSecret,
		"T-Invest token":       sandbox.TInvestFullToken,
		"ALOR refresh token":   sandbox.AlorRefreshToken,
		"ChatApp password":     sandbox.ChatAppPassword,
		"T-Invest bad token":   sandbox.TInvestFullToken + "x",
		"Finam wrong secret":   sandbox.FinamSecret + "x",
		"ChatApp bad password": sandbox.ChatAppPassword + "x",
	}
	for i, rt := range e.sb.ChatAppIssuedRefreshTokens() {
		secrets[fmt.Sprintf("ChatApp refresh token #%d", i+1)] = rt
	}
	places := map[string]string{
		"audit log":     string(audit),
		"server log":    e.vault.Log(),
		"API responses": responses.String(),
	}
	hits := 0
	for what, secret := range secrets {
		for where, text := range places {
			if strings.Contains(text, secret) {
				t.Errorf("%s found in the %s", what, where)
				hits++
			}
		}
	}
	t.Logf("searched %d secrets in %d bytes of audit log, %d of server log, %d of responses: %d hits",
		len(secrets), len(audit), len(places["server log"]), responses.Len(), hits)
	if !strings.Contains(passthroughResponses.String(), sandbox.TInvestFullToken) {
		t.Fatal("the T-Invest creds response should carry the token (sanity check of the search)")
	}
}

// TestIncidentResponse: revoke every lease of a config and retire its
// tokens; no lease issued afterwards carries a token minted before.
func TestIncidentResponse(t *testing.T) {
	e := start(t, sandbox.Options{})
	e.cli("write", "broker/config/finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL)
	var before []string
	for range 3 {
		var c secretResponse
		e.cliJSON(&c, "read", "-format=json", "broker/creds/finam")
		before = append(before, c.Data["access_token"].(string))
	}
	e.cli("lease", "revoke", "-prefix", "broker/creds/finam")
	r := e.cli("write", "-f", "broker/config/finam/retire")
	if !strings.Contains(r.Stdout, "issued_tokens_expire_at") || !strings.Contains(r.Stdout, "Finam portal") {
		t.Fatalf("retire response: %s", r.Stdout)
	}
	var after secretResponse
	e.cliJSON(&after, "read", "-format=json", "broker/creds/finam")
	for _, tok := range before {
		if tok == after.Data["access_token"] {
			t.Fatal("a token minted before the retire was issued after it")
		}
	}
	// An operator pins the hosts: a config on another host is refused.
	e.cli("write", "broker/settings", "allowed_hosts=api.finam.ru.proxy.internal")
	r = e.vault.CLI("write", "broker/config/evil", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL)
	if r.OK() || !strings.Contains(r.Stderr, "allowed_hosts") {
		t.Fatalf("a config on a host outside allowed_hosts: %s", r)
	}
}
