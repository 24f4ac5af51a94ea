package sandbox

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testClock is a settable clock for one test.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newAlorTest(t *testing.T) (*Server, *httptest.Server, *testClock) {
	t.Helper()
	clk := &testClock{t: time.Date(2025, 3, 1, 10, 0, 0, 0, time.UTC)}
	s := New(Options{Now: clk.now})
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv, clk
}

type alorReply struct {
	status int
	body   string
	jwt    string
}

// alorPost calls the fake; body "" sends no body.
func alorPost(t *testing.T, ctx context.Context, rawURL, body string) alorReply {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, rawURL, rd)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return alorReply{status: -1, body: err.Error()}
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	rep := alorReply{status: resp.StatusCode, body: string(raw)}
	if resp.StatusCode == http.StatusOK {
		var out struct {
			AccessToken string
		}
		if err := json.Unmarshal(raw, &out); err != nil || out.AccessToken == "" {
			t.Fatalf("200 without AccessToken: %s", raw)
		}
		rep.jwt = out.AccessToken
	}
	return rep
}

func tokenBody(token string, allowed ...string) string {
	b, _ := json.Marshal(map[string]any{"token": token, "allowedPortfolios": allowed})
	return string(b)
}

func TestAlorMint(t *testing.T) {
	s, srv, clk := newAlorTest(t)
	prod, dev := srv.URL+"/refresh", srv.URL+AlorDevPrefix+"/refresh"
	tests := []struct {
		name       string
		url, body  string
		status     int
		portfolios string
		agreements string
		scope      string
		sub, iss   string
		allowed    []string
		echo       string // a refusal quotes the presented token
	}{
		{name: "query token", url: prod + "?token=" + url.QueryEscape(AlorRefreshToken), status: 200,
			portfolios: "D12345 D67890 G11111", agreements: "1234567 7654321", scope: alorTradingScope, sub: "P012345", iss: "Alor.Identity"},
		{name: "body token", url: prod, body: `{"token":"` + AlorRefreshToken + `"}`, status: 200,
			portfolios: "D12345 D67890 G11111", agreements: "1234567 7654321", scope: alorTradingScope, sub: "P012345", iss: "Alor.Identity"},
		{name: "narrowed to one", url: prod, body: tokenBody(AlorRefreshToken, "G11111"), status: 200, allowed: []string{"G11111"},
			portfolios: "G11111", agreements: "1234567", scope: alorTradingScope, sub: "P012345", iss: "Alor.Identity"},
		{name: "narrowed to two, duplicates ignored", url: prod, body: tokenBody(AlorRefreshToken, "G11111", "D67890", "G11111"), status: 200,
			allowed: []string{"G11111", "D67890", "G11111"}, portfolios: "D67890 G11111", agreements: "7654321 1234567", scope: alorTradingScope, sub: "P012345", iss: "Alor.Identity"},
		{name: "body wins over query", url: prod + "?token=nonsense", body: tokenBody(AlorRefreshToken), status: 200,
			portfolios: "D12345 D67890 G11111", agreements: "1234567 7654321", scope: alorTradingScope, sub: "P012345", iss: "Alor.Identity"},
		{name: "test environment", url: dev, body: tokenBody(AlorDevRefreshToken), status: 200,
			portfolios: "D88888 G88888", agreements: "8888888", scope: alorTradingScope, sub: "P098765", iss: "AlorDev.Identity"},
		{name: "unowned portfolio", url: prod, body: tokenBody(AlorRefreshToken, "D12345", "X99999"), status: 400, allowed: []string{"D12345", "X99999"}},
		{name: "unknown token", url: prod, body: tokenBody("no-such-token"), status: 403, echo: "no-such-token"},
		{name: "production token on test environment", url: dev, body: tokenBody(AlorRefreshToken), status: 403, echo: AlorRefreshToken},
		{name: "test token on production", url: prod, body: tokenBody(AlorDevRefreshToken), status: 403, echo: AlorDevRefreshToken},
		{name: "no token", url: prod, status: 400},
		{name: "body not JSON", url: prod, body: "token=" + AlorRefreshToken, status: 400},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rep := alorPost(t, context.Background(), tc.url, tc.body)
			if rep.status != tc.status {
				t.Fatalf("status %d (%s), want %d", rep.status, rep.body, tc.status)
			}
			if got := s.AlorLastAllowedPortfolios(); !slices.Equal(got, tc.allowed) {
				t.Errorf("last allowedPortfolios %v, want %v", got, tc.allowed)
			}
			if tc.status != 200 {
				if !strings.Contains(rep.body, tc.echo) {
					t.Errorf("error body %q does not quote the presented token %q", rep.body, tc.echo)
				}
				return
			}
			claims, err := verifyES256(&s.alor.key.PublicKey, rep.jwt)
			if err != nil {
				t.Fatalf("JWT does not verify as ES256: %v", err)
			}
			want := map[string]any{
				"portfolios": tc.portfolios, "agreements": tc.agreements, "scope": tc.scope, "sub": tc.sub, "iss": tc.iss,
				"iat": float64(clk.now().Unix()), "exp": float64(clk.now().Add(30 * time.Minute).Unix()),
			}
			for k, v := range want {
				if claims[k] != v {
					t.Errorf("claim %s = %v, want %v", k, claims[k], v)
				}
			}
			for _, k := range []string{"clientid", "ein", "aud"} {
				if v, _ := claims[k].(string); v == "" {
					t.Errorf("claim %s missing", k)
				}
			}
			if !s.AlorValid(rep.jwt) {
				t.Error("AlorValid is false for a fresh JWT")
			}
		})
	}
	if got := s.Calls(AlorRefreshEP) + s.Calls(AlorDevRefreshEP); got != len(tests) {
		t.Errorf("counted %d calls, want %d", got, len(tests))
	}
}

