package e2e

import (
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// A caller with update on a config, but never given its secret, must not be
// able to point the config at a host of theirs and have the plugin send the
// stored secret there. The attacker's host is a second fake broker that
// counts every request it receives.
func TestStoredSecretStaysWithItsEndpoint(t *testing.T) {
	e := start(t, sandbox.Options{})
	var hits atomic.Int64
	fake := sandbox.New(sandbox.Options{}) // answers like a broker would
	attacker := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		fake.ServeHTTP(w, r)
	}))
	defer attacker.Close()
	tlsSrv := httptest.NewTLSServer(http.NotFoundHandler())
	defer tlsSrv.Close()
	caFile := writeTemp(t, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: tlsSrv.Certificate().Raw})))

	e.cli("write", "broker/config/finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL)
	e.cli("write", "broker/config/chat", "provider=chatapp", "email="+sandbox.ChatAppEmail, "password="+sandbox.ChatAppPassword,
		"app_id="+sandbox.ChatAppAppID, "base_url="+e.sbURL)

	for _, tc := range []struct {
		config, change, wantFields string
	}{
		{"finam", "base_url=" + attacker.URL, "secret"},
		{"finam", "ca_cert=@" + caFile, "secret"},
		{"chat", "base_url=" + attacker.URL, "email, password, app_id"},
		{"chat", "base_url=" + attacker.URL + "/", "email, password, app_id"},
	} {
		r := e.vault.CLI("write", "broker/config/"+tc.config, tc.change)
		if r.OK() || !strings.Contains(r.Stderr, "Code: 400") || !strings.Contains(r.Stderr, tc.wantFields+": changing base_url, ca_cert or environment needs the secret fields again") {
			t.Fatalf("%s %s: not refused, or the error does not name the fields:\n%s", tc.config, tc.change, r)
		}
		// Reads after the refused write still go to the old endpoint.
		var cred secretResponse
		e.cliJSON(&cred, "read", "-format=json", "broker/creds/"+tc.config)
		var cfg struct {
			Data map[string]any `json:"data"`
		}
		e.cliJSON(&cfg, "read", "-format=json", "broker/config/"+tc.config)
		if cfg.Data["base_url"] != e.sbURL {
			t.Fatalf("%s: base_url changed to %v by a refused write", tc.config, cfg.Data["base_url"])
		}
	}
	// verify=false does not open the door either.
	if r := e.vault.CLI("write", "broker/config/finam", "base_url="+attacker.URL, "verify=false"); r.OK() {
		t.Fatal("verify=false moved the config without its secret")
	}
	e.cli("write", "-f", "broker/config/finam/retire")
	e.cli("read", "broker/creds/finam")
	if n := hits.Load(); n != 0 {
		t.Fatalf("the attacker's host received %d request(s)", n)
	}

	// With the secret in the same write, the config moves (the operator
	// holds the secret, so nothing leaks that they did not have).
	e.cli("write", "broker/config/finam", "base_url="+attacker.URL, "secret="+sandbox.FinamSecret)
	if hits.Load() == 0 {
		t.Fatal("a write carrying the secret did not verify against the new endpoint")
	}
}
