package backend

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func TestAllowedHosts(t *testing.T) {
	ms := &mountSettings{AllowedHosts: []string{"proxy.example.com", "127.0.0.1:8443", "*.corp.example"}}
	builtin := map[string]string{"production": "https://api.finam.ru"}
	cases := []struct {
		url  string
		want bool
	}{
		{"https://api.finam.ru", true}, // the broker's own endpoint
		{"https://proxy.example.com", true},
		{"https://PROXY.example.com:9443", true},
		{"https://evil.example.com", false},
		{"http://127.0.0.1:8443", true},
		{"http://127.0.0.1:9999", false},
		{"https://a.corp.example", true},
		{"https://corp.example", false},
		{"https://a.corp.example.evil.com", false},
		// *.corp.example is a label boundary: a host that merely ends in
		// the same letters is somebody else's domain.
		{"https://evilcorp.example", false},
		{"https://a.evilcorp.example", false},
	}
	for _, tc := range cases {
		if got := ms.hostAllowed(tc.url, builtin); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.url, got, tc.want)
		}
	}
	if !(&mountSettings{}).hostAllowed("https://anything.example", builtin) {
		t.Error("an empty allow-list must allow any host")
	}
}

func TestAllowedHostsEnforcedAtWriteAndMint(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", nil)
	h.ok(logical.UpdateOperation, "settings", map[string]any{"allowed_hosts": "proxy.example.com"})
	resp, err := h.do(logical.UpdateOperation, "config/other", map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url})
	if statusOf(resp, err) != 400 || !strings.Contains(errText(resp, err), "allowed_hosts") {
		t.Fatalf("a disallowed host was accepted: %d %q", statusOf(resp, err), errText(resp, err))
	}
	// The existing config's secret is not sent there either once its token
	// needs replacing.
	h.ok(logical.UpdateOperation, "config/finam/retire", nil)
	before := h.sb.Calls(sessionsEP)
	resp, err = h.do(logical.ReadOperation, "creds/finam", nil)
	if statusOf(resp, err) != 403 || h.sb.Calls(sessionsEP) != before {
		t.Fatalf("mint to a disallowed host: %d %q (calls %d->%d)", statusOf(resp, err), errText(resp, err), before, h.sb.Calls(sessionsEP))
	}
	r := h.ok(logical.ReadOperation, "settings", nil)
	if got := r.Data["allowed_hosts"].([]string); len(got) != 1 || got[0] != "proxy.example.com" {
		t.Fatalf("settings read: %v", got)
	}
	if resp, err := h.do(logical.UpdateOperation, "settings", map[string]any{"allowed_hosts": "https://x/y"}); statusOf(resp, err) != 400 {
		t.Fatal("a URL was accepted as a host")
	}
}

func TestRetireOfTInvestWarns(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeTInvest("tb", sandbox.TInvestReadOnlyToken, nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	resp := h.ok(logical.UpdateOperation, "config/tb/retire", nil)
	if len(resp.Warnings) == 0 || !strings.Contains(resp.Warnings[0], "T-Invest settings") {
		t.Fatalf("warnings: %v", resp.Warnings)
	}
	if r, err := h.do(logical.UpdateOperation, "config/nope/retire", nil); statusOf(r, err) != 400 {
		t.Fatal("retire of a missing config did not 400")
	}
}

// A broker's 2xx body that is not the JSON expected may carry part of a
// fresh token: errors, last_error and logs describe it, never quote it.
func TestUnreadableSuccessBodyIsDescribedNotQuoted(t *testing.T) {
	const partial = "eyJhbGciOiJIUzI1NiJ9.partial-fresh-token"
	for _, tc := range []struct{ provider, field, path string }{
		{"finam", "secret", "/v1/sessions"},
		{"alor", "refresh_token", "/refresh"},
	} {
		t.Run(tc.provider, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "text/plain")
				fmt.Fprint(w, "<"+partial+">")
			}))
			defer srv.Close()
			h := newSandboxHarness(t, sandbox.Options{})
			resp, err := h.do(logical.UpdateOperation, "config/x", map[string]any{"provider": tc.provider, tc.field: "s", "base_url": srv.URL})
			msg := errText(resp, err)
			if msg == "" || strings.Contains(msg, "partial-fresh-token") || !strings.Contains(msg, "byte") {
				t.Fatalf("%s: %q", tc.provider, msg)
			}
		})
	}
}
