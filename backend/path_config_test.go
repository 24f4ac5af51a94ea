package backend

import (
	"context"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func TestConfigWriteRejectsBadInput(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	good := func(over map[string]any) map[string]any {
		d := map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url}
		for k, v := range over {
			if v == nil {
				delete(d, k)
			} else {
				d[k] = v
			}
		}
		return d
	}
	cases := []struct {
		name  string
		data  map[string]any
		field string // the error must name it
		want  string
	}{
		{"unknown field", good(map[string]any{"colour": "blue"}), "colour", "unknown field"},
		{"missing provider", good(map[string]any{"provider": nil}), "provider", "required"},
		{"unknown provider", good(map[string]any{"provider": "moex"}), "provider", "unknown provider"},
		{"chatapp wrong password", good(map[string]any{"provider": "chatapp", "secret": nil, "email": "ops@example.com", "password": "wrong", "app_id": "app_123"}), "ChatApp", "HTTP 401"},
		{"missing secret", good(map[string]any{"secret": nil}), "secret", "required"},
		{"blank secret", good(map[string]any{"secret": "  \n"}), "secret", "empty"},
		{"field of another provider", good(map[string]any{"token": "x"}), "token", "does not apply to provider finam"},
		{"environment finam lacks", good(map[string]any{"environment": "sandbox"}), "environment", `no "sandbox" environment`},
		{"plain http to a remote host", good(map[string]any{"base_url": "http://example.com"}), "base_url", "https"},
		{"ftp scheme", good(map[string]any{"base_url": "ftp://127.0.0.1"}), "base_url", "scheme"},
		{"credentials in base_url", good(map[string]any{"base_url": "https://u:p@example.com"}), "base_url", "credentials"},
		{"query in base_url", good(map[string]any{"base_url": "https://example.com/?x=1"}), "base_url", "query"},
		{"relative base_url", good(map[string]any{"base_url": "api.finam.ru"}), "base_url", "absolute"},
		{"ca_cert not PEM", good(map[string]any{"ca_cert": "hello"}), "ca_cert", "no PEM"},
		{"ttl not a duration", good(map[string]any{"ttl": "soon"}), "ttl", "invalid duration"},
		{"ttl above max_ttl", good(map[string]any{"ttl": "2h", "max_ttl": "1h"}), "ttl", "max_ttl"},
		{"require_readonly not a bool", good(map[string]any{"require_readonly": "maybe"}), "require_readonly", "ParseBool"},
		{"empty account", good(map[string]any{"allowed_accounts": "1899011,,x"}), "allowed_accounts", "empty"},
		{"readonly guard refuses trading token", good(map[string]any{"require_readonly": true}), "require_readonly", "can trade"},
		{"accounts guard names the outsider", good(map[string]any{"allowed_accounts": "1899011"}), "allowed_accounts", "1899012"},
		{"wrong secret", good(map[string]any{"secret": "not-the-secret"}), "Finam", "HTTP 401"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := h.do(logical.UpdateOperation, "config/bad", tc.data)
			msg := errText(resp, err)
			if statusOf(resp, err) != 400 {
				t.Fatalf("want 400, got %d: %s", statusOf(resp, err), msg)
			}
			if !containsAll(msg, tc.field, tc.want) {
				t.Fatalf("error %q does not name %q / %q", msg, tc.field, tc.want)
			}
			if strings.Contains(msg, sandbox.FinamSecret) {
				t.Fatalf("error leaks the secret: %q", msg)
			}
			// (A make's quota counter may be kept: the quota was spent upstream.)
			for _, prefix := range []string{configPrefix, tokenPrefix} {
				if keys, _ := h.storage.List(context.Background(), prefix); len(keys) != 0 {
					t.Fatalf("a rejected write stored %s%v", prefix, keys)
				}
			}
		})
	}
}

