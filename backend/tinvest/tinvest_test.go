package tinvest_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/tinvest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream/clocktest"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// fakeClock is a settable clock for the sandbox's rate-limit windows and
// the provider's waits.
type fakeClock = clocktest.Clock

type env struct {
	sb         *sandbox.Server
	prod, sand string // base URLs of the two environments
}

func newSandbox(t *testing.T, opts sandbox.Options) env {
	t.Helper()
	sb := sandbox.New(opts)
	ts := httptest.NewServer(sb)
	t.Cleanup(ts.Close)
	return env{sb: sb, prod: ts.URL + sandbox.TInvestPrefix, sand: ts.URL + sandbox.TInvestSandboxPrefix}
}

func newClient(t *testing.T, attempts int) *upstream.Client {
	t.Helper()
	c, err := upstream.New(upstream.Options{Broker: "T-Invest", MaxAttempts: attempts, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func issue(t *testing.T, c *upstream.Client, base, environment, token string) (*provider.Token, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return tinvest.New().Issue(ctx, provider.Request{
		BaseURL:     base,
		Environment: environment,
		Client:      c,
		Secrets:     map[string]string{"token": token},
	})
}

// upstreamErr asserts err is an *upstream.Error that does not leak token.
func upstreamErr(t *testing.T, err error, token string) *upstream.Error {
	t.Helper()
	if err == nil {
		t.Fatal("want an error, got none")
	}
	// Half the token is enough to call it leaked: a cut excerpt must not
	// carry a recognisable piece of it either.
	if strings.Contains(err.Error(), token[:len(token)/2]) {
		t.Fatalf("error text leaks the token: %v", err)
	}
	ue, ok := upstream.AsError(err)
	if !ok {
		t.Fatalf("want *upstream.Error, got %T: %v", err, err)
	}
	if ue.Broker != "T-Invest" {
		t.Errorf("Broker = %q, want T-Invest", ue.Broker)
	}
	return ue
}

func TestSpec(t *testing.T) {
	s := tinvest.New().Spec()
	if s.Name != "tinvest" || s.Display != "T-Invest" || s.Issuance != provider.Passthrough || s.DefaultTTL != time.Hour {
		t.Errorf("spec = %+v", s)
	}
	if len(s.Fields) != 1 || s.Fields[0].Name != "token" || !s.Fields[0].Secret || !s.Fields[0].Required {
		t.Errorf("fields = %+v", s.Fields)
	}
	want := map[string]string{
		"production": "https://invest-public-api.tbank.ru/rest",
		"sandbox":    "https://sandbox-invest-public-api.tbank.ru/rest",
	}
	if len(s.Environments) != len(want) {
		t.Errorf("environments = %v", s.Environments)
	}
	for k, v := range want {
		if s.Environments[k] != v {
			t.Errorf("environment %s = %q, want %q", k, s.Environments[k], v)
		}
	}
}

func TestIssueTokenKinds(t *testing.T) {
	e := newSandbox(t, sandbox.Options{})
	// A one-account read-only token: limited, and unable to trade.
	e.sb.AddTInvestToken("custom-limited-readonly", false,
		sandbox.TInvestAccount{ID: "3000000001", Type: "ACCOUNT_TYPE_TINKOFF_IIS", Status: "ACCOUNT_STATUS_OPEN", AccessLevel: sandbox.TInvestReadOnly},
		sandbox.TInvestAccount{ID: "3000000002", Type: "ACCOUNT_TYPE_TINKOFF", Status: "ACCOUNT_STATUS_OPEN", AccessLevel: sandbox.TInvestNoAccess},
	)
	allUser := []string{"2000000001", "2000000002", "2000000003", "2000000004"}
	cases := []struct {
		name, token, env string
		sandboxEnv       bool
		kind             string
		readOnly         bool
		ids              []string
		reported         int // accounts listed in details, NO_ACCESS included
	}{
		{"full access", sandbox.TInvestFullToken, "production", false, tinvest.TokenFullAccess, false, allUser, 4},
		{"read only", sandbox.TInvestReadOnlyToken, "production", false, tinvest.TokenReadOnly, true, allUser, 4},
		{"one account", sandbox.TInvestAccountToken, "production", false, tinvest.TokenAccountLimited, false, []string{sandbox.TInvestAccountID}, 4},
		{"empty environment is production", sandbox.TInvestFullToken, "", false, tinvest.TokenFullAccess, false, allUser, 4},
		{"one account read only", "custom-limited-readonly", "production", false, tinvest.TokenAccountLimited, true, []string{"3000000001"}, 2},
		{"sandbox token on sandbox", sandbox.TInvestSandboxToken, "sandbox", true, tinvest.TokenSandbox, false, []string{"0c3e4a8f-6b1d-4f2a-9e7c-5d8b2a1f3e60"}, 1},
	}
	c := newClient(t, 1)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.sb.ResetCalls()
			base, infoEP, acctsEP := e.prod, sandbox.TInvestGetInfoEP, sandbox.TInvestGetAccountsEP
			if tc.sandboxEnv {
				base, infoEP, acctsEP = e.sand, sandbox.TInvestSandboxGetInfoEP, sandbox.TInvestSandboxGetAccountsEP
			}
			before := time.Now()
			tok, err := issue(t, c, base, tc.env, tc.token)
			if err != nil {
				t.Fatal(err)
			}
			if tok.AccessToken != tc.token {
				t.Errorf("AccessToken = %q, want the token itself", tok.AccessToken)
			}
			if !tok.ExpiresAt.IsZero() {
				t.Errorf("ExpiresAt = %v, want zero (no known expiry)", tok.ExpiresAt)
			}
			if tok.IssuedAt.Before(before) || tok.IssuedAt.After(time.Now()) {
				t.Errorf("IssuedAt = %v, want now", tok.IssuedAt)
			}
			if !slices.Equal(tok.AccountIDs, tc.ids) {
				t.Errorf("AccountIDs = %v, want %v", tok.AccountIDs, tc.ids)
			}
			if tok.ReadOnly != tc.readOnly {
				t.Errorf("ReadOnly = %v, want %v", tok.ReadOnly, tc.readOnly)
			}
			if got := tok.Details["token_kind"]; got != tc.kind {
				t.Errorf("token_kind = %v, want %s", got, tc.kind)
			}
			wantUser := sandbox.TInvestUserID
			if tc.token == "custom-limited-readonly" {
				wantUser = sandbox.TInvestTokenUser(tc.token)
			}
			if got := tok.Details["user_id"]; got != wantUser {
				t.Errorf("user_id = %v, want %s", got, wantUser)
			}
			if got := tok.Details["tariff"]; got != "investor" {
				t.Errorf("tariff = %v", got)
			}
			accts, _ := tok.Details["accounts"].([]map[string]any)
			if len(accts) != tc.reported {
				t.Fatalf("details accounts = %v, want %d", tok.Details["accounts"], tc.reported)
			}
			for _, a := range accts {
				for _, k := range []string{"id", "type", "name", "status", "access_level"} {
					if _, ok := a[k]; !ok {
						t.Errorf("account %v lacks %s", a["id"], k)
					}
				}
			}
			if _, err := json.Marshal(tok.Details); err != nil {
				t.Errorf("details are not JSON-friendly: %v", err)
			}
			if e.sb.Calls(infoEP) != 1 || e.sb.Calls(acctsEP) != 1 {
				t.Errorf("calls = %v, want one GetInfo and one GetAccounts on this environment", e.sb.AllCalls())
			}
		})
	}
}

