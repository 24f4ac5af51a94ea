package finam

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
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
		numeric  bool
		readonly bool
		accounts string
	}{
		{"trading secret", sandbox.FinamSecret, false, false, "1899011,1899012"},
		{"read-only secret", sandbox.FinamReadOnlySecret, false, true, "1899011"},
		// A gateway may send the enum's number (docs/finam.md).
		{"quote_level as a number", sandbox.FinamSecret, true, false, "1899011,1899012"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb.SetFinamNumericQuoteLevel(tc.numeric)
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
			perms := tok.Details["md_permissions"].([]map[string]any)
			if len(perms) != 2 || perms[0]["mic"] != "MISX" ||
				perms[0]["quote_level"] != "QUOTE_LEVEL_LAST_PRICE" || perms[1]["quote_level"] != "QUOTE_LEVEL_BEST_BID_OFFER" {
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
		kind   upstream.Failure
		want   []string
	}{
		{"wrong secret", "wrong-secret-value", 0, upstream.Unauthorized, []string{"Finam POST /v1/sessions", "HTTP 401", "Finam portal"}},
		{"rate limited", sandbox.FinamSecret, 429, upstream.RateLimited, []string{"HTTP 429", "200 requests a minute"}},
		{"unavailable", sandbox.FinamSecret, 503, upstream.Unavailable, []string{"HTTP 503", "Service is unavailable"}},
		{"internal", sandbox.FinamSecret, 500, upstream.Unavailable, []string{"HTTP 500", "code 13"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb.InjectFault("POST /v1/sessions", tc.fault, -1)
			defer sb.InjectFault("POST /v1/sessions", 0, 0)
			_, err := New().Issue(context.Background(), request(t, srv.URL, tc.secret))
			ue, ok := upstream.AsError(err)
			if !ok || ue.Failure != tc.kind {
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
			if !ok || ue.Failure != upstream.BadResponse || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v", err)
			}
		})
	}
}

func TestExpiryFallsBackToJWT(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	payload, _ := json.Marshal(map[string]any{"iat": now.Unix(), "exp": now.Add(15 * time.Minute).Unix()})
	jwt := fuzzJWT(string(payload))
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

func TestQuoteLevel(t *testing.T) {
	cases := []struct {
		name, json, want string
		fails            bool
	}{
		{name: "name", json: `"QUOTE_LEVEL_DEPTH_OF_BOOK"`, want: "QUOTE_LEVEL_DEPTH_OF_BOOK"},
		{name: "unknown name kept", json: `"QUOTE_LEVEL_NEW"`, want: "QUOTE_LEVEL_NEW"},
		{name: "number", json: `3`, want: "QUOTE_LEVEL_DEPTH_OF_MARKET"},
		{name: "zero", json: `0`, want: "QUOTE_LEVEL_UNSPECIFIED"},
		{name: "last known number", json: `5`, want: "QUOTE_LEVEL_ACCESS_FORBIDDEN"},
		{name: "unknown number kept", json: `6`, want: "6"},
		{name: "negative number kept", json: `-1`, want: "-1"},
		{name: "null", json: `null`, want: ""},
		{name: "fraction", json: `1.5`, fails: true},
		{name: "bool", json: `true`, fails: true},
		{name: "object", json: `{}`, fails: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var p MDPermission
			err := json.Unmarshal([]byte(`{"quote_level":`+tc.json+`,"delay_minutes":15}`), &p)
			if tc.fails {
				if err == nil {
					t.Fatalf("accepted %s as %q", tc.json, p.QuoteLevel)
				}
				return
			}
			if err != nil || string(p.QuoteLevel) != tc.want || p.DelayMinutes != 15 {
				t.Fatalf("quote_level %s: %q, %v", tc.json, p.QuoteLevel, err)
			}
		})
	}
}

// TestGuardEvidence: allowed_accounts holds only on a list of accounts from
// Finam. A TokenDetails without one (proto3 JSON drops an empty list) proves
// nothing, and the mint is refused with the reason.
func TestGuardEvidence(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	srv := httptest.NewServer(sb)
	defer srv.Close()
	sb.AddFinamSecret("no-accounts-secret", nil, false)
	sb.AddFinamSecret("no-accounts-ro-secret", nil, true)
	cases := []struct {
		name     string
		secret   string
		allowed  []string
		requireR bool
		refused  bool
		reason   string
		accounts string
		readonly bool
	}{
		{name: "accounts listed, inside", secret: sandbox.FinamReadOnlySecret, allowed: []string{"1899011"}, accounts: "1899011", readonly: true},
		// Which accounts are outside is the backend's check: the provider
		// hands the list over.
		{name: "accounts listed, some outside", secret: sandbox.FinamSecret, allowed: []string{"1899011"}, accounts: "1899011,1899012"},
		{name: "no accounts listed, allowed_accounts set", secret: "no-accounts-secret", allowed: []string{"1899011"}, refused: true},
		{name: "no accounts, read-only, allowed_accounts set", secret: "no-accounts-ro-secret", allowed: []string{"1899011"}, refused: true},
		{name: "no accounts listed, no guard", secret: "no-accounts-secret", accounts: ""},
		// readonly absent from the answer (proto3 drops false): not read-only.
		{name: "readonly absent", secret: sandbox.FinamSecret, accounts: "1899011,1899012", readonly: false},
		{name: "readonly absent, require_readonly", secret: sandbox.FinamSecret, requireR: true, refused: true,
			reason: "can trade (TokenDetails readonly is false or absent)"},
		{name: "readonly true, require_readonly", secret: sandbox.FinamReadOnlySecret, requireR: true, accounts: "1899011", readonly: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			req := request(t, srv.URL, tc.secret)
			req.AllowedAccounts = tc.allowed
			req.RequireReadOnly = tc.requireR
			tok, err := New().Issue(context.Background(), req)
			if tc.refused && tc.reason != "" {
				if !errors.Is(err, provider.ErrGuard) || !strings.Contains(err.Error(), tc.reason) {
					t.Fatalf("want a guard refusal saying %q, got %v", tc.reason, err)
				}
				return
			}
			if tc.refused {
				if !errors.Is(err, provider.ErrGuard) || !errors.Is(err, ErrNoAccounts) {
					t.Fatalf("want a guard refusal, got %v (token %+v)", err, tok)
				}
				if !strings.Contains(err.Error(), "allowed_accounts cannot be checked") || strings.Contains(err.Error(), tc.secret) {
					t.Fatalf("refusal does not say why, or leaks: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(tok.AccountIDs, ",") != tc.accounts || tok.AccountIDs == nil || tok.ReadOnly != tc.readonly {
				t.Fatalf("accounts %q readonly %v", tok.AccountIDs, tok.ReadOnly)
			}
		})
	}
}

// TestAuthErrorsOnEveryCall: 400 and 401 mean an expired or invalid secret
// or token on /v1/sessions and /v1/sessions/details alike.
func TestAuthErrorsOnEveryCall(t *testing.T) {
	cases := []struct {
		name   string
		path   string
		status int
		kind   upstream.Failure
	}{
		{"sessions 400", pathSessions, 400, upstream.Unauthorized},
		{"sessions 401", pathSessions, 401, upstream.Unauthorized},
		{"details 400", pathDetails, 400, upstream.Unauthorized},
		{"details 401", pathDetails, 401, upstream.Unauthorized},
		{"details 404", pathDetails, 404, upstream.Rejected},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != tc.path {
					w.Write([]byte(`{"token":"a.e30.c"}`))
					return
				}
				w.WriteHeader(tc.status)
				w.Write([]byte(`{"code":3,"message":"token is expired or invalid"}`))
			}))
			defer srv.Close()
			_, err := New().Issue(context.Background(), request(t, srv.URL, "s3cret-value"))
			ue, ok := upstream.AsError(err)
			if !ok || ue.Failure != tc.kind || ue.Op != "POST "+tc.path {
				t.Fatalf("err = %v", err)
			}
			if tc.kind == upstream.Unauthorized && !strings.Contains(err.Error(), "Finam portal") {
				t.Fatalf("no hint: %v", err)
			}
		})
	}
}
