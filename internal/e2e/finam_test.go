package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

const sessionsEP = "POST /v1/sessions"

func TestFinamEndToEnd(t *testing.T) {
	e := start(t, sandbox.Options{FinamTokenLifetime: 15 * time.Minute})

	// The plugin reports the version it was registered with.
	var mounts map[string]map[string]any
	e.cliJSON(&mounts, "secrets", "list", "-format=json", "-detailed")
	if got := mounts["broker/"]["running_plugin_version"]; got != pluginVersion {
		t.Fatalf("running_plugin_version = %v, want %s", got, pluginVersion)
	}

	// A secret file with a trailing newline, as `secret=@file` reads it.
	secretFile := filepath.Join(e.vault.Dir, "finam.secret")
	if err := os.WriteFile(secretFile, []byte(sandbox.FinamSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("a bad secret is refused and nothing stored", func(t *testing.T) {
		r := e.vault.CLI("write", "broker/config/bad", "provider=finam", "secret=wrong-secret", "base_url="+e.sbURL)
		if r.OK() {
			t.Fatal("a wrong secret was accepted")
		}
		if !strings.Contains(r.Stderr, "Code: 400") || !strings.Contains(r.Stderr, "Finam POST /v1/sessions: authentication failed (HTTP 401") || !strings.Contains(r.Stderr, "nothing was stored") {
			t.Fatalf("unclear error:\n%s", r.Stderr)
		}
		if r := e.vault.CLI("read", "broker/config/bad"); r.OK() || !strings.Contains(r.Stderr, "No value found") {
			t.Fatalf("rejected config was stored: %s", r)
		}
		r = e.vault.CLI("write", "broker/config/bad", "provider=finam", "secret=x", "colour=blue", "base_url="+e.sbURL)
		if r.OK() || !strings.Contains(r.Stderr, "colour: unknown field") {
			t.Fatalf("unknown field not refused by name: %s", r)
		}
	})

	e.sb.ResetCalls()
	e.cli("write", "broker/config/finam", "provider=finam", "secret=@"+secretFile, "base_url="+e.sbURL)
	if n := e.sb.Calls(sessionsEP); n != 1 {
		t.Fatalf("config write made %d mints, want 1 (the verification)", n)
	}

	var cred secretResponse
	t.Run("creds is a sandbox JWT with the sandbox's expiry, lease within it", func(t *testing.T) {
		e.cliJSON(&cred, "read", "-format=json", "broker/creds/finam")
		tok, _ := cred.Data["access_token"].(string)
		if !e.sb.FinamValid(tok) {
			t.Fatalf("not a live sandbox JWT: %q", tok)
		}
		claims, err := provider.JWTClaims(tok)
		if err != nil {
			t.Fatal(err)
		}
		exp, _ := provider.NumericDate(claims, "exp")
		if cred.Data["expires_at"] != exp.Format(time.RFC3339) {
			t.Fatalf("expires_at %v, JWT exp %v", cred.Data["expires_at"], exp.Format(time.RFC3339))
		}
		remaining := time.Until(exp)
		if d := time.Duration(cred.LeaseDuration) * time.Second; d <= 0 || d > remaining+time.Second {
			t.Fatalf("lease %v, token remaining %v", d, remaining)
		}
		if !cred.Renewable || cred.Data["provider"] != "finam" || cred.Data["readonly"] != false {
			t.Fatalf("unexpected creds: %+v", cred)
		}
		if ids := fmt.Sprint(cred.Data["account_ids"]); ids != "[1899011 1899012]" {
			t.Fatalf("account_ids = %s", ids)
		}
		if _, ok := cred.Data["md_permissions"].([]any); !ok {
			t.Fatalf("md_permissions missing: %v", cred.Data)
		}
	})

	t.Run("config read shows status and never the secret", func(t *testing.T) {
		r := e.cli("read", "-format=json", "broker/config/finam")
		if strings.Contains(r.Stdout, sandbox.FinamSecret) {
			t.Fatal("config read shows the secret")
		}
		var out struct{ Data map[string]any }
		if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
			t.Fatal(err)
		}
		if out.Data["secret_set"] != true || out.Data["token_expires_at"] != cred.Data["expires_at"] {
			t.Fatalf("status: %v", out.Data)
		}
	})

	t.Run("renew stays within the token's life", func(t *testing.T) {
		var renewed struct {
			LeaseDuration int `json:"lease_duration"`
		}
		e.cliJSON(&renewed, "lease", "renew", "-format=json", cred.LeaseID)
		exp, _ := time.Parse(time.RFC3339, cred.Data["expires_at"].(string))
		if d := time.Duration(renewed.LeaseDuration) * time.Second; d <= 0 || time.Now().Add(d).After(exp.Add(time.Second)) {
			t.Fatalf("renewed to %v, past the token's expiry %v", d, exp)
		}
	})

	t.Run("50 concurrent cold reads cost one mint", func(t *testing.T) {
		e.cli("write", "broker/config/cold", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL, "verify=false")
		before := e.sb.Calls(sessionsEP)
		var wg sync.WaitGroup
		tokens := make([]string, 50)
		for i := range tokens {
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := e.vault.API(context.Background(), "GET", "broker/creds/cold", nil)
				if err != nil || resp.Status != 200 {
					t.Errorf("read %d: %v %+v", i, err, resp)
					return
				}
				tokens[i], _ = resp.Data["access_token"].(string)
			}()
		}
		wg.Wait()
		mints := e.sb.Calls(sessionsEP) - before
		t.Logf("50 concurrent cold reads: %d upstream mint(s)", mints)
		if mints != 1 {
			t.Fatalf("%d mints, want 1", mints)
		}
		for _, tok := range tokens {
			if tok != tokens[0] {
				t.Fatal("readers got different tokens")
			}
		}
	})

	t.Run("lease ends never evict the shared token; retire does", func(t *testing.T) {
		shared := cred.Data["access_token"]
		before := e.sb.Calls(sessionsEP)
		e.cli("policy", "write", "finam-reader", writeTemp(t, `path "broker/creds/finam" { capabilities = ["read"] }`))
		// Five short jobs: each logs in, reads, and has its Vault token
		// revoked when done, which revokes its lease.
		var ended []string
		for i := range 5 {
			job := e.login(t, "finam-reader", "10m")
			var got secretResponse
			if r := e.asToken(job, &got, "read", "-format=json", "broker/creds/finam"); !r.OK() {
				t.Fatalf("job %d: %s", i, r)
			}
			if got.Data["access_token"] != shared {
				t.Fatalf("job %d got a different token", i)
			}
			e.cli("token", "revoke", job)
			ended = append(ended, got.LeaseID)
		}
		// An operator revokes one lease, twice (idempotent).
		var one secretResponse
		e.cliJSON(&one, "read", "-format=json", "broker/creds/finam")
		e.cli("lease", "revoke", one.LeaseID)
		e.cli("lease", "revoke", one.LeaseID)
		// A 3-second login expires, and Vault revokes its lease.
		short := e.login(t, "finam-reader", "3s")
		var last secretResponse
		if r := e.asToken(short, &last, "read", "-format=json", "broker/creds/finam"); !r.OK() {
			t.Fatalf("short login: %s", r)
		}
		// Vault revokes leases in the background: wait until every one is
		// gone, so each revoke has reached the plugin.
		deadline := time.Now().Add(30 * time.Second)
		for _, id := range append(ended, one.LeaseID, last.LeaseID) {
			for e.vault.CLI("lease", "lookup", id).OK() {
				if time.Now().After(deadline) {
					t.Fatalf("lease %s was never revoked", id)
				}
				time.Sleep(250 * time.Millisecond)
			}
		}
		var after secretResponse
		e.cliJSON(&after, "read", "-format=json", "broker/creds/finam")
		extra := e.sb.Calls(sessionsEP) - before
		t.Logf("consumer scenario (5 revoked jobs, 1 lease revoke, 1 expired login): %d extra mints", extra)
		if extra != 0 || after.Data["access_token"] != shared {
			t.Fatalf("lease ends cost %d mints and changed the shared token: %v", extra, after.Data["access_token"] != shared)
		}

		// The incident switch: the next read is a new token.
		e.cli("write", "-f", "broker/config/finam/retire")
		var next secretResponse
		e.cliJSON(&next, "read", "-format=json", "broker/creds/finam")
		if next.Data["access_token"] == shared || e.sb.Calls(sessionsEP) != before+1 {
			t.Fatal("after retire the retired token is still handed out")
		}
		cred = next
	})

	t.Run("plugin reload does not mint again", func(t *testing.T) {
		before := e.sb.Calls(sessionsEP)
		started := strings.Count(e.vault.Log(), "plugin started")
		e.cli("plugin", "reload", "-plugin="+"vault-plugin-secrets-broker")
		var after secretResponse
		// The reload is asynchronous on some versions: retry briefly.
		deadline := time.Now().Add(20 * time.Second)
		for {
			r := e.vault.CLIJSON(&after, "read", "-format=json", "broker/creds/finam")
			if r.OK() || time.Now().After(deadline) {
				if !r.OK() {
					t.Fatalf("read after reload: %s", r)
				}
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if after.Data["access_token"] != cred.Data["access_token"] {
			t.Fatal("reload changed the token")
		}
		if n := e.sb.Calls(sessionsEP) - before; n != 0 {
			t.Fatalf("reload cost %d mints", n)
		}
		if n := strings.Count(e.vault.Log(), "plugin started"); n <= started {
			t.Fatalf("no new plugin process after reload (%d starts before, %d after)", started, n)
		}
	})

	t.Run("the server log never shows the secret", func(t *testing.T) {
		if strings.Contains(e.vault.Log(), sandbox.FinamSecret) {
			t.Fatal("the Finam secret appears in the Vault server log")
		}
	})
}

// login creates a Vault token with policy and ttl, as a job's login would.
func (e *env) login(t *testing.T, policy, ttl string) string {
	t.Helper()
	var out struct {
		Auth struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
	}
	e.cliJSON(&out, "token", "create", "-format=json", "-policy="+policy, "-ttl="+ttl, "-explicit-max-ttl="+ttl)
	return out.Auth.ClientToken
}

// asToken runs the CLI as another Vault token and decodes its JSON output.
func (e *env) asToken(token string, out any, args ...string) vaulttest.CLIResult {
	cmd := exec.Command(e.vault.Bin, args...)
	cmd.Env = append(os.Environ(), "VAULT_ADDR="+e.vault.Addr, "VAULT_TOKEN="+token)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	r := vaulttest.CLIResult{Err: cmd.Run()}
	r.Stdout, r.Stderr = stdout.String(), stderr.String()
	if r.OK() && out != nil {
		if err := json.Unmarshal([]byte(r.Stdout), out); err != nil {
			r.Err = err
		}
	}
	return r
}

// writeTemp writes content to a temporary file and returns its path.
func writeTemp(t *testing.T, content string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(f, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}