func TestAccountDetails(t *testing.T) {
	e := newSandbox(t, sandbox.Options{})
	tok, err := issue(t, newClient(t, 1), e.prod, "production", sandbox.TInvestAccountToken)
	if err != nil {
		t.Fatal(err)
	}
	byID := map[string]map[string]any{}
	for _, a := range tok.Details["accounts"].([]map[string]any) {
		byID[a["id"].(string)] = a
	}
	want := map[string]any{
		"id": "2000000001", "type": "ACCOUNT_TYPE_TINKOFF", "name": "Брокерский счёт",
		"status": "ACCOUNT_STATUS_OPEN", "access_level": "ACCOUNT_ACCESS_LEVEL_FULL_ACCESS",
		"opened_date": "2021-03-01T00:00:00Z",
	}
	got := byID["2000000001"]
	for k, v := range want {
		if got[k] != v {
			t.Errorf("open account %s = %v, want %v", k, got[k], v)
		}
	}
	// The sandbox, like the gateway, sends the epoch as an open account's
	// closedDate: that is "not closed", not a date to show.
	if v, ok := got["closed_date"]; ok {
		t.Errorf("open account has closed_date %v", v)
	}
	closed := byID["2000000004"]
	if closed["closed_date"] != "2023-03-31T00:00:00Z" || closed["status"] != "ACCOUNT_STATUS_CLOSED" {
		t.Errorf("closed account = %v", closed)
	}
	if byID["2000000002"]["access_level"] != "ACCOUNT_ACCESS_LEVEL_NO_ACCESS" {
		t.Errorf("other account = %v, want NO_ACCESS listed", byID["2000000002"])
	}
}

