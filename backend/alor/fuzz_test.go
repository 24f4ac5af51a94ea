package alor

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Fuzz targets for what ALOR's OAuth host (or whatever answers in its place)
// sends back. Fuzzed bodies may hold fuzzRefreshMarker, replaced by the
// refresh token before they are served: an echo must not reach an error.

const (
	fuzzRefresh       = "fz-AlorRefresh-3Hq8ZpK1wYc6"
	fuzzRefreshMarker = "@@REFRESH@@"
)

// fuzzJWT is an ALOR-shaped access JWT: ALOR's code reads its claims only.
func fuzzJWT(claims string) string {
	return brokertest.JWT(`{"alg":"ES256","typ":"JWT"}`, claims)
}

func checkError(t *testing.T, err error, without string) *upstream.Error {
	t.Helper()
	msg := err.Error()
	brokertest.CheckLeak(t, msg, without, fuzzRefresh)
	if ue, ok := upstream.AsError(err); ok {
		if ue.Broker != display || !strings.HasPrefix(msg, "ALOR POST /refresh") {
			t.Fatalf("error does not name ALOR and the call: %q", msg)
		}
		brokertest.CheckExcerpt(t, msg, ue.Message, ue.Code)
		return ue
	}
	// The only other errors are narrowing refusals, guard errors by design.
	if !strings.Contains(msg, "ALOR") || !errors.Is(err, provider.ErrGuard) {
		t.Fatalf("unexpected error %T: %v", err, err)
	}
	return nil
}

// FuzzAccessToken: the JWT is read from AccessToken (or the tolerated
// spellings) only as a non-empty string, and a refusal never quotes the
// refresh token.
func FuzzAccessToken(f *testing.F) {
	jwt := fuzzJWT(`{"exp":1772361000}`)
	for _, s := range []string{
		`{"AccessToken":"` + jwt + `"}`, `{"accessToken":"` + jwt + `"}`, `{"access_token":"` + jwt + `"}`,
		`{"AccessToken":""}`, `{"AccessToken":123}`, `{"AccessToken":null,"accessToken":"x"}`,
		`{"token":"` + fuzzRefreshMarker + `"}`, `{"AccessToken":"` + jwt[:30], `Forbidden`, `null`, `[]`,
		strings.Repeat("z", 185) + fuzzRefreshMarker,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		served := strings.ReplaceAll(body, fuzzRefreshMarker, fuzzRefresh)
		got, err := accessToken(&upstream.Response{Body: []byte(served)}, fuzzRefresh)
		if err != nil {
			if got != "" {
				t.Fatal("token and error")
			}
			if ue := checkError(t, err, strings.ReplaceAll(body, fuzzRefreshMarker, "")); ue == nil || ue.Failure != upstream.BadResponse {
				t.Fatalf("want a bad response, got %v", err)
			}
			return
		}
		var m map[string]any
		if json.Unmarshal([]byte(served), &m) != nil {
			t.Fatalf("read a token from a body that is not a JSON object: %q", body)
		}
		var want string
		for _, k := range []string{"AccessToken", "accessToken", "access_token"} {
			if v, present := m[k]; present {
				want, _ = v.(string)
				break
			}
		}
		if got == "" || got != want {
			t.Fatalf("read %q, the first token field holds %q", got, want)
		}
	})
}

