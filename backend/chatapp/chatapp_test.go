package chatapp

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// fixture is a sandbox behind a recorder of what the provider sent.
type fixture struct {
	sb  *sandbox.Server
	url string

	mu   sync.Mutex
	seen []seenRequest
}

type seenRequest struct {
	endpoint string
	header   http.Header
	body     []byte
}

func newFixture(t *testing.T, opts sandbox.Options) *fixture {
	t.Helper()
	f := &fixture{sb: sandbox.New(opts)}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.seen = append(f.seen, seenRequest{endpoint: r.Method + " " + r.URL.Path, header: r.Header.Clone(), body: body})
		f.mu.Unlock()
		r.Body = io.NopCloser(strings.NewReader(string(body)))
		f.sb.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	f.url = srv.URL
	return f
}

func (f *fixture) requests(endpoint string) []seenRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []seenRequest
	for _, r := range f.seen {
		if r.endpoint == endpoint {
			out = append(out, r)
		}
	}
	return out
}

// reserve counts ReserveQuota calls and refuses when err is set.
type reserve struct {
	n   atomic.Int32
	err error
}

func (r *reserve) fn(context.Context) error {
	r.n.Add(1)
	return r.err
}

func newClient(t *testing.T, opts upstream.Options) *upstream.Client {
	t.Helper()
	opts.Broker = "ChatApp"
	c, err := upstream.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func login(refreshToken string) map[string]string {
	return map[string]string{
		"email": sandbox.ChatAppEmail, "password": sandbox.ChatAppPassword,
		"app_id": sandbox.ChatAppAppID, "refresh_token": refreshToken,
	}
}

func request(t *testing.T, url string, secrets map[string]string, r *reserve) provider.Request {
	t.Helper()
	req := provider.Request{BaseURL: url, Client: newClient(t, upstream.Options{}), Secrets: secrets, Environment: "production"}
	if r != nil {
		req.ReserveQuota = r.fn
	}
	return req
}

// issueMade makes a first pair through the provider, for tests that need a
// live refresh token.
func issueMade(t *testing.T, f *fixture) *provider.Token {
	t.Helper()
	tok, err := New().Issue(context.Background(), request(t, f.url, login(""), &reserve{}))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func noLeak(t *testing.T, err error, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if s != "" && strings.Contains(err.Error(), s) {
			t.Fatalf("error leaks a secret: %v", err)
		}
	}
}

func TestSpec(t *testing.T) {
	sp := New().Spec()
	if sp.Name != Name || sp.Display != "ChatApp" || sp.Issuance != provider.Minted || sp.Environments["production"] != "https://api.chatapp.online" {
		t.Fatalf("spec = %+v", sp)
	}
	want := map[string]bool{"email": true, "password": true, "app_id": true, "refresh_token": false}
	if len(sp.Fields) != len(want) {
		t.Fatalf("fields = %+v", sp.Fields)
	}
	for _, fl := range sp.Fields {
		req, ok := want[fl.Name]
		if !ok || fl.Required != req || !fl.Secret {
			t.Errorf("field %+v", fl)
		}
	}
}

func TestMakeOnFirstIssue(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	r := &reserve{}
	tok, err := New().Issue(context.Background(), request(t, f.url, login(""), r))
	if err != nil {
		t.Fatal(err)
	}
	if r.n.Load() != 1 || f.sb.Calls(sandbox.ChatAppMakeEP) != 1 || f.sb.Calls(sandbox.ChatAppRefreshEP) != 0 || f.sb.ChatAppMakes() != 1 {
		t.Fatalf("reserve=%d make=%d refresh=%d", r.n.Load(), f.sb.Calls(sandbox.ChatAppMakeEP), f.sb.Calls(sandbox.ChatAppRefreshEP))
	}
	if !f.sb.ChatAppAccessValid(tok.AccessToken) || !f.sb.ChatAppRefreshValid(tok.Rotated["refresh_token"]) {
		t.Fatal("issued pair is not valid at the sandbox")
	}
	if tok.Details["made"] != true || tok.Details["cabinet_user_id"] != int64(sandbox.ChatAppCabinetUserID) {
		t.Fatalf("details = %v", tok.Details)
	}
	if tok.AccountIDs == nil || len(tok.AccountIDs) != 0 || tok.ReadOnly {
		t.Fatalf("accounts=%v readonly=%v", tok.AccountIDs, tok.ReadOnly)
	}
	// What went on the wire: the login as JSON with exactly these keys.
	sent := f.requests(sandbox.ChatAppMakeEP)
	var body map[string]any
	if len(sent) != 1 || json.Unmarshal(sent[0].body, &body) != nil {
		t.Fatalf("make requests %v", sent)
	}
	if len(body) != 3 || body["email"] != sandbox.ChatAppEmail || body["password"] != sandbox.ChatAppPassword || body["appId"] != sandbox.ChatAppAppID {
		t.Fatalf("make body %v", body)
	}
}

func TestRefreshWhenSeeded(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	first := issueMade(t, f)
	old := first.Rotated["refresh_token"]
	r := &reserve{}
	tok, err := New().Issue(context.Background(), request(t, f.url, login(old), r))
	if err != nil {
		t.Fatal(err)
	}
	if r.n.Load() != 0 || f.sb.Calls(sandbox.ChatAppMakeEP) != 1 || f.sb.Calls(sandbox.ChatAppRefreshEP) != 1 {
		t.Fatalf("reserve=%d make=%d refresh=%d", r.n.Load(), f.sb.Calls(sandbox.ChatAppMakeEP), f.sb.Calls(sandbox.ChatAppRefreshEP))
	}
	rotated := tok.Rotated["refresh_token"]
	if rotated == "" || rotated == old || f.sb.ChatAppRefreshValid(old) || !f.sb.ChatAppRefreshValid(rotated) {
		t.Fatalf("rotation: old valid=%v new valid=%v", f.sb.ChatAppRefreshValid(old), f.sb.ChatAppRefreshValid(rotated))
	}
	if tok.AccessToken == first.AccessToken || !f.sb.ChatAppAccessValid(tok.AccessToken) || tok.Details["made"] != false {
		t.Fatalf("token %+v", tok)
	}
	// Refresh sends the token in the Refresh header, an empty body and no
	// Authorization.
	sent := f.requests(sandbox.ChatAppRefreshEP)
	if len(sent) != 1 || sent[0].header.Get("Refresh") != old || len(sent[0].body) != 0 || sent[0].header.Get("Authorization") != "" {
		t.Fatalf("refresh request %+v", sent)
	}
	// The old refresh token is dead: using it again falls back to make.
	r2 := &reserve{}
	again, err := New().Issue(context.Background(), request(t, f.url, login(old), r2))
	if err != nil || again.Details["made"] != true || r2.n.Load() != 1 {
		t.Fatalf("reuse of the old refresh token: %v, reserve=%d", err, r2.n.Load())
	}
}

func TestRefusedRefreshFallsBackToMake(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	f := newFixture(t, sandbox.Options{Now: clock.now})
	cases := []struct {
		name string
		rt   func() string
	}{
		{"unknown", func() string { return "never-issued-refresh-token" }},
		{"revoked", func() string {
			rt := issueMade(t, f).Rotated["refresh_token"]
			f.sb.RevokeChatAppRefresh(rt)
			return rt
		}},
		{"expired", func() string {
			f.sb.SetChatAppLifetimes(time.Hour, 2*time.Hour)
			defer f.sb.SetChatAppLifetimes(24*time.Hour, 14*24*time.Hour)
			rt := issueMade(t, f).Rotated["refresh_token"]
			clock.advance(3 * time.Hour)
			return rt
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rt := tc.rt()
			makes, refreshes := f.sb.Calls(sandbox.ChatAppMakeEP), f.sb.Calls(sandbox.ChatAppRefreshEP)
			r := &reserve{}
			tok, err := New().Issue(context.Background(), request(t, f.url, login(rt), r))
			if err != nil {
				t.Fatal(err)
			}
			if r.n.Load() != 1 || f.sb.Calls(sandbox.ChatAppMakeEP) != makes+1 || f.sb.Calls(sandbox.ChatAppRefreshEP) != refreshes+1 {
				t.Fatalf("reserve=%d make=%d refresh=%d", r.n.Load(), f.sb.Calls(sandbox.ChatAppMakeEP)-makes, f.sb.Calls(sandbox.ChatAppRefreshEP)-refreshes)
			}
			if tok.Details["made"] != true || !f.sb.ChatAppRefreshValid(tok.Rotated["refresh_token"]) {
				t.Fatalf("token %+v", tok)
			}
		})
	}
}

func TestRefusedRefreshWithoutMake(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	cases := []struct {
		name    string
		r       *reserve
		secrets map[string]string
		is      error
	}{
		{"reserve nil", nil, login("never-issued-refresh-token"), ErrMakeNotAllowed},
		{"reserve nil, no refresh token", nil, login(""), ErrMakeNotAllowed},
		{"reserve refuses", &reserve{err: errors.New("budget of makes spent")}, login("never-issued-refresh-token"), nil},
		{"reserve refuses, no refresh token", &reserve{err: errors.New("budget of makes spent")}, login(""), nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			makes := f.sb.Calls(sandbox.ChatAppMakeEP)
			_, err := New().Issue(context.Background(), request(t, f.url, tc.secrets, tc.r))
			if err == nil {
				t.Fatal("issued without make")
			}
			want := tc.is
			if tc.r != nil {
				want = tc.r.err
				if tc.r.n.Load() != 1 {
					t.Fatalf("reserve called %d times", tc.r.n.Load())
				}
			}
			if !errors.Is(err, want) {
				t.Fatalf("err = %v, want %v in the chain", err, want)
			}
			if f.sb.Calls(sandbox.ChatAppMakeEP) != makes {
				t.Fatal("make reached the sandbox")
			}
			if tc.secrets["refresh_token"] != "" && !strings.Contains(err.Error(), "ApiInvalidTokenError") {
				t.Fatalf("error hides why make was needed: %v", err)
			}
			noLeak(t, err, tc.secrets["password"], tc.secrets["refresh_token"], tc.secrets["email"])
		})
	}
}