func TestWrongEnvironmentRefused(t *testing.T) {
	e := newSandbox(t, sandbox.Options{})
	c := newClient(t, 1)
	cases := []struct {
		name, base, env, token, says string
	}{
		{"sandbox token on production", e.prod, "production", sandbox.TInvestSandboxToken, "a sandbox token is refused by production endpoints"},
		{"production token on sandbox", e.sand, "sandbox", sandbox.TInvestFullToken, "a production token is refused by the sandbox endpoints"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := issue(t, c, tc.base, tc.env, tc.token)
			ue := upstreamErr(t, err, tc.token)
			if ue.Failure != upstream.Unauthorized || ue.Code != "40003" || ue.Status != http.StatusUnauthorized {
				t.Errorf("got kind %v code %q status %d, want auth 40003 401", ue.Failure, ue.Code, ue.Status)
			}
			if !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error does not say %q: %v", tc.says, err)
			}
		})
	}
}

func TestRevokedToken(t *testing.T) {
	e := newSandbox(t, sandbox.Options{})
	c := newClient(t, 3)
	if _, err := issue(t, c, e.prod, "production", sandbox.TInvestReadOnlyToken); err != nil {
		t.Fatalf("before revoke: %v", err)
	}
	e.sb.RevokeTInvestToken(sandbox.TInvestReadOnlyToken)
	e.sb.ResetCalls()
	_, err := issue(t, c, e.prod, "production", sandbox.TInvestReadOnlyToken)
	ue := upstreamErr(t, err, sandbox.TInvestReadOnlyToken)
	if ue.Failure != upstream.Unauthorized || ue.Code != "40003" {
		t.Errorf("got kind %v code %q, want auth 40003", ue.Failure, ue.Code)
	}
	for _, s := range []string{"missing, invalid, expired", "revoked", "https://www.tbank.ru/invest/settings/", "x-tracking-id "} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error lacks %q: %v", s, err)
		}
	}
	// An auth failure is not retried, even on an idempotent call.
	if n := e.sb.Calls(sandbox.TInvestGetInfoEP); n != 1 {
		t.Errorf("GetInfo called %d times, want 1", n)
	}
}

func TestRequestShape(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	type seen struct{ path, auth, ctype, body string }
	var mu sync.Mutex
	var got []seen
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, seen{r.URL.Path, r.Header.Get("Authorization"), r.Header.Get("Content-Type"), string(b)})
		mu.Unlock()
		r.Body = io.NopCloser(strings.NewReader(string(b)))
		sb.ServeHTTP(w, r)
	}))
	defer ts.Close()
	// A trailing slash on the base URL must not double the separator.
	if _, err := issue(t, newClient(t, 1), ts.URL+"/rest/", "production", sandbox.TInvestFullToken); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	wantPaths := []string{
		"/rest/tinkoff.public.invest.api.contract.v1.UsersService/GetInfo",
		"/rest/tinkoff.public.invest.api.contract.v1.UsersService/GetAccounts",
	}
	if len(got) != len(wantPaths) {
		t.Fatalf("requests = %+v", got)
	}
	for i, g := range got {
		if g.path != wantPaths[i] {
			t.Errorf("request %d path = %q, want %q", i, g.path, wantPaths[i])
		}
		if g.auth != "Bearer "+sandbox.TInvestFullToken {
			t.Errorf("request %d Authorization = %q, want Bearer <token>", i, g.auth)
		}
		if g.body != "{}" || g.ctype != "application/json" {
			t.Errorf("request %d body %q content-type %q, want {} as JSON", i, g.body, g.ctype)
		}
	}
}

