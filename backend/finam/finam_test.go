package finam

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/cmd/broker-sandbox/sandbox"
)

func request(t *testing.T, url, secret string) provider.Request {
	t.Helper()
	c, err := upstream.New(upstream.Options{Broker: "Finam"})
	if err != nil {
		t.Fatal(err)
	}
	return provider.Request{BaseURL: url, Client: c, Secrets: map[string]string{"secret": secret}}
}

func TestIssueAgainstSandbox(t *testing.T) {
	sb := sandbox.New(sandbox.Options{FinamTokenLifetime: 10 * time.Minute})
	srv := httptest.NewServer(sb)
	defer srv.Close()

	cases := []struct {
		name     string
		secret   string
		readonly bool
		accounts string
	}{
		{"trading secret", sandbox.FinamSecret, false, "1899011,1899012"},
		{"read-only secret", sandbox.FinamReadOnlySecret, true, "1899011"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := New().Issue(context.Background(), request(t, srv.URL, tc.secret))
			if err != nil {
				t.Fatal(err)
			}
			if !sb.FinamValid(tok.AccessToken) {
				t.Fatal("minted token is not valid at the sandbox")
			}
			if tok.ReadOnly != tc.readonly || strings.Join(tok.AccountIDs, ",") != tc.accounts {
				t.Fatalf("readonly=%v accounts=%v", tok.ReadOnly, tok.AccountIDs)
			}
			if life := tok.ExpiresAt.Sub(tok.IssuedAt); life < 9*time.Minute || life > 10*time.Minute+time.Second {
				t.Fatalf("lifetime %v, want the sandbox's 10m", life)
			}
			if perms := tok.Details["md_permissions"].([]map[string]any); len(perms) != 2 || perms[0]["mic"] != "MISX" {
				t.Fatalf("md_permissions = %v", perms)
			}
		})
	}
}

func TestIssueErrors(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	srv := httptest.NewServer(sb)
	defer srv.Close()
	cases := []struct {
		name   string
		secret string
		fault  int
		kind   upstream.Kind
		want   []string
	}{
		{"wrong secret", "wrong-secret-value", 0, upstream.KindAuth, []string{"Finam POST /v1/sessions", "HTTP 401", "Finam portal"}},
		{"rate limited", sandbox.FinamSecret, 429, upstream.KindRateLimited, []string{"HTTP 429", "200 requests a minute"}},
		{"unavailable", sandbox.FinamSecret, 503, upstream.KindUnavailable, []string{"HTTP 503", "Service is unavailable"}},
		{"internal", sandbox.FinamSecret, 500, upstream.KindUnavailable, []string{"HTTP 500", "code 13"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb.InjectFault("POST /v1/sessions", tc.fault, -1)
			defer sb.InjectFault("POST /v1/sessions", 0, 0)
			_, err := New().Issue(context.Background(), request(t, srv.URL, tc.secret))
			ue, ok := upstream.AsError(err)
			if !ok || ue.Kind != tc.kind {
				t.Fatalf("err = %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if strings.Contains(err.Error(), tc.secret) {
				t.Fatal("error leaks the secret")
			}
		})
	}
}

func TestIssueScrubsEchoedSecret(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body map[string]string
		json.NewDecoder(r.Body).Decode(&body)
		w.WriteHeader(401)
		json.NewEncoder(w).Encode(map[string]any{"code": 16, "message": "bad secret " + body["secret"]})
	}))
	defer srv.Close()
	_, err := New().Issue(context.Background(), request(t, srv.URL, "echoed-secret-123"))
	if err == nil || strings.Contains(err.Error(), "echoed-secret-123") || !strings.Contains(err.Error(), "[redacted]") {
		t.Fatalf("err = %v", err)
	}
}

func TestIssueBadResponses(t *testing.T) {
	cases := []struct {
		name string
		auth string
		det  string
		want string
	}{
		{"html page", "<html>oops</html>", "", "not the expected JSON"},
		{"truncated json", `{"token": "abc`, "", "not the expected JSON"},
		{"no token", `{}`, "", "no token"},
		{"no expiry anywhere", `{"token":"a.e30.c"}`, `{"account_ids":[]}`, "no expiry"},
		{"bad expires_at", `{"token":"a.e30.c"}`, `{"expires_at":"tomorrow"}`, "RFC 3339"},
		{"already expired", `{"token":"a.e30.c"}`, `{"expires_at":"2001-01-01T00:00:00Z"}`, "already expired"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == pathSessions {
					w.Write([]byte(tc.auth))
					return
				}
				w.Write([]byte(tc.det))
			}))
			defer srv.Close()
			_, err := New().Issue(context.Background(), request(t, srv.URL, "s"))
			ue, ok := upstream.AsError(err)
			if !ok || ue.Kind != upstream.KindBadResponse || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v", err)
			}
		})
	}
}

func TestExpiryFallsBackToJWT(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	payload, _ := json.Marshal(map[string]any{"iat": now.Unix(), "exp": now.Add(15 * time.Minute).Unix()})
	jwt := "e30." + base64.RawURLEncoding.EncodeToString(payload) + ".sig"
	tok, err := tokenFrom(jwt, Details{}, now)
	if err != nil {
		t.Fatal(err)
	}
	if !tok.ExpiresAt.Equal(now.Add(15*time.Minute)) || !tok.IssuedAt.Equal(now) {
		t.Fatalf("window %v..%v", tok.IssuedAt, tok.ExpiresAt)
	}
}

func TestLifetimeCorrectsClockSkew(t *testing.T) {
	now := time.Now()
	// The broker's clock runs 5 minutes ahead: its expires_at is later than
	// the token's real remaining life here.
	issued, expires := provider.Lifetime(now, now.Add(5*time.Minute), now.Add(20*time.Minute))
	if !issued.Equal(now) || !expires.Equal(now.Add(15*time.Minute)) {
		t.Fatalf("skew not corrected: %v..%v", issued, expires)
	}
}