func TestAlorRevokeAndExpiry(t *testing.T) {
	s, srv, clk := newAlorTest(t)
	const second = "sandbox-alor-second"
	s.AddAlorRefreshToken(second)
	rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken))
	ro := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(second))
	if rep.status != 200 || ro.status != 200 {
		t.Fatalf("mint: %d %d", rep.status, ro.status)
	}
	if !s.AlorValid(rep.jwt) {
		t.Fatal("fresh JWT not valid")
	}
	// A tampered payload must fail the signature check.
	parts := strings.Split(rep.jwt, ".")
	if s.AlorValid(parts[0] + "." + parts[1] + "x." + parts[2]) {
		t.Error("tampered JWT accepted")
	}
	if s.AlorValid(signHS256([]byte("k"), map[string]any{"exp": 1})) {
		t.Error("foreign HS256 JWT accepted")
	}

	s.RevokeAlorRefreshToken(AlorRefreshToken)
	if s.AlorValid(rep.jwt) {
		t.Error("JWT of a revoked refresh token still valid")
	}
	if !s.AlorValid(ro.jwt) {
		t.Error("revoking one refresh token killed another's JWT")
	}
	if r := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken)); r.status != 403 {
		t.Errorf("revoked refresh token minted: %d", r.status)
	}

	clk.advance(30*time.Minute - time.Second)
	if !s.AlorValid(ro.jwt) {
		t.Error("JWT dead before exp")
	}
	clk.advance(time.Second)
	if s.AlorValid(ro.jwt) {
		t.Error("JWT valid at exp")
	}

	s.SetAlorTokenLifetime(5 * time.Minute)
	short := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(second))
	claims, err := verifyES256(&s.alor.key.PublicKey, short.jwt)
	if err != nil {
		t.Fatal(err)
	}
	if life := claims["exp"].(float64) - claims["iat"].(float64); life != 300 {
		t.Errorf("lifetime %vs, want 300s", life)
	}
}

func TestAlorNarrowingSwitch(t *testing.T) {
	s, srv, _ := newAlorTest(t)
	s.SetAlorIgnoreNarrowing(true)
	rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken, "D67890"))
	if rep.status != 200 {
		t.Fatalf("status %d", rep.status)
	}
	claims, _ := verifyES256(&s.alor.key.PublicKey, rep.jwt)
	if claims["portfolios"] != "D12345 D67890 G11111" {
		t.Errorf("portfolios %v: narrowing was not ignored", claims["portfolios"])
	}
	if got := s.AlorLastAllowedPortfolios(); !slices.Equal(got, []string{"D67890"}) {
		t.Errorf("last allowed %v", got)
	}
}

// The limit is on requests in flight: hold two inside the fake, and a third
// must get 429 at once; once they leave, requests pass again.
func TestAlorConcurrencyLimit(t *testing.T) {
	s, srv, _ := newAlorTest(t)
	s.SetAlorConcurrencyLimit(2)
	s.SetAlorProcessingTime(time.Minute)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/refresh", strings.NewReader(tokenBody(AlorRefreshToken)))
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}()
	}
	waitInFlight(t, s, 2)
	rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken))
	if rep.status != http.StatusTooManyRequests {
		t.Errorf("third concurrent request: %d, want 429", rep.status)
	}
	cancel()
	wg.Wait()
	waitInFlight(t, s, 0)
	s.SetAlorProcessingTime(0)
	if rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken)); rep.status != 200 {
		t.Errorf("after the burst: %d, want 200", rep.status)
	}
}