func TestRateLimit(t *testing.T) {
	clock := clocktest.New(time.Date(2025, 6, 2, 10, 0, 0, 0, time.UTC))
	e := newSandbox(t, sandbox.Options{Now: clock.Now})
	e.sb.SetTInvestRateLimit(2)
	c := newClient(t, 1) // one attempt: the error itself is under test
	// One Issue spends the window's two calls; the next is refused.
	if _, err := issue(t, c, e.prod, "production", sandbox.TInvestFullToken); err != nil {
		t.Fatalf("within the limit: %v", err)
	}
	_, err := issue(t, c, e.prod, "production", sandbox.TInvestFullToken)
	ue := upstreamErr(t, err, sandbox.TInvestFullToken)
	if ue.Failure != upstream.RateLimited || ue.Code != "80002" || ue.Status != http.StatusTooManyRequests {
		t.Fatalf("got kind %v code %q status %d, want rate limited 80002 429", ue.Failure, ue.Code, ue.Status)
	}
	if ue.RetryAfter != time.Minute {
		t.Errorf("RetryAfter = %v, want 1m (x-ratelimit-reset at the window's start)", ue.RetryAfter)
	}
	if !ue.Retryable() {
		t.Error("a rate-limit error must be retryable")
	}
	if !strings.Contains(err.Error(), "per user") {
		t.Errorf("hint does not say the limit is per user: %v", err)
	}
	clock.Advance(45 * time.Second)
	_, err = issue(t, c, e.prod, "production", sandbox.TInvestFullToken)
	if ue := upstreamErr(t, err, sandbox.TInvestFullToken); ue.RetryAfter != 15*time.Second {
		t.Errorf("RetryAfter = %v, want 15s (x-ratelimit-reset 45s into the window)", ue.RetryAfter)
	}
	// The limit is per user: another token of the same user is refused
	// too, while a token of another user is not.
	_, err = issue(t, c, e.prod, "production", sandbox.TInvestReadOnlyToken)
	if ue := upstreamErr(t, err, sandbox.TInvestReadOnlyToken); ue.Failure != upstream.RateLimited {
		t.Errorf("another token of the same user: %v, want rate limited", err)
	}
	e.sb.AddTInvestToken("t.another-user", false, sandbox.TInvestAccount{ID: "1", AccessLevel: sandbox.TInvestReadOnly})
	if _, err := issue(t, c, e.prod, "production", "t.another-user"); err != nil {
		t.Errorf("another user's token: %v", err)
	}
	// A new window lets the user through again.
	clock.Advance(15 * time.Second)
	if _, err := issue(t, c, e.prod, "production", sandbox.TInvestReadOnlyToken); err != nil {
		t.Errorf("next window: %v", err)
	}
}

func TestTransientFailureRetried(t *testing.T) {
	e := newSandbox(t, sandbox.Options{})
	e.sb.InjectFault(sandbox.TInvestGetInfoEP, http.StatusServiceUnavailable, 1)
	if _, err := issue(t, newClient(t, 3), e.prod, "production", sandbox.TInvestFullToken); err != nil {
		t.Fatalf("a single 503 should be retried away: %v", err)
	}
	if n := e.sb.Calls(sandbox.TInvestGetInfoEP); n != 2 {
		t.Errorf("GetInfo called %d times, want 2", n)
	}
	e.sb.InjectFault(sandbox.TInvestGetAccountsEP, http.StatusInternalServerError, -1)
	_, err := issue(t, newClient(t, 2), e.prod, "production", sandbox.TInvestFullToken)
	if ue := upstreamErr(t, err, sandbox.TInvestFullToken); ue.Failure != upstream.Unavailable || ue.Status != 500 {
		t.Errorf("got kind %v status %d, want unavailable 500", ue.Failure, ue.Status)
	}
}

// A token that a hostile or buggy gateway echoes back everywhere.
const echoed = "t.SECRET-token-value-0123456789"

