package backend

import (
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/cmd/broker-sandbox/sandbox"
)

func TestMetricsExposition(t *testing.T) {
	h := newHarness(t, sandbox.Options{})
	h.writeFinam("finam", map[string]any{"verify": false})
	for range 3 {
		h.mustOK(logical.ReadOperation, "creds/finam", nil)
	}
	h.do(logical.ReadOperation, "creds/nope", nil)
	resp := h.mustOK(logical.ReadOperation, "metrics", nil)
	if resp.Data[logical.HTTPContentType] != "text/plain; version=0.0.4" {
		t.Fatalf("content type %v", resp.Data[logical.HTTPContentType])
	}
	text := string(resp.Data[logical.HTTPRawBody].([]byte))
	for _, want := range []string{
		`broker_creds_total{config="finam",outcome="miss"} 1`,
		`broker_creds_total{config="finam",outcome="hit"} 2`,
		`broker_mints_total{config="finam",outcome="ok"} 1`,
		`broker_upstream_requests_total{provider="finam",op="POST /v1/sessions",outcome="ok"} 1`,
		`broker_upstream_request_duration_seconds_count{provider="finam",op="POST /v1/sessions/details"} 1`,
		`# TYPE broker_token_expiry_seconds gauge`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(text, "nope") {
		t.Error("a read of a missing config created a series")
	}
	if strings.Contains(text, sandbox.FinamSecret) || strings.Contains(text, "eyJ") {
		t.Error("metrics show a secret or a token")
	}
	h.b.mu.RLock()
	_, kept := h.b.states["nope"]
	h.b.mu.RUnlock()
	if kept {
		t.Error("a read of a missing config kept state in memory")
	}
}

func TestStaleTokenServedWithWarning(t *testing.T) {
	h := newHarness(t, sandbox.Options{FinamTokenLifetime: 9 * time.Second})
	h.writeFinam("finam", nil)
	h.sb.InjectFault(sessionsEP, 503, -1)
	h.skip(6600 * time.Millisecond)
	h.mustOK(logical.ReadOperation, "creds/finam", nil) // starts the failing refresh
	if !waitFor(t, 3*time.Second, func() bool {
		r := h.mustOK(logical.ReadOperation, "creds/finam", nil)
		return len(r.Warnings) > 0 && containsAll(r.Warnings[0], "serving the cached token", "HTTP 503")
	}) {
		t.Fatal("no warning while serving a token the broker could not refresh")
	}
}