func TestTransientRefreshDoesNotMake(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	rt := issueMade(t, f).Rotated["refresh_token"]
	cases := []struct {
		name    string
		status  int
		latency time.Duration
		kind    upstream.Failure
	}{
		{"503", http.StatusServiceUnavailable, 0, upstream.Unavailable},
		{"500", http.StatusInternalServerError, 0, upstream.Unavailable},
		{"429", http.StatusTooManyRequests, 0, upstream.RateLimited},
		{"timeout", 0, 500 * time.Millisecond, upstream.Unavailable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f.sb.InjectFault(sandbox.ChatAppRefreshEP, tc.status, 1)
			f.sb.SetLatency(tc.latency)
			defer f.sb.SetLatency(0)
			defer f.sb.InjectFault(sandbox.ChatAppRefreshEP, 0, 0)
			makes, refreshes := f.sb.Calls(sandbox.ChatAppMakeEP), f.sb.Calls(sandbox.ChatAppRefreshEP)
			r := &reserve{}
			req := request(t, f.url, login(rt), r)
			req.Client = newClient(t, upstream.Options{Timeout: 100 * time.Millisecond})
			_, err := New().Issue(context.Background(), req)
			ue, ok := upstream.AsError(err)
			if !ok || ue.Failure != tc.kind || ue.Op != "POST /v1/tokens/refresh" {
				t.Fatalf("err = %v", err)
			}
			if r.n.Load() != 0 || f.sb.Calls(sandbox.ChatAppMakeEP) != makes {
				t.Fatal("a transient refresh failure fell back to make")
			}
			// Never retried: the refresh rotates the pair.
			if n := f.sb.Calls(sandbox.ChatAppRefreshEP) - refreshes; n != 1 {
				t.Fatalf("refresh called %d times", n)
			}
			noLeak(t, err, rt, sandbox.ChatAppPassword)
		})
	}
	// The fault ran before the handler: the refresh token still works.
	if !f.sb.ChatAppRefreshValid(rt) {
		t.Fatal("refresh token died on injected faults")
	}
}