func waitInFlight(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.alor.mu.Lock()
		got := s.alor.inFlight
		s.alor.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("in flight %d, want %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestAlorFaultsAndEndpoints(t *testing.T) {
	s, srv, _ := newAlorTest(t)
	s.InjectFault(AlorDevRefreshEP, http.StatusServiceUnavailable, 1)
	rep := alorPost(t, context.Background(), srv.URL+AlorDevPrefix+"/refresh", tokenBody(AlorDevRefreshToken))
	if rep.status != 503 || !strings.Contains(rep.body, "Service Unavailable") {
		t.Errorf("fault: %d %q", rep.status, rep.body)
	}
	if rep := alorPost(t, context.Background(), srv.URL+AlorDevPrefix+"/refresh", tokenBody(AlorDevRefreshToken)); rep.status != 200 {
		t.Errorf("after the fault: %d", rep.status)
	}
	if got := s.Calls(AlorDevRefreshEP); got != 2 {
		t.Errorf("calls %d, want 2", got)
	}
	eps := s.Endpoints()
	for _, ep := range []string{AlorRefreshEP, AlorDevRefreshEP} {
		if !slices.Contains(eps, ep) {
			t.Errorf("Endpoints() lacks %s: %v", ep, eps)
		}
	}
}

func TestAlorAdmin(t *testing.T) {
	s, srv, _ := newAlorTest(t)
	admin := func(path, body string) int {
		t.Helper()
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if st := admin("/_sandbox/alor/settings", `{"token_lifetime":"1m","concurrency_limit":3,"processing_time":"0s","ignore_narrowing":true}`); st != 204 {
		t.Fatalf("settings: %d", st)
	}
	s.alor.mu.Lock()
	lifetime, limit, ignore := s.alor.lifetime, s.alor.limit, s.alor.ignoreNarrowing
	s.alor.mu.Unlock()
	if lifetime != time.Minute || limit != 3 || !ignore {
		t.Errorf("settings not applied: %v %d %v", lifetime, limit, ignore)
	}
	// A bad value rejects the whole request: nothing changes.
	if st := admin("/_sandbox/alor/settings", `{"token_lifetime":"2m","processing_time":"soon"}`); st != 400 {
		t.Errorf("bad duration: %d", st)
	}
	if st := admin("/_sandbox/alor/settings", `{"lifetime":"2m"}`); st != 400 {
		t.Errorf("unknown field: %d", st)
	}
	s.alor.mu.Lock()
	lifetime = s.alor.lifetime
	s.alor.mu.Unlock()
	if lifetime != time.Minute {
		t.Errorf("a rejected request changed the lifetime to %v", lifetime)
	}
	const added = "sandbox-alor-added"
	if st := admin("/_sandbox/alor/tokens", `{"refresh_token":"`+added+`"}`); st != 204 {
		t.Fatalf("add token: %d", st)
	}
	if st := admin("/_sandbox/alor/tokens", `{}`); st != 400 {
		t.Errorf("empty token added: %d", st)
	}
	rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(added))
	if claims, err := verifyES256(&s.alor.key.PublicKey, rep.jwt); err != nil || claims["scope"] != alorTradingScope {
		t.Fatalf("added token: %d %v %v", rep.status, claims, err)
	}
	if st := admin("/_sandbox/alor/revoke", `{"refresh_token":"`+added+`"}`); st != 204 {
		t.Fatalf("revoke: %d", st)
	}
	if rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(added)); rep.status != 403 {
		t.Errorf("revoked via admin, mint: %d", rep.status)
	}
	if rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken)); rep.status != 200 {
		t.Errorf("revoking an added token killed another: %d", rep.status)
	}
}

// TestAlorOmitPortfoliosSwitch: the strict variant of the undocumented
// narrowing claim leaves portfolios out of the JWT, narrowed or not; the
// other claims stay.
func TestAlorOmitPortfoliosSwitch(t *testing.T) {
	s, srv, _ := newAlorTest(t)
	for _, tc := range []struct {
		name    string
		omit    bool
		allowed []string
	}{
		{"default keeps the claim", false, nil},
		{"omitted", true, nil},
		{"omitted while narrowing", true, []string{"D12345"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := `{"omit_portfolios":` + strconv.FormatBool(tc.omit) + `}`
			resp, err := http.Post(srv.URL+"/_sandbox/alor/settings", "application/json", strings.NewReader(body))
			if err != nil || resp.StatusCode != 204 {
				t.Fatalf("settings: %v %v", resp, err)
			}
			resp.Body.Close()
			rep := alorPost(t, context.Background(), srv.URL+"/refresh", tokenBody(AlorRefreshToken, tc.allowed...))
			claims, err := verifyES256(&s.alor.key.PublicKey, rep.jwt)
			if err != nil {
				t.Fatal(err)
			}
			if _, has := claims["portfolios"]; has == tc.omit {
				t.Errorf("portfolios claim present = %v with omit = %v", has, tc.omit)
			}
			if claims["agreements"] == "" || claims["scope"] != alorTradingScope {
				t.Errorf("other claims changed: %v", claims)
			}
		})
	}
}