func TestErrorBodies(t *testing.T) {
	cases := []struct {
		name       string
		env        string
		status     int
		header     map[string]string
		body       string
		kind       upstream.Failure
		code       string
		retryAfter time.Duration
		says       []string
	}{
		{name: "description as string", status: 401, body: `{"code":16,"message":"authentication token is missing or invalid","description":"40003"}`,
			kind: upstream.Unauthorized, code: "40003", says: []string{"authentication token is missing or invalid", "settings", "sandbox token is refused by production"}},
		{name: "description as number", status: 401, body: `{"code":16,"message":"authentication token is missing or invalid","description":40003}`,
			kind: upstream.Unauthorized, code: "40003", says: []string{"authentication token is missing or invalid"}},
		{name: "sandbox environment hint", env: "sandbox", status: 401, body: `{"code":16,"message":"authentication token is missing or invalid","description":"40003"}`,
			kind: upstream.Unauthorized, code: "40003", says: []string{"production token is refused by the sandbox endpoints"}},
		{name: "code wins over status", status: 400, body: `{"code":16,"message":"x","description":40003}`,
			kind: upstream.Unauthorized, code: "40003"},
		{name: "insufficient privileges", status: 403, body: `{"code":7,"message":"insufficient privileges","description":"40002"}`,
			kind: upstream.Rejected, code: "40002", says: []string{"insufficient privileges"}},
		{name: "insufficient privileges as number", status: 403, body: `{"code":7,"message":"insufficient privileges","description":40002}`,
			kind: upstream.Rejected, code: "40002"},
		{name: "rate limited", status: 429, header: map[string]string{"x-ratelimit-reset": "7"}, body: `{"code":8,"message":"request limit exceeded","description":"80002"}`,
			kind: upstream.RateLimited, code: "80002", retryAfter: 7 * time.Second, says: []string{"100 UsersService requests a minute"}},
		{name: "internal error", status: 500, body: `{"code":13,"message":"internal error"}`,
			kind: upstream.Unavailable, says: []string{"internal error"}},
		{name: "proxy page", status: 502, body: `<html><body>Bad Gateway</body></html>`,
			kind: upstream.Unavailable, says: []string{"Bad Gateway"}},
		{name: "401 without a body", status: 401, body: ``, kind: upstream.Unauthorized},
		{name: "description not a scalar", status: 401, body: `{"code":16,"description":{"a":1}}`, kind: upstream.Unauthorized},
		{name: "unknown 4xx", status: 404, body: `{"code":12,"message":"method not found"}`, kind: upstream.Rejected, says: []string{"method not found"}},
		{name: "tracking id quoted", status: 401, header: map[string]string{"x-tracking-id": "abc123trk"}, body: `{"code":16,"message":"nope","description":"40003"}`,
			kind: upstream.Unauthorized, code: "40003", says: []string{"nope (x-tracking-id abc123trk)"}},
		{name: "secret across the excerpt's cut", status: 401,
			body: `{"code":16,"message":"` + strings.Repeat("x", 180) + echoed + `","description":"40003"}`, kind: upstream.Unauthorized, code: "40003"},
		{name: "secret echoed in message and tracking id", status: 401, header: map[string]string{"x-tracking-id": "id-" + echoed},
			body: `{"code":16,"message":"token ` + echoed + ` is invalid","description":"40003"}`, kind: upstream.Unauthorized, code: "40003", says: []string{"[redacted]"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tc.header {
					w.Header().Set(k, v)
				}
				w.WriteHeader(tc.status)
				_, _ = io.WriteString(w, tc.body)
			}))
			defer ts.Close()
			_, err := issue(t, newClient(t, 1), ts.URL+"/rest", tc.env, echoed)
			ue := upstreamErr(t, err, echoed)
			if ue.Failure != tc.kind || ue.Code != tc.code || ue.Status != tc.status {
				t.Errorf("got kind %v code %q status %d, want %v %q %d: %v", ue.Failure, ue.Code, ue.Status, tc.kind, tc.code, tc.status, err)
			}
			if ue.RetryAfter != tc.retryAfter {
				t.Errorf("RetryAfter = %v, want %v", ue.RetryAfter, tc.retryAfter)
			}
			for _, s := range tc.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error lacks %q: %v", s, err)
				}
			}
		})
	}
}