func TestConfigReadShowsStatusNeverSecret(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", map[string]any{"secret": "  " + sandbox.FinamSecret + "\n", "ttl": "5m"})
	resp := h.ok(logical.ReadOperation, "config/finam", nil)
	for k, v := range resp.Data {
		if s, ok := v.(string); ok && strings.Contains(s, sandbox.FinamSecret) {
			t.Fatalf("field %s shows the secret", k)
		}
	}
	if _, ok := resp.Data["secret"]; ok {
		t.Fatal("read has a secret field")
	}
	checks := map[string]any{"provider": "finam", "environment": "production", "secret_set": true, "ttl": int64(300), "readonly": false}
	for k, want := range checks {
		if resp.Data[k] != want {
			t.Errorf("%s = %v, want %v", k, resp.Data[k], want)
		}
	}
	if resp.Data["token_expires_at"] == "" || resp.Data["last_refresh"] == "" {
		t.Errorf("status missing: %v", resp.Data)
	}
	if got := resp.Data["account_ids"].([]string); len(got) != 2 {
		t.Errorf("account_ids = %v", got)
	}
	// The trimmed secret is what was verified and stored.
	cfg, _ := readConfig(context.Background(), h.storage, "finam")
	if cfg.Secrets["secret"] != sandbox.FinamSecret {
		t.Fatalf("secret not trimmed: %q", cfg.Secrets["secret"])
	}
}

func TestConfigUpdateKeepsFieldsAndProvider(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", map[string]any{"ttl": "5m"})
	h.ok(logical.UpdateOperation, "config/finam", map[string]any{"max_ttl": "1h"})
	resp := h.ok(logical.ReadOperation, "config/finam", nil)
	if resp.Data["ttl"] != int64(300) || resp.Data["max_ttl"] != int64(3600) || resp.Data["secret_set"] != true {
		t.Fatalf("update lost fields: %v", resp.Data)
	}
	r, err := h.do(logical.UpdateOperation, "config/finam", map[string]any{"provider": "alor"})
	if statusOf(r, err) != 400 || !strings.Contains(errText(r, err), "provider: cannot change") {
		t.Fatalf("provider change not refused: %s", errText(r, err))
	}
}

func TestConfigListAndDelete(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("a", nil)
	h.writeFinam("b", map[string]any{"verify": false})
	resp := h.ok(logical.ListOperation, "config/", nil)
	if keys := resp.Data["keys"].([]string); len(keys) != 2 {
		t.Fatalf("keys = %v", keys)
	}
	h.ok(logical.DeleteOperation, "config/a", nil)
	if r := h.ok(logical.ReadOperation, "config/a", nil); r != nil {
		t.Fatalf("deleted config still reads: %v", r.Data)
	}
	if e, _ := h.storage.Get(context.Background(), tokenPrefix+"a"); e != nil {
		t.Fatal("deleted config left its token in storage")
	}
	r, err := h.do(logical.ReadOperation, "creds/a", nil)
	if statusOf(r, err) != 404 || !strings.Contains(errText(r, err), `no config or role named "a"`) {
		t.Fatalf("creds of deleted config: %s", errText(r, err))
	}
}

func TestConfigVerifyFalseStoresWithoutCalling(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	resp := h.writeFinam("finam", map[string]any{"secret": "unchecked", "verify": false})
	if len(resp.Warnings) == 0 {
		t.Error("verify=false gave no warning")
	}
	if n := h.sb.Calls(sessionsEP); n != 0 {
		t.Fatalf("verify=false called the broker %d times", n)
	}
}

func TestConfigUpstreamFailureNamesBroker(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.InjectFault(sessionsEP, 503, -1)
	resp, err := h.do(logical.UpdateOperation, "config/finam", map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url})
	if statusOf(resp, err) != 502 {
		t.Fatalf("want 502, got %d", statusOf(resp, err))
	}
	if msg := errText(resp, err); !containsAll(msg, "Finam", "HTTP 503", "unavailable", "nothing was stored") {
		t.Fatalf("unclear error: %s", msg)
	}
	if keys, _ := h.storage.List(context.Background(), ""); len(keys) != 1 || keys[0] != schemaKey {
		t.Fatalf("stored %v, want only the schema version", keys)
	}
}