func TestMakeErrors(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	wrong := login("")
	wrong["password"] = "wrong-password-value"
	cases := []struct {
		name    string
		secrets map[string]string
		quota   int
		kind    upstream.Failure
		want    []string
	}{
		{"wrong password", wrong, -1, upstream.Unauthorized, []string{"ChatApp POST /v1/tokens", "HTTP 401", "the email, password or appId is wrong: check them in the ChatApp cabinet"}},
		{"quota spent", login(""), 0, upstream.RateLimited, []string{"HTTP 429", "tokens.make is limited to 100 a day per email and appId"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f.sb.SetChatAppMakeQuota(tc.quota)
			defer f.sb.SetChatAppMakeQuota(100)
			r := &reserve{}
			tok, err := New().Issue(context.Background(), request(t, f.url, tc.secrets, r))
			ue, ok := upstream.AsError(err)
			if tok != nil || !ok || ue.Failure != tc.kind {
				t.Fatalf("err = %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if r.n.Load() != 1 {
				t.Fatalf("reserve called %d times", r.n.Load())
			}
			noLeak(t, err, tc.secrets["password"], tc.secrets["email"])
		})
	}
	// The quota counts: after 3 makes with a quota of 3 the fourth is refused.
	f2 := newFixture(t, sandbox.Options{})
	f2.sb.SetChatAppMakeQuota(3)
	for i := range 4 {
		_, err := New().Issue(context.Background(), request(t, f2.url, login(""), &reserve{}))
		if (err == nil) != (i < 3) {
			t.Fatalf("make %d: %v", i+1, err)
		}
	}
	if f2.sb.ChatAppMakes() != 3 {
		t.Fatalf("makes = %d", f2.sb.ChatAppMakes())
	}
}

func TestMakeAfterRefusalKeepsBothErrors(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	f.sb.SetChatAppMakeQuota(0)
	secrets := login("never-issued-refresh-token")
	_, err := New().Issue(context.Background(), request(t, f.url, secrets, &reserve{}))
	ue, ok := upstream.AsError(err)
	if !ok || ue.Op != "POST /v1/tokens" || ue.Failure != upstream.RateLimited {
		t.Fatalf("the make error must come first: %v", err)
	}
	if !strings.Contains(err.Error(), "POST /v1/tokens/refresh") {
		t.Fatalf("the refresh refusal is lost: %v", err)
	}
	noLeak(t, err, secrets["password"], secrets["refresh_token"], secrets["email"])
}

// TestRefreshAnswers drives the refusal rules with answers the sandbox does
// not give: which refresh failures count as "refused" is UNCONFIRMED, so the
// provider is lenient about codes but never about transient statuses.
func TestRefreshAnswers(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	cases := []struct {
		name     string
		status   int
		code     string
		fallback bool
	}{
		{"401 invalid token", 401, "ApiInvalidTokenError", true},
		{"403 other code", 403, "ApiForbiddenError", true},
		{"400 invalid token", 400, "ApiInvalidTokenError", true},
		{"400 refresh-specific code", 400, "ApiRefreshTokenExpiredError", true},
		{"200 success false invalid token", 200, "ApiInvalidTokenError", true},
		{"500 invalid token", 500, "ApiInvalidTokenError", false},
		{"429", 429, "ApiTooManyRequestsError", false},
		{"400 validation", 400, "ApiValidationError", false},
		{"200 success false other", 200, "ApiSomethingError", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/v1/tokens/refresh" {
					w.WriteHeader(tc.status)
					json.NewEncoder(w).Encode(map[string]any{"success": false, "error": map[string]string{
						"code": tc.code, "message": "refused " + r.Header.Get("Refresh")}})
					return
				}
				sb.ServeHTTP(w, r)
			}))
			defer srv.Close()
			r := &reserve{}
			secrets := login("some-refresh-token-value")
			tok, err := New().Issue(context.Background(), request(t, srv.URL, secrets, r))
			if tc.fallback {
				if err != nil || tok.Details["made"] != true || r.n.Load() != 1 {
					t.Fatalf("want fallback to make: err=%v reserve=%d", err, r.n.Load())
				}
				return
			}
			if err == nil || r.n.Load() != 0 {
				t.Fatalf("want no make: err=%v reserve=%d", err, r.n.Load())
			}
			ue, ok := upstream.AsError(err)
			if !ok || ue.Code != tc.code {
				t.Fatalf("err = %v", err)
			}
			noLeak(t, err, secrets["refresh_token"])
		})
	}
}