// FuzzTokenFrom: the JWT's claims decide the token. An accepted JWT is alive
// at receipt, never reaches a portfolio outside allowed_accounts (the
// narrowing guarantee), and is read-only only if its scope proves it.
func FuzzTokenFrom(f *testing.F) {
	claims := func(extra string) string {
		return `{"sub":"P012345","ein":"99001","clientid":"12345","agreements":"1234567","iat":1772359200,"exp":1772361000` + extra + `}`
	}
	f.Add(claims(`,"portfolios":"D12345 D67890 G11111","scope":"OrdersRead OrdersCreate Trades Personal Stats"`), "")
	f.Add(claims(`,"portfolios":"D12345","scope":"OrdersRead Trades Personal Stats"`), "D12345")
	f.Add(claims(`,"portfolios":"D12345 D67890","scope":"OrdersRead"`), "D12345")
	f.Add(claims(`,"scope":"OrdersRead"`), "D12345")
	f.Add(claims(`,"portfolios":["D12345"," G11111 "],"scope":["OrdersRead","Stats"]`), "D12345, G11111")
	f.Add(claims(`,"portfolios":[1],"scope":"x"`), "")
	f.Add(claims(`,"portfolios":"","scope":"ordersread ORDERSCANCEL"`), "D1")
	f.Add(claims(`,"portfolios":null,"scope":null`), "")
	f.Add(`{"exp":1772361000.5}`, "")
	f.Add(`{"iat":1772359200}`, "")
	f.Add(`{"iat":1772361000,"exp":1772359200}`, "")
	f.Add(`{"exp":"1772361000"}`, "")
	f.Add(`null`, "")
	f.Fuzz(func(t *testing.T, claimsJSON, allowedCSV string) {
		received := time.Unix(1772359200, 0).Add(5 * time.Second)
		var allowed []string
		for _, a := range strings.Split(allowedCSV, ",") {
			if a = strings.TrimSpace(a); a != "" {
				allowed = append(allowed, a)
			}
		}
		jwt := fuzzJWT(claimsJSON)
		tok, err := tokenFrom(jwt, received, allowed)
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			checkError(t, err, claimsJSON)
			if strings.Contains(err.Error(), jwt) {
				t.Fatalf("error quotes the JWT: %v", err)
			}
			return
		}
		if tok.AccessToken != jwt || !tok.ExpiresAt.After(received) || !tok.IssuedAt.Before(tok.ExpiresAt) {
			t.Fatalf("token window [%v, %v] at receipt %v", tok.IssuedAt, tok.ExpiresAt, received)
		}
		c, _ := provider.JWTClaims(jwt)
		if brokerExp, _ := provider.NumericDate(c, "exp"); tok.ExpiresAt.After(brokerExp) {
			t.Fatalf("expires %v, after the JWT's exp %v", tok.ExpiresAt, brokerExp)
		}
		if tok.AccountIDs == nil {
			t.Fatal("nil account list")
		}
		if len(allowed) > 0 {
			for _, p := range tok.AccountIDs {
				if !slices.Contains(allowed, p) {
					t.Fatalf("token reaches %q outside allowed %q", p, allowed)
				}
			}
		}
		if tok.ReadOnly {
			scope, _, _ := words(c, "scope")
			if _, present := c["scope"]; !present || c["scope"] == nil {
				t.Fatal("read-only without a scope claim")
			}
			for _, w := range scope {
				lw := strings.ToLower(w)
				if strings.HasPrefix(lw, "orders") && !strings.HasPrefix(lw, "ordersread") {
					t.Fatalf("read-only with order right %q", w)
				}
			}
		}
		if _, err := json.Marshal(tok.Details); err != nil {
			t.Fatalf("details are not JSON-friendly: %v", err)
		}
	})
}

// FuzzClassify: an error answer names ALOR and /refresh, has the kind its
// status means, and never shows the refresh token, even cut short.
func FuzzClassify(f *testing.F) {
	f.Add(403, `Forbidden`, uint8(1), false)
	f.Add(401, ``, uint8(2), false)
	f.Add(400, `portfolio D99999 is not available to this user`, uint8(0), true)
	f.Add(429, `Too many requests`, uint8(1), false)
	f.Add(500, `{"type":"about:blank","title":"Internal Server Error","status":500}`, uint8(1), false)
	f.Add(502, `<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>`, uint8(0), false)
	f.Add(403, `{"message":"refresh token `+fuzzRefreshMarker+` revoked"}`, uint8(1), false)
	f.Add(503, "line\none\x00", uint8(0), false)
	f.Fuzz(checkClassify)
}

// TestFuzzFindingExcerptBeforeScrub: classify cuts ALOR's error text to an
// excerpt first and scrubs it second, so a refresh token echoed across the
// excerpt's 200-character cut is no longer recognised and its first part
// shows in the error (and in last_error and the server log).
func TestFuzzFindingExcerptBeforeScrub(t *testing.T) {
	t.Run("text body", func(t *testing.T) {
		checkClassify(t, 403, strings.Repeat("r", 190)+fuzzRefreshMarker, 1, false)
	})
	t.Run("JSON error", func(t *testing.T) {
		checkClassify(t, 403, `{"error":"`+strings.Repeat("e", 188)+fuzzRefreshMarker+`"}`, 1, false)
	})
}