func TestBadSuccessBodies(t *testing.T) {
	goodInfo := `{"tariff":"investor","userId":"u1"}`
	cases := []struct {
		name, info, accounts string
	}{
		{"garbage", "\x00\x01 not json at all", `{}`},
		{"html", `<html>ok</html>`, `{}`},
		{"truncated info", `{"tariff":"inv`, `{}`},
		{"truncated accounts", goodInfo, `{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACC`},
		{"null", `null`, `{}`},
		{"array", `[]`, `{}`},
		{"trailing garbage", goodInfo + `}}`, `{}`},
		{"accounts not a list", goodInfo, `{"accounts":"many"}`},
		{"account without id", goodInfo, `{"accounts":[{"accessLevel":"ACCOUNT_ACCESS_LEVEL_FULL_ACCESS"}]}`},
		{"access level an object", goodInfo, `{"accounts":[{"id":"1","accessLevel":{}}]}`},
		{"token echoed", `{"tariff":` + echoed, `{}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("x-tracking-id", "trk-1")
				w.Header().Set("Content-Type", "application/json")
				if strings.HasSuffix(r.URL.Path, "/GetInfo") {
					_, _ = io.WriteString(w, tc.info)
					return
				}
				_, _ = io.WriteString(w, tc.accounts)
			}))
			defer ts.Close()
			tok, err := issue(t, newClient(t, 1), ts.URL+"/rest", "production", echoed)
			if err == nil {
				t.Fatalf("want a bad-response error, got token %+v", tok)
			}
			ue := upstreamErr(t, err, echoed)
			if ue.Failure != upstream.BadResponse {
				t.Errorf("kind = %v, want bad response: %v", ue.Failure, err)
			}
		})
	}
}

func TestLenientAccountFields(t *testing.T) {
	// Enums as numbers (proto3 JSON allows it), no accounts key at all for
	// an empty list, and an unspecified access level.
	cases := []struct {
		name     string
		accounts string
		ids      []string
		readOnly bool
		kind     string
	}{
		{"numeric enums", `{"accounts":[{"id":"1","type":2,"status":2,"accessLevel":2},{"id":"2","accessLevel":3}]}`, []string{"1"}, true, tinvest.TokenAccountLimited},
		// No accounts proves nothing: not read-only.
		{"no accounts", `{}`, []string{}, false, tinvest.TokenUnknown},
		// An unknown level cannot prove the account read-only.
		{"unspecified level", `{"accounts":[{"id":"1"}]}`, []string{"1"}, false, tinvest.TokenFullAccess},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasSuffix(r.URL.Path, "/GetInfo") {
					_, _ = io.WriteString(w, `{"userId":"u1","tariff":"trader"}`)
					return
				}
				_, _ = io.WriteString(w, tc.accounts)
			}))
			defer ts.Close()
			tok, err := issue(t, newClient(t, 1), ts.URL+"/rest", "production", echoed)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(tok.AccountIDs, tc.ids) || tok.ReadOnly != tc.readOnly || tok.Details["token_kind"] != tc.kind {
				t.Errorf("got ids %v readonly %v kind %v, want %v %v %s", tok.AccountIDs, tok.ReadOnly, tok.Details["token_kind"], tc.ids, tc.readOnly, tc.kind)
			}
			if tc.name == "numeric enums" {
				a := tok.Details["accounts"].([]map[string]any)[0]
				if a["type"] != "ACCOUNT_TYPE_TINKOFF_IIS" || a["status"] != "ACCOUNT_STATUS_OPEN" || a["access_level"] != "ACCOUNT_ACCESS_LEVEL_READ_ONLY" {
					t.Errorf("numbers not named: %v", a)
				}
			}
		})
	}
}

func TestRefusedBeforeAnyCall(t *testing.T) {
	e := newSandbox(t, sandbox.Options{})
	c := newClient(t, 1)
	if _, err := issue(t, c, e.prod, "production", ""); err == nil {
		t.Error("empty token: want an error")
	}
	_, err := issue(t, c, e.prod, "staging", sandbox.TInvestFullToken)
	if err == nil || !strings.Contains(err.Error(), "staging") {
		t.Errorf("unknown environment: want an error naming it, got %v", err)
	}
	if calls := e.sb.AllCalls(); len(calls) != 0 {
		t.Errorf("upstream called: %v", calls)
	}
}