func TestBadResponses(t *testing.T) {
	valid := func(mut func(d map[string]any)) string {
		d := map[string]any{"cabinetUserId": 1, "accessToken": "at-123456", "accessTokenEndTime": time.Now().Add(time.Hour).Unix(),
			"refreshToken": "rt-123456", "refreshTokenEndTime": time.Now().Add(48 * time.Hour).Unix()}
		mut(d)
		b, _ := json.Marshal(map[string]any{"success": true, "data": d})
		return string(b)
	}
	cases := []struct {
		name string
		body string
		want string
	}{
		{"not JSON", "<html>gateway</html>", "not the expected JSON"},
		{"truncated", valid(func(map[string]any) {})[:60], "not the expected JSON"},
		{"empty", "", "not the expected JSON"},
		{"array", "[]", "not the expected JSON"},
		{"success false, no error", `{"success": false}`, "success is false"},
		{"no data", `{"success": true}`, "no readable data"},
		{"data null", `{"success": true, "data": null}`, "no readable data"},
		{"data a string", `{"success": true, "data": "x"}`, "no readable data"},
		{"no accessToken", valid(func(d map[string]any) { delete(d, "accessToken") }), "accessToken"},
		{"no refreshToken", valid(func(d map[string]any) { delete(d, "refreshToken") }), "refreshToken"},
		{"no accessTokenEndTime", valid(func(d map[string]any) { delete(d, "accessTokenEndTime") }), "accessTokenEndTime"},
		{"no refreshTokenEndTime", valid(func(d map[string]any) { d["refreshTokenEndTime"] = 0 }), "refreshTokenEndTime"},
		{"end time not a number", valid(func(d map[string]any) { d["accessTokenEndTime"] = "soon" }), "accessTokenEndTime is not a number"},
		{"end time NaN", valid(func(d map[string]any) { d["accessTokenEndTime"] = "NaN" }), "accessTokenEndTime is not a number"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, tc.body)
			}))
			defer srv.Close()
			for _, rt := range []string{"", "seeded-refresh-token"} {
				tok, err := New().Issue(context.Background(), request(t, srv.URL, login(rt), &reserve{}))
				ue, ok := upstream.AsError(err)
				if tok != nil || !ok || ue.Failure != upstream.BadResponse || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("refresh token %q: err = %v", rt, err)
				}
				// A successful body carries fresh tokens: never quoted.
				noLeak(t, err, "at-123456", "rt-123456")
			}
		})
	}
}

func TestEndTimesReadFromAnswer(t *testing.T) {
	start := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	f := newFixture(t, sandbox.Options{Now: func() time.Time { return start }})
	f.sb.SetChatAppLifetimes(90*time.Minute, 50*time.Hour)
	tok := issueMade(t, f)
	if !tok.ExpiresAt.Equal(start.Add(90*time.Minute)) || !tok.SecretExpiresAt.Equal(start.Add(50*time.Hour)) {
		t.Fatalf("expires %v, secret expires %v", tok.ExpiresAt, tok.SecretExpiresAt)
	}
	if time.Since(tok.IssuedAt) > time.Minute || time.Since(tok.IssuedAt) < 0 {
		t.Fatalf("issued at %v, want the receipt time", tok.IssuedAt)
	}
	// End times sent as numeric strings are read too.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"success":true,"data":{"cabinetUserId":7,"accessToken":"a","accessTokenEndTime":"1900000000","refreshToken":"r","refreshTokenEndTime":1900086400}}`)
	}))
	defer srv.Close()
	tok, err := New().Issue(context.Background(), request(t, srv.URL, login("x"), nil))
	if err != nil || tok.ExpiresAt.Unix() != 1900000000 || tok.SecretExpiresAt.Unix() != 1900086400 || tok.Details["cabinet_user_id"] != int64(7) {
		t.Fatalf("tok=%+v err=%v", tok, err)
	}
}

func TestCheck(t *testing.T) {
	clock := &fakeClock{t: time.Now()}
	f := newFixture(t, sandbox.Options{Now: clock.now})
	tok := issueMade(t, f)
	c := newClient(t, upstream.Options{})
	if err := Check(context.Background(), c, f.url, tok.AccessToken); err != nil {
		t.Fatal(err)
	}
	sent := f.requests(sandbox.ChatAppCheckEP)
	if len(sent) != 1 || sent[0].header.Get("Authorization") != tok.AccessToken {
		t.Fatalf("check sent %+v, want the bare token in Authorization", sent)
	}
	bad := []struct {
		name  string
		token string
		wait  time.Duration
	}{
		{"unknown", "not-a-chatapp-token", 0},
		{"expired", tok.AccessToken, 25 * time.Hour},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			clock.advance(tc.wait)
			err := Check(context.Background(), c, f.url, tc.token)
			ue, ok := upstream.AsError(err)
			if !ok || ue.Failure != upstream.Unauthorized || ue.Code != "ApiInvalidTokenError" || ue.Status != 401 || ue.Op != "GET /v1/tokens/check" {
				t.Fatalf("err = %v", err)
			}
			noLeak(t, err, tc.token)
		})
	}
	// Check is idempotent: a transient 503 is retried.
	f.sb.InjectFault(sandbox.ChatAppCheckEP, 503, 1)
	fresh := issueMade(t, f)
	before := f.sb.Calls(sandbox.ChatAppCheckEP)
	if err := Check(context.Background(), c, f.url, fresh.AccessToken); err != nil {
		t.Fatal(err)
	}
	if n := f.sb.Calls(sandbox.ChatAppCheckEP) - before; n != 2 {
		t.Fatalf("check called %d times, want a retry", n)
	}
}