func checkClassify(t *testing.T, status int, body string, envIndex uint8, narrowing bool) {
	if status < 300 || status > 599 {
		return
	}
	// The environment comes from the config (validated), not the broker.
	env := []string{"", "production", "sandbox"}[envIndex%3]
	call := upstream.Call{Method: http.MethodPost, Op: opRefresh, Secrets: []string{fuzzRefresh}}
	served := strings.ReplaceAll(body, fuzzRefreshMarker, fuzzRefresh)
	e := classify(call, &upstream.Response{Status: status, Header: http.Header{}, Body: []byte(served)}, env, narrowing)
	ue := checkError(t, e, strings.ReplaceAll(body, fuzzRefreshMarker, ""))
	want := upstream.FailureForStatus(status)
	if status == http.StatusForbidden || status == http.StatusUnauthorized {
		want = upstream.Unauthorized
	}
	if ue.Failure != want || ue.Status != status {
		t.Fatalf("HTTP %d is %v, want %v", status, ue.Failure, want)
	}
	if want == upstream.Unauthorized && env != "" && !strings.Contains(ue.Hint, env) {
		t.Fatalf("auth hint does not name the %s environment", env)
	}
}

type fuzzOAuth struct {
	mu     sync.Mutex
	status int
	body   string
	calls  int
}

func (s *fuzzOAuth) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls++
	w.WriteHeader(s.status)
	_, _ = w.Write([]byte(strings.ReplaceAll(s.body, fuzzRefreshMarker, fuzzRefresh)))
}

// FuzzIssue drives Issue end to end through the real upstream client: one
// call per Issue whatever the answer (a mint is never retried), and the
// properties above on its outcome.
func FuzzIssue(f *testing.F) {
	srv := &fuzzOAuth{}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	client, err := upstream.New(upstream.Options{Broker: display, MaxAttempts: 3, Timeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	now := time.Now().Unix()
	b, _ := json.Marshal(map[string]any{"exp": now + 1800, "iat": now, "portfolios": "D12345", "scope": "OrdersRead"})
	jwt := fuzzJWT(string(b))
	f.Add(200, `{"AccessToken":"`+jwt+`"}`, "D12345")
	f.Add(200, `{"AccessToken":"`+jwt+`"}`, "G11111")
	f.Add(403, `Forbidden`, "")
	f.Add(503, `{"title":"Service Unavailable"}`, "")
	f.Add(200, `{"AccessToken":"`+jwt[:40], "")
	f.Add(200, `<html>`+fuzzRefreshMarker+`</html>`, "")
	f.Fuzz(func(t *testing.T, status int, body, allowedCSV string) {
		if status < 200 || status > 599 {
			return
		}
		var allowed []string
		for _, a := range strings.Split(allowedCSV, ",") {
			if a = strings.TrimSpace(a); a != "" {
				allowed = append(allowed, a)
			}
		}
		srv.mu.Lock()
		srv.status, srv.body, srv.calls = status, body, 0
		srv.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tok, err := New().Issue(ctx, provider.Request{BaseURL: ts.URL, Client: client, Secrets: map[string]string{fieldToken: fuzzRefresh}, AllowedAccounts: allowed})
		srv.mu.Lock()
		calls := srv.calls
		srv.mu.Unlock()
		if calls != 1 {
			t.Fatalf("refresh called %d times: a mint is never retried", calls)
		}
		if err != nil {
			checkError(t, err, strings.ReplaceAll(body, fuzzRefreshMarker, ""))
			return
		}
		if status >= 300 {
			t.Fatalf("succeeded on HTTP %d", status)
		}
		for _, p := range tok.AccountIDs {
			if len(allowed) > 0 && !slices.Contains(allowed, p) {
				t.Fatalf("token reaches %q outside %q", p, allowed)
			}
		}
	})
}
