package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// testRoles: one ALOR secret, two bots each with a policy on its own role
// only, each getting a JWT narrowed to its own portfolio; Finam roles that
// share the config's token or are refused; retire and delete.
func testRoles(t *testing.T, e *env) {
	e.cli("write", "broker/config/desk", "provider=alor", "refresh_token="+sandbox.AlorRefreshToken,
		"base_url="+e.sbURL, "allowed_accounts=D12345,D67890")
	e.cli("write", "broker/roles/bot-d1", "config=desk", "allowed_accounts=D12345", "ttl=10m")
	e.cli("write", "broker/roles/bot-d2", "config=desk", "allowed_accounts=D67890")
	bots := map[string]string{}
	for _, name := range []string{"bot-d1", "bot-d2"} {
		pol := t.TempDir() + "/" + name + ".hcl"
		writeFile(t, pol, fmt.Sprintf("path \"broker/creds/%s\" { capabilities = [\"read\"] }\n", name))
		e.cli("policy", "write", name, pol)
		var tok struct {
			Auth struct {
				ClientToken string `json:"client_token"`
			} `json:"auth"`
		}
		e.cliJSON(&tok, "token", "create", "-format=json", "-policy="+name)
		bots[name] = tok.Auth.ClientToken
	}
	leases := map[string]string{}
	jwts := map[string]string{}
	for name, want := range map[string]string{"bot-d1": "D12345", "bot-d2": "D67890"} {
		r := e.vault.CLIAs(bots[name], "read", "-format=json", "broker/creds/"+name)
		if !r.OK() {
			t.Fatalf("%s reading its own role: %s", name, r)
		}
		var cred secretResponse
		if err := json.Unmarshal([]byte(r.Stdout), &cred); err != nil {
			t.Fatal(err)
		}
		jwt, _ := cred.Data["access_token"].(string)
		claims, err := provider.JWTClaims(jwt)
		if err != nil || claims["portfolios"] != want || !e.sb.AlorValid(jwt) {
			t.Errorf("%s's JWT reaches %v (want %s only): %v", name, claims["portfolios"], want, err)
		}
		if cred.Data["role"] != name || cred.Data["config"] != "desk" {
			t.Errorf("%s's creds: role=%v config=%v", name, cred.Data["role"], cred.Data["config"])
		}
		leases[name], jwts[name] = cred.LeaseID, jwt
		other := map[string]string{"bot-d1": "bot-d2", "bot-d2": "bot-d1"}[name]
		for _, path := range []string{"broker/creds/" + other, "broker/creds/desk", "broker/config/desk"} {
			if r := e.vault.CLIAs(bots[name], "read", path); r.OK() || !strings.Contains(r.Stderr, "permission denied") {
				t.Errorf("%s read %s: %s", name, path, r)
			}
		}
	}

	// 40 concurrent reads across both roles: both tokens are cached.
	refreshes := e.sb.Calls(sandbox.AlorRefreshEP)
	var wg sync.WaitGroup
	failed := make(chan string, 40)
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := []string{"bot-d1", "bot-d2"}[i%2]
			if r := e.vault.CLIAs(bots[name], "read", "-field=access_token", "broker/creds/"+name); !r.OK() || strings.TrimSpace(r.Stdout) != jwts[name] {
				failed <- fmt.Sprintf("%s: %s", name, r)
			}
		}()
	}
	wg.Wait()
	close(failed)
	for f := range failed {
		t.Errorf("a concurrent read: %s", f)
	}
	if n := e.sb.Calls(sandbox.AlorRefreshEP) - refreshes; n != 0 {
		t.Errorf("40 cached reads across two roles made %d /refresh calls", n)
	}

	// Finam cannot narrow: a role narrower than the secret is refused; a
	// read-only role over a read-only secret shares the config's token.
	e.cli("write", "broker/config/fin-all", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL)
	if r := e.vault.CLI("write", "broker/roles/fin-one", "config=fin-all", "allowed_accounts=1899011"); r.OK() || !strings.Contains(r.Stderr, "cannot narrow") {
		t.Errorf("a Finam role narrower than its secret: %s", r)
	}
	e.cli("write", "broker/config/fin-ro", "provider=finam", "secret="+sandbox.FinamReadOnlySecret, "base_url="+e.sbURL)
	e.cli("write", "broker/roles/reports", "config=fin-ro", "require_readonly=true")
	mints := e.sb.Calls("POST /v1/sessions")
	cfgTok := strings.TrimSpace(e.cli("read", "-field=access_token", "broker/creds/fin-ro").Stdout)
	roleTok := strings.TrimSpace(e.cli("read", "-field=access_token", "broker/creds/reports").Stdout)
	if cfgTok != roleTok || e.sb.Calls("POST /v1/sessions") != mints {
		t.Errorf("a read-only role over a read-only secret: same token %v, %d mints", cfgTok == roleTok, e.sb.Calls("POST /v1/sessions")-mints)
	}

	// Retire reaches both roles.
	e.cli("write", "-f", "broker/config/desk/retire")
	for name := range bots {
		if got := strings.TrimSpace(e.cli("read", "-field=access_token", "broker/creds/"+name).Stdout); got == jwts[name] {
			t.Errorf("after retire %s still got the JWT minted before it", name)
		}
	}

	// Deleting the config is refused while roles name it; a deleted role's
	// creds is a 404 and its lease does not renew.
	if r := e.vault.CLI("delete", "broker/config/desk"); r.OK() || !strings.Contains(r.Stderr, "bot-d1") {
		t.Errorf("deleting a config roles name: %s", r)
	}
	e.cli("delete", "broker/roles/bot-d2")
	if r := e.vault.CLI("read", "broker/creds/bot-d2"); r.OK() || !strings.Contains(r.Stderr, "No value found") { // the CLI says so for a 404
		t.Errorf("creds of a deleted role: %s", r)
	}
	if r := e.vault.CLI("lease", "renew", leases["bot-d2"]); r.OK() || !strings.Contains(r.Stderr, "deleted") {
		t.Errorf("renew of a deleted role's lease: %s", r)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