func TestScrubsEchoedSecrets(t *testing.T) {
	secrets := login("echoed-refresh-token")
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(map[string]any{"success": false, "error": map[string]string{
			"code": "ApiValidationError", "message": "bad request " + r.Header.Get("Refresh") + " " + string(body)}})
	}))
	defer srv.Close()
	for _, rt := range []string{"", secrets["refresh_token"]} {
		s := login(rt)
		_, err := New().Issue(context.Background(), request(t, srv.URL, s, &reserve{}))
		if err == nil || !strings.Contains(err.Error(), "[redacted]") {
			t.Fatalf("err = %v", err)
		}
		noLeak(t, err, s["password"], s["email"], s["refresh_token"], s["app_id"])
	}
}

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// TestGuardsCannotBeProven: ChatApp tells nothing of accounts or trading
// rights, so the provider claims neither (no account, never read-only) and
// its Spec says so, which makes a config refuse require_readonly and
// allowed_accounts rather than pass them on no evidence.
func TestGuardsCannotBeProven(t *testing.T) {
	if !New().Spec().ReportsNoAccess {
		t.Fatal("Spec does not say ChatApp reports no access: the guards would pass on no evidence")
	}
	f := newFixture(t, sandbox.Options{})
	made := issueMade(t, f)
	cases := []struct {
		name    string
		secrets map[string]string
	}{
		{"make", login("")},
		{"refresh", login(made.Rotated["refresh_token"])},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := New().Issue(context.Background(), request(t, f.url, tc.secrets, &reserve{}))
			if err != nil {
				t.Fatal(err)
			}
			if tok.ReadOnly || tok.AccountIDs == nil || len(tok.AccountIDs) != 0 {
				t.Fatalf("token claims readonly=%v accounts=%v", tok.ReadOnly, tok.AccountIDs)
			}
		})
	}
}

// TestRealShapedTokens: ChatApp's tokens ("$2y$10$...", with "$" and "/")
// travel as opaque header values, and one quoted back in a refusal is
// scrubbed from the error.
func TestRealShapedTokens(t *testing.T) {
	f := newFixture(t, sandbox.Options{})
	made := issueMade(t, f)
	rt := made.Rotated["refresh_token"]
	if !strings.HasPrefix(rt, "$2y$10$") || !strings.HasPrefix(made.AccessToken, "$2y$10$") {
		t.Fatalf("the sandbox hands out tokens not shaped like ChatApp's: %q", rt)
	}
	tok, err := New().Issue(context.Background(), request(t, f.url, login(rt), nil))
	if err != nil {
		t.Fatal(err)
	}
	if sent := f.requests(sandbox.ChatAppRefreshEP); len(sent) != 1 || sent[0].header.Get("Refresh") != rt {
		t.Fatalf("Refresh header %+v, want the token unchanged", sent)
	}
	if err := Check(context.Background(), newClient(t, upstream.Options{}), f.url, tok.AccessToken); err != nil {
		t.Fatal(err)
	}
	// The refresh token just used is dead; the sandbox quotes it back in
	// its refusal, and make is not allowed here.
	_, err = New().Issue(context.Background(), request(t, f.url, login(rt), nil))
	if !errors.Is(err, ErrMakeNotAllowed) || !strings.Contains(err.Error(), "[redacted]") {
		t.Fatalf("err = %v", err)
	}
	noLeak(t, err, rt)
}

// TestAccessTokenAtRefresh: whether ChatApp kills the old access token at a
// refresh is UNCONFIRMED. Under either variant the provider hands out the
// new pair; under the strict one the old access token is refused by
// tokens.check with the hint to refresh, which is why the plugin refreshes
// only when the access token is near its end (leases holding it are cut
// short by a refresh).
func TestAccessTokenAtRefresh(t *testing.T) {
	for _, tc := range []struct {
		name    string
		strict  bool
		oldDies bool
	}{
		{"old access token lives on", false, false},
		{"strict: old access token dies", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, sandbox.Options{})
			f.sb.SetChatAppAccessDiesAtRefresh(tc.strict)
			first := issueMade(t, f)
			next, err := New().Issue(context.Background(), request(t, f.url, login(first.Rotated["refresh_token"]), nil))
			if err != nil {
				t.Fatal(err)
			}
			c := newClient(t, upstream.Options{})
			if err := Check(context.Background(), c, f.url, next.AccessToken); err != nil {
				t.Fatalf("new access token refused: %v", err)
			}
			err = Check(context.Background(), c, f.url, first.AccessToken)
			if !tc.oldDies {
				if err != nil {
					t.Fatalf("old access token refused: %v", err)
				}
				return
			}
			ue, ok := upstream.AsError(err)
			if !ok || ue.Failure != upstream.Unauthorized || ue.Hint != hintAccess {
				t.Fatalf("old access token: %v", err)
			}
			noLeak(t, err, first.AccessToken)
		})
	}
}

