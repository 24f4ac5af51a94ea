package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func TestTInvestEndToEnd(t *testing.T) {
	e := start(t, sandbox.Options{})
	base := "base_url=" + e.sbURL + sandbox.TInvestPrefix

	r := e.vault.CLI("write", "broker/config/sbx", "provider=tinvest", "token="+sandbox.TInvestSandboxToken, base)
	if r.OK() || !strings.Contains(r.Stderr, "40003") || !strings.Contains(r.Stderr, "sandbox") {
		t.Fatalf("a sandbox token on production was not refused clearly: %s", r)
	}

	e.cli("write", "broker/config/tbank", "provider=tinvest", "token="+sandbox.TInvestReadOnlyToken, base, "require_readonly=true")
	out := e.cli("read", "-format=json", "broker/config/tbank").Stdout
	if strings.Contains(out, sandbox.TInvestReadOnlyToken) || !strings.Contains(out, `"token_kind": "read-only"`) {
		t.Fatalf("config read: %s", out)
	}

	var cred secretResponse
	e.cliJSON(&cred, "read", "-format=json", "broker/creds/tbank")
	if cred.Data["access_token"] != sandbox.TInvestReadOnlyToken || cred.Data["readonly"] != true || cred.LeaseDuration != 3600 {
		t.Fatalf("creds: %+v", cred)
	}
	if _, ok := cred.Data["accounts"].([]any); !ok {
		t.Fatalf("accounts missing: %v", cred.Data)
	}

	// Every renew asks T-Invest: revoked at the broker a second after a
	// successful renew, the token fails the very next renew.
	calls := e.sb.Calls(sandbox.TInvestGetAccountsEP)
	e.cli("lease", "renew", cred.LeaseID)
	if e.sb.Calls(sandbox.TInvestGetAccountsEP) == calls {
		t.Fatal("a renew did not ask T-Invest")
	}
	e.sb.RevokeTInvestToken(sandbox.TInvestReadOnlyToken)
	r = e.vault.CLI("lease", "renew", cred.LeaseID)
	if r.OK() || !strings.Contains(r.Stderr, "40003") || !strings.Contains(r.Stderr, "T-Invest settings") {
		t.Fatalf("renew after upstream revocation: %s", r)
	}
	e.cli("lease", "revoke", cred.LeaseID)
	if strings.Contains(e.vault.Log(), sandbox.TInvestReadOnlyToken) {
		t.Fatal("the T-Invest token appears in the Vault server log")
	}
}

func TestAlorEndToEnd(t *testing.T) {
	e := start(t, sandbox.Options{})
	e.cli("write", "broker/config/alor", "provider=alor", "refresh_token="+sandbox.AlorRefreshToken,
		"base_url="+e.sbURL, "allowed_accounts=D12345")
	if got := fmt.Sprint(e.sb.AlorLastAllowedPortfolios()); got != "[D12345]" {
		t.Fatalf("the broker saw allowedPortfolios %s", got)
	}
	var cred secretResponse
	e.cliJSON(&cred, "read", "-format=json", "broker/creds/alor")
	tok, _ := cred.Data["access_token"].(string)
	claims, err := provider.JWTClaims(tok)
	if err != nil || claims["portfolios"] != "D12345" || !e.sb.AlorValid(tok) {
		t.Fatalf("JWT: %v %v", claims, err)
	}
	if cred.Data["login"] != "P012345" || fmt.Sprint(cred.Data["account_ids"]) != "[D12345]" {
		t.Fatalf("creds: %v", cred.Data)
	}
	r := e.vault.CLI("write", "broker/config/bad", "provider=alor", "refresh_token=not-a-token", "base_url="+e.sbURL)
	if r.OK() || !strings.Contains(r.Stderr, "403") || !strings.Contains(r.Stderr, "developer portal") {
		t.Fatalf("bad refresh token: %s", r)
	}
	// Roles share this server: they use configs of their own.
	t.Run("roles", func(t *testing.T) { testRoles(t, e) })
	if strings.Contains(e.vault.Log(), sandbox.AlorRefreshToken) {
		t.Fatal("the ALOR refresh token appears in the Vault server log")
	}
}
