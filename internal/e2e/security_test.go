package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// TestNoLongLivedSecretLeaks runs every provider's flows, failures included,
// with two audit devices on: one as Vault ships it (values HMAC'd) and one
// with log_raw=true, whose response entries are searched in the clear. The
// fakes quote the presented secret back in their refusals, as real gateways
// do, so the plugin's scrubbing is what keeps each long-lived secret out of
// responses, the audit logs, the server log, CLI output and config reads.
// Requests are left out of the raw search: they carry what the operator
// wrote.
func TestNoLongLivedSecretLeaks(t *testing.T) {
	e := start(t, sandbox.Options{})
	auditPath := filepath.Join(e.vault.Dir, "audit.log")
	rawPath := filepath.Join(e.vault.Dir, "audit-raw.log")
	e.cli("audit", "enable", "file", "file_path="+auditPath)
	e.cli("audit", "enable", "-path=raw", "file", "file_path="+rawPath, "log_raw=true")

	var responses strings.Builder
	var configReads strings.Builder
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
	readConfig := func(name string) {
		t.Helper()
		configReads.WriteString(run(true, "read", "-format=json", "broker/config/"+name).Stdout)
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
		readConfig(name)
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
	// BCS: every exchange returns a new refresh token; all are searched.
	flows("bcs", "provider=bcs", "refresh_token="+e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true}), "base_url="+e.sbURL)
	run(true, "write", "-f", "broker/rotate-root/bcs")
	// T-Invest: the creds and renew responses carry the token itself.
	run(true, "write", "broker/config/tb", "provider=tinvest", "token="+sandbox.TInvestFullToken, "base_url="+e.sbURL+sandbox.TInvestPrefix)
	readConfig("tb")
	r := e.vault.CLI("read", "broker/creds/tb")
	passthroughResponses.WriteString(r.Stdout)
	run(true, "lease", "revoke", "-prefix", "broker/creds/tb")

	// Failures: wrong secrets (quoted back by the fakes), a failing broker.
	run(false, "write", "broker/config/bad1", "provider=finam", "secret="+sandbox.FinamSecret+"x", "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad2", "provider=alor", "refresh_token="+sandbox.AlorRefreshToken+"x", "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad3", "provider=chatapp", "email="+sandbox.ChatAppEmail, "password="+sandbox.ChatAppPassword+"x",
		"app_id="+sandbox.ChatAppAppID, "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad4", "provider=tinvest", "token="+sandbox.TInvestFullToken+"x", "base_url="+e.sbURL+sandbox.TInvestPrefix)
	bcsDeleted := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	e.sb.DeleteBCSToken(bcsDeleted)
	bcsTampered := bcsDeleted[:len(bcsDeleted)-4] + "AAAA"
	run(false, "write", "broker/config/bad5", "provider=bcs", "refresh_token="+bcsDeleted, "base_url="+e.sbURL)
	run(false, "write", "broker/config/bad6", "provider=bcs", "refresh_token="+bcsTampered, "base_url="+e.sbURL)
	e.sb.InjectFault("POST /v1/sessions", 503, -1)
	run(true, "write", "-f", "broker/config/finam/retire")
	run(false, "read", "broker/creds/finam")
	e.sb.InjectFault("POST /v1/sessions", 0, 0)
	// A refused refresh token, quoted back in ChatApp's refusal, falls back
	// to make.
	e.sb.RevokeChatAppRefresh(e.sb.ChatAppIssuedRefreshTokens()[len(e.sb.ChatAppIssuedRefreshTokens())-1])
	run(true, "write", "-f", "broker/rotate-root/chat")
	// The configured secrets revoked at the broker: Finam and ALOR quote the
	// very secret the config holds back in their refusals, which reach the
	// creds error, the config's last_error and the server log.
	e.sb.RevokeFinamSecret(sandbox.FinamSecret)
	e.sb.RevokeAlorRefreshToken(sandbox.AlorRefreshToken)
	for _, name := range []string{"finam", "alor"} {
		run(true, "write", "-f", "broker/config/"+name+"/retire")
		run(false, "read", "broker/creds/"+name)
	}
	for _, name := range []string{"finam", "alor", "chat", "tb", "bcs"} {
		readConfig(name)
	}
	e.cli("audit", "disable", "file")
	e.cli("audit", "disable", "raw")

	audit, err := os.ReadFile(auditPath)
	if err != nil || len(audit) < 1000 {
		t.Fatalf("audit log missing or empty: %v (%d bytes)", err, len(audit))
	}
	rawResponses := rawAuditResponses(t, rawPath)
	secrets := map[string]string{
		"Finam secret":         sandbox.FinamSecret,
		"T-Invest token":       sandbox.TInvestFullToken,
		"ALOR refresh token":   sandbox.AlorRefreshToken,
		"ChatApp password":     sandbox.ChatAppPassword,
		"ChatApp email":        sandbox.ChatAppEmail,
		"T-Invest bad token":   sandbox.TInvestFullToken + "x",
		"Finam wrong secret":   sandbox.FinamSecret + "x",
		"ALOR wrong token":     sandbox.AlorRefreshToken + "x",
		"ChatApp bad password": sandbox.ChatAppPassword + "x",
	}
	secrets["BCS tampered token"] = bcsTampered
	for i, rt := range e.sb.BCSIssuedRefreshTokens() {
		secrets[fmt.Sprintf("BCS refresh token #%d", i+1)] = rt
	}
	if n := len(e.sb.BCSIssuedRefreshTokens()); n < 5 {
		t.Fatalf("only %d BCS refresh tokens issued: the flows did not rotate", n)
	}
	for i, rt := range e.sb.ChatAppIssuedRefreshTokens() {
		secrets[fmt.Sprintf("ChatApp refresh token #%d", i+1)] = rt
	}
	places := map[string]string{
		"audit log":                 string(audit),
		"raw audit log's responses": rawResponses,
		"server log":                e.vault.Log(),
		"CLI output":                responses.String(),
		"config reads":              configReads.String(),
	}
	hits := 0
	for what, secret := range secrets {
		for where, text := range places {
			if n := strings.Count(text, secret); n > 0 {
				t.Errorf("%s found %d times in the %s", what, n, where)
				hits++
			}
		}
	}
	t.Logf("searched %d secrets in %d bytes of audit log, %d of raw audit responses, %d of server log, %d of CLI output: %d hits",
		len(secrets), len(audit), len(rawResponses), len(places["server log"]), responses.Len(), hits)
	// Sanity checks of the search itself: the fakes' echoes reached every
	// place (scrubbed), and the raw device does show clear text.
	for where, text := range places {
		if where != "audit log" && !strings.Contains(text, "[redacted]") {
			t.Errorf("no scrubbed echo in the %s: the search there proves nothing", where)
		}
	}
	if !strings.Contains(configReads.String(), "[redacted]") || !strings.Contains(rawResponses, "Finam POST /v1/sessions") {
		t.Error("the raw audit responses or config reads do not show the broker refusals in the clear")
	}
	if !strings.Contains(passthroughResponses.String(), sandbox.TInvestFullToken) {
		t.Fatal("the T-Invest creds response should carry the token (sanity check of the search)")
	}
}

// rawAuditResponses returns the response entries of a log_raw audit file,
// as text, leaving out the T-Invest creds and renew responses, which carry
// the long-lived token by design.
func rawAuditResponses(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 1<<20), 16<<20)
	n := 0
	for sc.Scan() {
		var entry struct {
			Type    string `json:"type"`
			Request struct {
				Path string         `json:"path"`
				Data map[string]any `json:"data"`
			} `json:"request"`
			Response json.RawMessage `json:"response"`
		}
		if err := json.Unmarshal(sc.Bytes(), &entry); err != nil {
			t.Fatalf("raw audit entry is not JSON: %v", err)
		}
		if entry.Type != "response" {
			continue
		}
		n++
		leaseID, _ := entry.Request.Data["lease_id"].(string)
		if strings.HasPrefix(entry.Request.Path, "broker/creds/tb") || strings.HasPrefix(leaseID, "broker/creds/tb") {
			continue
		}
		out.Write(entry.Response)
		out.WriteByte('\n')
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if n < 20 {
		t.Fatalf("only %d response entries in the raw audit log", n)
	}
	return out.String()
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