// TestBareAuthStatusIsNotRefusal: a 401 or 403 without ChatApp's own error
// envelope ({"success": false, "error": {...}}) is a proxy, a WAF or a
// gateway answering in ChatApp's place, not ChatApp refusing anything. It
// must not be taken as a refusal of the refresh token (which would drop a
// token that still works and spend a tokens.make), nor of the login: it is
// Unavailable, to be retried, and says the answer was not ChatApp's.
func TestBareAuthStatusIsNotRefusal(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	cases := []struct {
		name        string
		status      int
		contentType string
		body        string
	}{
		{"401 empty", 401, "", ""},
		{"403 empty", 403, "", ""},
		{"403 WAF html", 403, "text/html", "<html><head><title>403 Forbidden</title></head><body>Request blocked</body></html>"},
		{"401 proxy auth html", 401, "text/html; charset=utf-8", "<html><body>Authorization Required</body></html>"},
		{"403 plain text", 403, "text/plain", "Forbidden"},
		{"401 JSON of another shape", 401, "application/json", `{"error":"unauthorized","message":"Unauthorized"}`},
		{"403 JSON error string", 403, "application/json", `{"success":false,"error":"Forbidden"}`},
		{"401 success false without error", 401, "application/json", `{"success":false}`},
		{"403 error without success", 403, "application/json", `{"error":{"code":"ApiInvalidTokenError","message":"Invalid Token"}}`},
	}
	for _, tc := range cases {
		for _, op := range []string{opRefresh, opMake, opCheck} {
			t.Run(tc.name+" "+op, func(t *testing.T) {
				srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.Method+" "+r.URL.Path == op {
						if tc.contentType != "" {
							w.Header().Set("Content-Type", tc.contentType)
						}
						w.WriteHeader(tc.status)
						io.WriteString(w, tc.body)
						return
					}
					sb.ServeHTTP(w, r)
				}))
				defer srv.Close()
				r := &reserve{}
				secrets := login("still-good-refresh-token")
				if op == opMake {
					secrets = login("")
				}
				var err error
				if op == opCheck {
					err = Check(context.Background(), newClient(t, upstream.Options{}), srv.URL, "still-good-access-token")
				} else {
					var tok *provider.Token
					tok, err = New().Issue(context.Background(), request(t, srv.URL, secrets, r))
					if tok != nil {
						t.Fatalf("issued %+v", tok)
					}
				}
				ue, ok := upstream.AsError(err)
				if !ok || ue.Failure != upstream.Unavailable || !ue.Retryable() || ue.Op != op || ue.Status != tc.status {
					t.Fatalf("want a retryable Unavailable of %s: err = %v", op, err)
				}
				if op == opRefresh && (r.n.Load() != 0 || sb.Calls(sandbox.ChatAppMakeEP) != 0) {
					t.Fatalf("a bare %d spent a make (reserve=%d)", tc.status, r.n.Load())
				}
				msg := err.Error()
				for _, w := range []string{"ChatApp " + op, "HTTP " + strconv.Itoa(tc.status), "not ChatApp's"} {
					if !strings.Contains(msg, w) {
						t.Errorf("error %q lacks %q", msg, w)
					}
				}
				for _, w := range []string{hintRefresh, hintCredentials, hintAccess} {
					if strings.Contains(msg, w) {
						t.Errorf("error %q gives the hint of a refusal", msg)
					}
				}
				noLeak(t, err, secrets["refresh_token"], secrets["password"], secrets["email"], "still-good-access-token")
			})
		}
	}
	// ChatApp's own refusal, in its envelope, is still a refusal.
	for _, status := range []int{401, 403} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == pathRefresh {
				w.WriteHeader(status)
				io.WriteString(w, `{"success":false,"error":{"code":"ApiInvalidTokenError","message":"Invalid Token"}}`)
				return
			}
			sb.ServeHTTP(w, r)
		}))
		r := &reserve{}
		tok, err := New().Issue(context.Background(), request(t, srv.URL, login("dead-refresh-token"), r))
		srv.Close()
		if err != nil || tok.Details["made"] != true || r.n.Load() != 1 {
			t.Fatalf("HTTP %d in ChatApp's envelope: want the fallback to make: err=%v reserve=%d", status, err, r.n.Load())
		}
	}
}

// pairAnswer is a make/refresh answer: a valid pair, changed by mut.
func pairAnswer(mut func(d map[string]any)) string {
	d := map[string]any{"cabinetUserId": 4242, "accessToken": answerAccess, "accessTokenEndTime": answerAccessEnd,
		"refreshToken": answerRefresh, "refreshTokenEndTime": answerRefreshEnd}
	if mut != nil {
		mut(d)
	}
	b, _ := json.Marshal(map[string]any{"success": true, "data": d})
	return string(b)
}

const (
	answerAccess     = "$2y$10$newAccessTokenFromTheAnswer0123456789abcdefghijklmn"
	answerRefresh    = "$2y$10$newRefreshTokenFromTheAnswer0123456789abcdefghijkl"
	answerAccessEnd  = 1900000000
	answerRefreshEnd = 1901123200
)

// answering serves refreshBody at tokens.refresh and makeBody at
// tokens.make, each with 200 unless it is a ChatApp error.
func answering(t *testing.T, refreshBody, makeBody string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := makeBody
		if r.URL.Path == pathRefresh {
			body = refreshBody
		}
		if strings.Contains(body, `"success":false`) {
			w.WriteHeader(http.StatusUnauthorized)
		}
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

const refusedRefresh = `{"success":false,"error":{"code":"ApiInvalidTokenError","message":"Invalid Token"}}`

// TestRotationKeptOnBadAnswer: an answer that carries the new refresh token
// has rotated the pair at ChatApp, whatever else is wrong with it (a field
// missing, a cabinetUserId that is not a number): refusing it whole drops
// the only refresh token that still works, and every retry then spends a
// make. The provider returns a *provider.RotatedError with the new refresh
// token (and its end time when readable) for the backend to store, and a
// BadResponse naming the field, without a token in it. This holds for a
// refresh, a make, and a make after a refused refresh; the refresh path
// never goes on to a make.
func TestRotationKeptOnBadAnswer(t *testing.T) {
	refreshEnd := time.Unix(answerRefreshEnd, 0).UTC()
	cases := []struct {
		name       string
		body       string
		field      string
		secretEnds time.Time
	}{
		{"no refreshTokenEndTime", pairAnswer(func(d map[string]any) { delete(d, "refreshTokenEndTime") }), "refreshTokenEndTime", time.Time{}},
		{"refreshTokenEndTime null", pairAnswer(func(d map[string]any) { d["refreshTokenEndTime"] = nil }), "refreshTokenEndTime", time.Time{}},
		{"refreshTokenEndTime zero", pairAnswer(func(d map[string]any) { d["refreshTokenEndTime"] = 0 }), "refreshTokenEndTime", time.Time{}},
		{"refreshTokenEndTime not a number", pairAnswer(func(d map[string]any) { d["refreshTokenEndTime"] = "in two weeks" }), "refreshTokenEndTime", time.Time{}},
		{"no accessTokenEndTime", pairAnswer(func(d map[string]any) { delete(d, "accessTokenEndTime") }), "accessTokenEndTime", refreshEnd},
		{"accessTokenEndTime not a number", pairAnswer(func(d map[string]any) { d["accessTokenEndTime"] = "soon" }), "accessTokenEndTime", refreshEnd},
		{"accessTokenEndTime NaN", pairAnswer(func(d map[string]any) { d["accessTokenEndTime"] = "NaN" }), "accessTokenEndTime", refreshEnd},
		{"accessTokenEndTime an object", pairAnswer(func(d map[string]any) { d["accessTokenEndTime"] = map[string]any{"sec": 1} }), "accessTokenEndTime", refreshEnd},
		{"cabinetUserId not numeric", pairAnswer(func(d map[string]any) { d["cabinetUserId"] = "user-4242" }), "cabinetUserId", refreshEnd},
		{"cabinetUserId a list", pairAnswer(func(d map[string]any) { d["cabinetUserId"] = []int{4242} }), "cabinetUserId", refreshEnd},
		{"no accessToken", pairAnswer(func(d map[string]any) { delete(d, "accessToken") }), "accessToken", refreshEnd},
		{"accessToken a number", pairAnswer(func(d map[string]any) { d["accessToken"] = 12345678 }), "accessToken", refreshEnd},
		{"accessToken with a newline", pairAnswer(func(d map[string]any) { d["accessToken"] = "$2y$10$abc\ndef" }), "accessToken", refreshEnd},
		{"everything else wrong", pairAnswer(func(d map[string]any) {
			d["cabinetUserId"], d["accessToken"], d["accessTokenEndTime"], d["refreshTokenEndTime"] = true, nil, "x", []any{}
		}), "accessTokenEndTime", time.Time{}},
		{"success not a boolean", strings.Replace(pairAnswer(nil), `"success":true`, `"success":"true"`, 1), "success", refreshEnd},
	}
	paths := []struct {
		name             string
		seed             string
		refresh, make    func(body string) string
		wantMake, wantBy string
	}{
		{"refresh", "stored-refresh-token-0001", func(b string) string { return b }, func(string) string { return pairAnswer(nil) }, "", ""},
		{"make", "", func(string) string { return refusedRefresh }, func(b string) string { return b }, "make", ""},
		{"make after a refused refresh", "dead-refresh-token-0001", func(string) string { return refusedRefresh }, func(b string) string { return b }, "make", "tokens.make was needed because"},
	}
	for _, tc := range cases {
		for _, p := range paths {
			t.Run(tc.name+"/"+p.name, func(t *testing.T) {
				r := &reserve{}
				url := answering(t, p.refresh(tc.body), p.make(tc.body))
				secrets := login(p.seed)
				tok, err := New().Issue(context.Background(), request(t, url, secrets, r))
				if tok != nil {
					t.Fatalf("issued %+v from a bad answer", tok)
				}
				var re *provider.RotatedError
				if !errors.As(err, &re) {
					t.Fatalf("the new refresh token is lost: %T %v", err, err)
				}
				if err != error(re) {
					t.Fatalf("the RotatedError is wrapped: %v", err)
				}
				if len(re.Rotated) != 1 || re.Rotated["refresh_token"] != answerRefresh {
					t.Fatalf("rotated %v", re.Rotated)
				}
				if !re.SecretExpiresAt.Equal(tc.secretEnds) {
					t.Fatalf("secret expires %v, want %v", re.SecretExpiresAt, tc.secretEnds)
				}
				ue, ok := upstream.AsError(re.Err)
				if !ok || ue.Failure != upstream.BadResponse || ue.Broker != "ChatApp" {
					t.Fatalf("err = %v", re.Err)
				}
				wantOp := opRefresh
				if p.wantMake != "" {
					wantOp = opMake
				}
				if ue.Op != wantOp || !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), p.wantBy) {
					t.Fatalf("err = %v, want %s naming %s", err, wantOp, tc.field)
				}
				if want := int32(0); p.wantMake != "" {
					want = 1
					if r.n.Load() != want {
						t.Fatalf("reserve=%d", r.n.Load())
					}
				} else if r.n.Load() != want {
					t.Fatalf("a rotated refresh went on to spend a make (reserve=%d)", r.n.Load())
				}
				noLeak(t, err, answerRefresh, answerAccess, "$2y$10$new", secrets["refresh_token"], secrets["password"], secrets["email"])
			})
		}
	}
}

// TestBadAnswerWithoutRefreshToken: an answer with no usable refresh token
// in it rotated nothing the provider can keep; it is a plain BadResponse
// naming the field, and no RotatedError.
func TestBadAnswerWithoutRefreshToken(t *testing.T) {
	cases := []struct {
		name, body, field string
	}{
		{"no refreshToken", pairAnswer(func(d map[string]any) { delete(d, "refreshToken") }), "refreshToken"},
		{"refreshToken empty", pairAnswer(func(d map[string]any) { d["refreshToken"] = "" }), "refreshToken"},
		{"refreshToken a number", pairAnswer(func(d map[string]any) { d["refreshToken"] = 1234567890 }), "refreshToken"},
		{"refreshToken with a newline", pairAnswer(func(d map[string]any) { d["refreshToken"] = "$2y$10$abc\r\nX-Evil: 1" }), "refreshToken"},
		{"refreshToken too long", pairAnswer(func(d map[string]any) { d["refreshToken"] = strings.Repeat("r", 5000) }), "refreshToken"},
	}
	for _, tc := range cases {
		for _, seed := range []string{"", "stored-refresh-token-0001"} {
			t.Run(tc.name+"/seed "+strconv.Quote(seed), func(t *testing.T) {
				url := answering(t, tc.body, tc.body)
				tok, err := New().Issue(context.Background(), request(t, url, login(seed), &reserve{}))
				var re *provider.RotatedError
				if tok != nil || errors.As(err, &re) {
					t.Fatalf("tok=%v rotated=%v", tok, re)
				}
				ue, ok := upstream.AsError(err)
				if !ok || ue.Failure != upstream.BadResponse || !strings.Contains(ue.Message, tc.field) {
					t.Fatalf("err = %v", err)
				}
				noLeak(t, err, answerAccess, seed)
			})
		}
	}
}

// TestEndTimesBounded: an end time past year 9999 (milliseconds, or worse,
// where unix seconds are documented) gives a record that cannot be encoded,
// so the rotation would never be stored. It is refused like a JWT date out
// of bounds, naming the field and saying seconds are expected; and the new
// refresh token is still handed back, with the refresh token's end time
// only when that one was readable.
func TestEndTimesBounded(t *testing.T) {
	refreshEnd := time.Unix(answerRefreshEnd, 0).UTC()
	cases := []struct {
		name       string
		field      string
		value      any
		secretEnds time.Time
	}{
		{"access ms", "accessTokenEndTime", int64(answerAccessEnd) * 1000, refreshEnd},
		{"access ms as a string", "accessTokenEndTime", strconv.FormatInt(int64(answerAccessEnd)*1000, 10), refreshEnd},
		{"access ms as a float", "accessTokenEndTime", 1.7e12, refreshEnd},
		{"access µs", "accessTokenEndTime", int64(answerAccessEnd) * 1000000, refreshEnd},
		{"access at the bound", "accessTokenEndTime", int64(253402300800), refreshEnd},
		{"access max int64", "accessTokenEndTime", json.Number("9223372036854775807"), refreshEnd},
		{"access 1e300", "accessTokenEndTime", json.Number("1e300"), refreshEnd},
		{"refresh ms", "refreshTokenEndTime", int64(answerRefreshEnd) * 1000, time.Time{}},
		{"refresh ms as a string", "refreshTokenEndTime", strconv.FormatInt(int64(answerRefreshEnd)*1000, 10), time.Time{}},
		{"refresh at the bound", "refreshTokenEndTime", int64(253402300800), time.Time{}},
		{"refresh 1e16", "refreshTokenEndTime", json.Number("1e16"), time.Time{}},
	}
	for _, tc := range cases {
		for _, seed := range []string{"", "stored-refresh-token-0001"} {
			t.Run(tc.name+"/seed "+strconv.Quote(seed), func(t *testing.T) {
				body := pairAnswer(func(d map[string]any) { d[tc.field] = tc.value })
				r := &reserve{}
				tok, err := New().Issue(context.Background(), request(t, answering(t, body, body), login(seed), r))
				var re *provider.RotatedError
				if tok != nil || !errors.As(err, &re) {
					t.Fatalf("tok=%+v err=%v", tok, err)
				}
				if re.Rotated["refresh_token"] != answerRefresh || !re.SecretExpiresAt.Equal(tc.secretEnds) {
					t.Fatalf("rotated %v, secret expires %v", re.Rotated, re.SecretExpiresAt)
				}
				ue, ok := upstream.AsError(err)
				if !ok || ue.Failure != upstream.BadResponse {
					t.Fatalf("err = %v", err)
				}
				for _, w := range []string{tc.field, "past year 9999", "seconds expected"} {
					if !strings.Contains(ue.Message, w) {
						t.Errorf("message %q lacks %q", ue.Message, w)
					}
				}
				if seed != "" && r.n.Load() != 0 {
					t.Fatalf("spent a make (reserve=%d)", r.n.Load())
				}
				noLeak(t, err, answerRefresh, answerAccess, seed)
			})
		}
	}
	// The last second of year 9999 is still a date.
	body := pairAnswer(func(d map[string]any) { d["accessTokenEndTime"], d["refreshTokenEndTime"] = 253402300799, 253402300799 })
	tok, err := New().Issue(context.Background(), request(t, answering(t, body, body), login("x"), nil))
	if err != nil || tok.ExpiresAt.Year() != 9999 || tok.SecretExpiresAt.Year() != 9999 {
		t.Fatalf("tok=%+v err=%v", tok, err)
	}
}
