package alor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// seenRequest is what reached the fake, recorded in front of it.
type seenRequest struct {
	method, path, rawQuery, auth string
	body                         []byte
}

type recorder struct {
	mu   sync.Mutex
	reqs []seenRequest
}

func (r *recorder) all() []seenRequest {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]seenRequest(nil), r.reqs...)
}

// record wraps h so every request's method, path, query, Authorization
// header and body are kept for the test to inspect.
func record(h http.Handler) (http.Handler, *recorder) {
	rec := &recorder{}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		rec.mu.Lock()
		rec.reqs = append(rec.reqs, seenRequest{r.Method, r.URL.Path, r.URL.RawQuery, r.Header.Get("Authorization"), body})
		rec.mu.Unlock()
		h.ServeHTTP(w, r)
	}), rec
}

type env struct {
	sb  *sandbox.Server
	url string
	rec *recorder
	cl  *upstream.Client
}

func newEnv(t *testing.T) *env {
	t.Helper()
	sb := sandbox.New(sandbox.Options{})
	h, rec := record(sb)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return &env{sb: sb, url: srv.URL, rec: rec, cl: newClient(t)}
}

func newClient(t *testing.T) *upstream.Client {
	t.Helper()
	cl, err := upstream.New(upstream.Options{Broker: "ALOR", Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func request(cl *upstream.Client, base, refresh, environment string, allowed ...string) provider.Request {
	return provider.Request{
		BaseURL: base, Client: cl, Environment: environment,
		Secrets:         map[string]string{"refresh_token": refresh},
		AllowedAccounts: allowed,
	}
}

func TestSpec(t *testing.T) {
	spec := New().Spec()
	if spec.Name != Name || spec.Display != "ALOR" || spec.Issuance != provider.Minted {
		t.Errorf("spec %+v", spec)
	}
	if len(spec.Fields) != 1 || spec.Fields[0].Name != "refresh_token" || !spec.Fields[0].Secret || !spec.Fields[0].Required {
		t.Errorf("fields %+v", spec.Fields)
	}
	if spec.Environments["production"] != "https://oauth.alor.ru" || spec.Environments["sandbox"] != "https://oauthdev.alor.ru" {
		t.Errorf("environments %v", spec.Environments)
	}
}

func TestIssue(t *testing.T) {
	tests := []struct {
		name        string
		dev         bool
		refresh     string
		allowed     []string
		wantAccts   []string
		wantRO      bool
		wantLogin   string
		wantScope   string
		wantPath    string
		wantNarrows bool
		wantAgrees  []string
	}{
		{name: "trading token", refresh: sandbox.AlorRefreshToken,
			wantAccts: []string{"D12345", "D67890", "G11111"}, wantLogin: "P012345", wantAgrees: []string{"1234567", "7654321"},
			wantScope: "OrdersRead OrdersCreate Trades Personal Stats", wantPath: "/refresh"},
		{name: "narrowed to one portfolio", refresh: sandbox.AlorRefreshToken, allowed: []string{"D67890"},
			wantAccts: []string{"D67890"}, wantLogin: "P012345", wantAgrees: []string{"7654321"},
			wantScope: "OrdersRead OrdersCreate Trades Personal Stats", wantPath: "/refresh", wantNarrows: true},
		{name: "narrowed to two portfolios", refresh: sandbox.AlorRefreshToken, allowed: []string{"G11111", "D12345"},
			wantAccts: []string{"D12345", "G11111"}, wantLogin: "P012345", wantAgrees: []string{"1234567"},
			wantScope: "OrdersRead OrdersCreate Trades Personal Stats", wantPath: "/refresh", wantNarrows: true},
		{name: "test environment", dev: true, refresh: sandbox.AlorDevRefreshToken,
			wantAccts: []string{"D88888", "G88888"}, wantLogin: "P098765", wantAgrees: []string{"8888888"},
			wantScope: "OrdersRead OrdersCreate Trades Personal Stats", wantPath: "/alor-dev/refresh"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			base, envName := e.url, "production"
			if tc.dev {
				base, envName = e.url+sandbox.AlorDevPrefix, "sandbox"
			}
			before := time.Now()
			tok, err := New().Issue(context.Background(), request(e.cl, base, tc.refresh, envName, tc.allowed...))
			if err != nil {
				t.Fatalf("Issue: %v", err)
			}
			after := time.Now()
			if !e.sb.AlorValid(tok.AccessToken) {
				t.Error("the fake does not accept the token handed out")
			}
			if got := slices.Sorted(slices.Values(tok.AccountIDs)); !slices.Equal(got, tc.wantAccts) {
				t.Errorf("AccountIDs %v, want %v", tok.AccountIDs, tc.wantAccts)
			}
			if tok.ReadOnly != tc.wantRO {
				t.Errorf("ReadOnly %v, want %v", tok.ReadOnly, tc.wantRO)
			}
			if tok.Details["login"] != tc.wantLogin || tok.Details["scope"] != tc.wantScope {
				t.Errorf("Details %v", tok.Details)
			}
			// creds hand out the agreements with the portfolios.
			if got, _ := tok.Details["agreements"].([]string); !slices.Equal(got, tc.wantAgrees) {
				t.Errorf("agreements %v, want %v", tok.Details["agreements"], tc.wantAgrees)
			}
			if got, _ := tok.Details["portfolios"].([]string); !slices.Equal(got, tok.AccountIDs) {
				t.Errorf("portfolios %v, want the account ids %v", tok.Details["portfolios"], tok.AccountIDs)
			}
			// The fake mints 30-minute tokens; whole-second claims allow 1s slack.
			if tok.IssuedAt.Before(before.Add(-time.Second)) || tok.IssuedAt.After(after) {
				t.Errorf("IssuedAt %v not within [%v, %v]", tok.IssuedAt, before, after)
			}
			if life := tok.ExpiresAt.Sub(tok.IssuedAt); life < 29*time.Minute || life > 30*time.Minute {
				t.Errorf("lifetime %v, want about 30m", life)
			}

			reqs := e.rec.all()
			if len(reqs) != 1 {
				t.Fatalf("%d upstream calls, want 1", len(reqs))
			}
			r := reqs[0]
			if r.method != http.MethodPost || r.path != tc.wantPath {
				t.Errorf("called %s %s, want POST %s", r.method, r.path, tc.wantPath)
			}
			if r.auth != "" {
				t.Errorf("Authorization header sent: %q", r.auth)
			}
			if r.rawQuery != "" {
				t.Errorf("query string sent (the token must stay out of URLs): %q", r.rawQuery)
			}
			var body map[string]json.RawMessage
			if err := json.Unmarshal(r.body, &body); err != nil {
				t.Fatalf("body not JSON: %q", r.body)
			}
			if string(body["token"]) != `"`+tc.refresh+`"` {
				t.Errorf("token in body %s", body["token"])
			}
			_, sent := body["allowedPortfolios"]
			if sent != tc.wantNarrows {
				t.Errorf("allowedPortfolios sent=%v, want %v (body %s)", sent, tc.wantNarrows, r.body)
			}
			if got := e.sb.AlorLastAllowedPortfolios(); !slices.Equal(got, tc.allowed) {
				t.Errorf("the fake received allowedPortfolios %v, want %v", got, tc.allowed)
			}
		})
	}
}

func TestIssueErrors(t *testing.T) {
	const unknown = "alor-refresh-not-known-0123456789"
	tests := []struct {
		name    string
		dev     bool
		env     string
		refresh string
		allowed []string
		setup   func(sb *sandbox.Server)
		kind    upstream.Failure // 0: not an upstream.Error
		status  int
		narrow  bool
		inText  []string
		calls   int
	}{
		{name: "unknown refresh token", refresh: unknown, env: "production", kind: upstream.Unauthorized, status: 403,
			inText: []string{"API Access Tokens", "check environment", "production environment"}, calls: 1},
		{name: "revoked refresh token", refresh: sandbox.AlorRefreshToken, env: "production",
			setup: func(sb *sandbox.Server) { sb.RevokeAlorRefreshToken(sandbox.AlorRefreshToken) },
			kind:  upstream.Unauthorized, status: 403, inText: []string{"revoked"}, calls: 1},
		{name: "production token on the test environment", dev: true, env: "sandbox", refresh: sandbox.AlorRefreshToken,
			kind: upstream.Unauthorized, status: 403, inText: []string{"test environment is refused by production", "sandbox environment"}, calls: 1},
		{name: "test token on production", refresh: sandbox.AlorDevRefreshToken, env: "production",
			kind: upstream.Unauthorized, status: 403, inText: []string{"production environment"}, calls: 1},
		{name: "429 is not retried", refresh: sandbox.AlorRefreshToken,
			setup: func(sb *sandbox.Server) { sb.InjectFault(sandbox.AlorRefreshEP, 429, -1) },
			kind:  upstream.RateLimited, status: 429, inText: []string{"concurrent requests"}, calls: 1},
		{name: "503 is not retried", refresh: sandbox.AlorRefreshToken,
			setup: func(sb *sandbox.Server) { sb.InjectFault(sandbox.AlorRefreshEP, 503, -1) },
			kind:  upstream.Unavailable, status: 503, inText: []string{"Service Unavailable"}, calls: 1},
		{name: "401", refresh: sandbox.AlorRefreshToken,
			setup: func(sb *sandbox.Server) { sb.InjectFault(sandbox.AlorRefreshEP, 401, 1) },
			kind:  upstream.Unauthorized, status: 401, calls: 1},
		{name: "narrowing to a portfolio not owned", refresh: sandbox.AlorRefreshToken, allowed: []string{"D12345", "X00000"},
			kind: upstream.Rejected, status: 400, inText: []string{"X00000", "allowed_accounts"}, calls: 1},
		{name: "broker ignores narrowing", refresh: sandbox.AlorRefreshToken, allowed: []string{"D67890"},
			setup:  func(sb *sandbox.Server) { sb.SetAlorIgnoreNarrowing(true) },
			narrow: true, inText: []string{"D12345", "G11111"}, calls: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			if tc.setup != nil {
				tc.setup(e.sb)
			}
			base := e.url
			if tc.dev {
				base += sandbox.AlorDevPrefix
			}
			tok, err := New().Issue(context.Background(), request(e.cl, base, tc.refresh, tc.env, tc.allowed...))
			if err == nil {
				t.Fatalf("Issue succeeded: %+v", tok)
			}
			text := err.Error()
			if strings.Contains(text, tc.refresh) {
				t.Errorf("error text carries the refresh token: %s", text)
			}
			ue, isUpstream := upstream.AsError(err)
			if tc.kind == 0 {
				if isUpstream {
					t.Errorf("want a plain error, got upstream.Error %v", err)
				}
			} else if !isUpstream || ue.Failure != tc.kind || ue.Status != tc.status {
				t.Errorf("got %#v, want kind %v status %d", err, tc.kind, tc.status)
			}
			if errors.Is(err, ErrNarrowing) != tc.narrow {
				t.Errorf("errors.Is(ErrNarrowing) = %v, want %v: %v", !tc.narrow, tc.narrow, err)
			}
			for _, s := range tc.inText {
				if !strings.Contains(text, s) {
					t.Errorf("error %q lacks %q", text, s)
				}
			}
			if n := len(e.rec.all()); n != tc.calls {
				t.Errorf("%d upstream calls, want %d", n, tc.calls)
			}
		})
	}
}

// fakeJWT builds an unsigned-but-well-formed JWT with the given claims: the
// provider reads claims only, so the signature does not matter here.
func fakeJWT(claims map[string]any) string {
	body, _ := json.Marshal(claims)
	return fuzzJWT(string(body))
}

// Responses the sandbox does not produce: odd, broken or hostile brokers.
func TestIssueResponses(t *testing.T) {
	const secret = "alor-secret-refresh-token-42"
	now := time.Now()
	good := func(extra map[string]any) map[string]any {
		c := map[string]any{"sub": "P1", "portfolios": "D1 D2", "scope": "OrdersRead Trades",
			"iat": now.Unix(), "exp": now.Add(30 * time.Minute).Unix()}
		for k, v := range extra {
			if v == nil {
				delete(c, k)
			} else {
				c[k] = v
			}
		}
		return c
	}
	jsonBody := func(key string, claims map[string]any) string {
		b, _ := json.Marshal(map[string]string{key: fakeJWT(claims)})
		return string(b)
	}
	tests := []struct {
		name    string
		status  int
		body    string
		allowed []string
		kind    upstream.Failure // 0: success unless narrow
		narrow  bool
		check   func(t *testing.T, tok *provider.Token)
	}{
		{name: "AccessToken", status: 200, body: jsonBody("AccessToken", good(nil)),
			check: func(t *testing.T, tok *provider.Token) {
				if !slices.Equal(tok.AccountIDs, []string{"D1", "D2"}) || !tok.ReadOnly {
					t.Errorf("token %+v", tok)
				}
			}},
		// The casing is confirmed by ALOR's docs and .NET SDK.
		{name: "another casing is not ALOR's answer", status: 200, body: jsonBody("accessToken", good(nil)), kind: upstream.BadResponse},
		{name: "agreements of another type", status: 200, body: jsonBody("AccessToken", good(map[string]any{"agreements": 7})), kind: upstream.BadResponse},
		{name: "no agreements claim: left out", status: 200, body: jsonBody("AccessToken", good(map[string]any{"agreements": nil})),
			check: func(t *testing.T, tok *provider.Token) {
				if _, ok := tok.Details["agreements"]; ok {
					t.Errorf("agreements shown though the JWT has none: %v", tok.Details)
				}
			}},
		{name: "portfolios as a JSON list", status: 200, body: jsonBody("AccessToken", good(map[string]any{"portfolios": []string{"D1", "G2"}})),
			check: func(t *testing.T, tok *provider.Token) {
				if !slices.Equal(tok.AccountIDs, []string{"D1", "G2"}) {
					t.Errorf("AccountIDs %v", tok.AccountIDs)
				}
			}},
		{name: "no iat: issued at receipt", status: 200, body: jsonBody("AccessToken", good(map[string]any{"iat": nil})),
			check: func(t *testing.T, tok *provider.Token) {
				if d := tok.IssuedAt.Sub(now); d < 0 || d > 5*time.Second {
					t.Errorf("IssuedAt %v, want about now", tok.IssuedAt)
				}
			}},
		{name: "broker clock an hour ahead", status: 200,
			body: jsonBody("AccessToken", good(map[string]any{"iat": now.Add(time.Hour).Unix(), "exp": now.Add(90 * time.Minute).Unix()})),
			check: func(t *testing.T, tok *provider.Token) {
				if d := tok.ExpiresAt.Sub(now); d < 29*time.Minute || d > 31*time.Minute {
					t.Errorf("ExpiresAt in %v, want about 30m (skew corrected)", d)
				}
			}},
		{name: "no scope: not known read-only", status: 200, body: jsonBody("AccessToken", good(map[string]any{"scope": nil})),
			check: func(t *testing.T, tok *provider.Token) {
				if tok.ReadOnly {
					t.Error("ReadOnly without a scope claim")
				}
			}},
		{name: "OrdersCancel is trading", status: 200, body: jsonBody("AccessToken", good(map[string]any{"scope": "OrdersRead OrdersCancel"})),
			check: func(t *testing.T, tok *provider.Token) {
				if tok.ReadOnly {
					t.Error("ReadOnly with OrdersCancel")
				}
			}},
		{name: "not JSON, echoing the secret", status: 200, body: "<html>bad gateway for " + secret + "</html>", kind: upstream.BadResponse},
		{name: "empty 200", status: 200, body: "", kind: upstream.BadResponse},
		{name: "no token in response", status: 200, body: `{"Token":"x"}`, kind: upstream.BadResponse},
		{name: "token not a string", status: 200, body: `{"AccessToken":42}`, kind: upstream.BadResponse},
		{name: "token not a JWT", status: 200, body: `{"AccessToken":"opaque"}`, kind: upstream.BadResponse},
		{name: "no exp", status: 200, body: jsonBody("AccessToken", good(map[string]any{"exp": nil})), kind: upstream.BadResponse},
		{name: "already expired", status: 200,
			body: jsonBody("AccessToken", good(map[string]any{"iat": now.Add(-time.Hour).Unix(), "exp": now.Add(-time.Minute).Unix()})), kind: upstream.BadResponse},
		{name: "portfolios of another type", status: 200, body: jsonBody("AccessToken", good(map[string]any{"portfolios": 7})), kind: upstream.BadResponse},
		{name: "no portfolios claim while narrowing", status: 200, allowed: []string{"D1"},
			body: jsonBody("AccessToken", good(map[string]any{"portfolios": nil})), narrow: true},
		{name: "403 echoing the secret", status: 403, body: "refresh token " + secret + " revoked", kind: upstream.Unauthorized},
		{name: "429 JSON body echoing the secret", status: 429, body: `{"message":"slow down, ` + secret + `"}`, kind: upstream.RateLimited},
		{name: "500 HTML", status: 500, body: "<html>oops</html>", kind: upstream.Unavailable},
		{name: "302 redirect not followed", status: 302, body: "", kind: upstream.BadResponse},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.status == 302 {
					w.Header().Set("Location", "https://elsewhere.example/refresh")
				}
				w.WriteHeader(tc.status)
				_, _ = io.WriteString(w, tc.body)
			}))
			defer srv.Close()
			tok, err := New().Issue(context.Background(), request(newClient(t), srv.URL, secret, "", tc.allowed...))
			if tc.kind == 0 && !tc.narrow {
				if err != nil {
					t.Fatalf("Issue: %v", err)
				}
				tc.check(t, tok)
				return
			}
			if err == nil {
				t.Fatalf("Issue succeeded: %+v", tok)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("error text carries the refresh token: %v", err)
			}
			if tc.narrow {
				if !errors.Is(err, ErrNarrowing) {
					t.Errorf("want ErrNarrowing, got %v", err)
				}
				return
			}
			if ue, ok := upstream.AsError(err); !ok || ue.Failure != tc.kind {
				t.Errorf("got %v, want kind %v", err, tc.kind)
			}
		})
	}
}

func TestIssueWithoutSecretOrContext(t *testing.T) {
	e := newEnv(t)
	if _, err := New().Issue(context.Background(), request(e.cl, e.url, "", "")); err == nil {
		t.Error("empty refresh token accepted")
	}
	if _, err := New().Issue(context.Background(), provider.Request{BaseURL: e.url, Secrets: map[string]string{"refresh_token": "x"}}); err == nil {
		t.Error("nil client accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := New().Issue(ctx, request(e.cl, e.url, sandbox.AlorRefreshToken, "")); err == nil {
		t.Error("cancelled context: Issue succeeded")
	}
	if n := len(e.rec.all()); n != 0 {
		t.Errorf("%d upstream calls, want 0", n)
	}
}

func TestReadOnly(t *testing.T) {
	tests := []struct {
		scope string
		want  bool
	}{
		{"OrdersRead Trades Personal Stats", true},
		{"", true}, // no order right here; tokenFrom refuses an empty scope as no evidence
		{"OrdersRead OrdersCreate Trades Personal Stats", false},
		{"OrdersRead OrdersCancel", false},
		{"ordersCreate", false},
		{"OrdersCreateStop", false},
		{"OrdersReplace", false}, // an order right we do not know: fail closed
		{"OrdersReadStop Trades", true},
	}
	for _, tc := range tests {
		if got := readOnly(strings.Fields(tc.scope)); got != tc.want {
			t.Errorf("readOnly(%q) = %v, want %v", tc.scope, got, tc.want)
		}
	}
}

func TestEnvironmentName(t *testing.T) {
	tests := []struct {
		req  provider.Request
		want string
	}{
		{provider.Request{Environment: "sandbox", BaseURL: ProductionURL}, "sandbox"},
		{provider.Request{BaseURL: ProductionURL}, "production"},
		{provider.Request{BaseURL: SandboxURL + "/"}, "sandbox"},
		{provider.Request{BaseURL: "http://127.0.0.1:8200"}, ""},
	}
	for _, tc := range tests {
		if got := environment(tc.req); got != tc.want {
			t.Errorf("environment(%+v) = %q, want %q", tc.req, got, tc.want)
		}
	}
}

// TestGuardEvidence: every guard holds only on what the JWT proves. A
// missing or empty portfolios claim cannot show the narrowing, and a missing
// or empty scope cannot show the token is read-only.
func TestGuardEvidence(t *testing.T) {
	now := time.Now()
	claims := func(extra map[string]any) map[string]any {
		c := map[string]any{"sub": "P1", "portfolios": "D1 D2", "agreements": "100", "scope": "OrdersRead Trades",
			"iat": now.Unix(), "exp": now.Add(30 * time.Minute).Unix()}
		for k, v := range extra {
			if v == nil {
				delete(c, k)
			} else {
				c[k] = v
			}
		}
		return c
	}
	tests := []struct {
		name    string
		claims  map[string]any
		allowed []string
		refused string // a guard refusal naming this reason
		ro      bool
	}{
		{name: "portfolios inside allowed", claims: claims(nil), allowed: []string{"D1", "D2"}, ro: true},
		{name: "portfolio outside allowed", claims: claims(nil), allowed: []string{"D1"}, refused: "it also reaches D2"},
		{name: "no portfolios claim", claims: claims(map[string]any{"portfolios": nil}), allowed: []string{"D1"},
			refused: "no portfolios claim), so the narrowing cannot be verified"},
		{name: "empty portfolios claim", claims: claims(map[string]any{"portfolios": ""}), allowed: []string{"D1"},
			refused: "portfolios claim is empty, so the narrowing cannot be verified"},
		{name: "empty portfolios list", claims: claims(map[string]any{"portfolios": []string{}}), allowed: []string{"D1"},
			refused: "portfolios claim is empty"},
		{name: "no portfolios claim, no guard", claims: claims(map[string]any{"portfolios": nil}), ro: true},
		{name: "read-only scope", claims: claims(nil), ro: true},
		{name: "trading scope", claims: claims(map[string]any{"scope": "OrdersRead OrdersCreate"}), ro: false},
		{name: "no scope claim", claims: claims(map[string]any{"scope": nil}), ro: false},
		{name: "empty scope", claims: claims(map[string]any{"scope": ""}), ro: false},
		{name: "empty scope list", claims: claims(map[string]any{"scope": []string{}}), ro: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := tokenFrom(fakeJWT(tc.claims), now, tc.allowed)
			if tc.refused != "" {
				if !errors.Is(err, ErrNarrowing) || !errors.Is(err, provider.ErrGuard) || !strings.Contains(err.Error(), tc.refused) {
					t.Fatalf("want a guard refusal saying %q, got %v", tc.refused, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tok.ReadOnly != tc.ro {
				t.Errorf("ReadOnly %v, want %v", tok.ReadOnly, tc.ro)
			}
		})
	}
}

// TestNarrowingUnverifiable drives the strict variant end to end: when the
// JWT carries no portfolios claim, allowed_accounts is refused, saying why,
// and a config without the guard still gets its token.
func TestNarrowingUnverifiable(t *testing.T) {
	tests := []struct {
		name    string
		allowed []string
		refused bool
	}{
		{"narrowing requested", []string{"D12345"}, true},
		{"no narrowing", nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.sb.SetAlorOmitPortfolios(true)
			tok, err := New().Issue(context.Background(), request(e.cl, e.url, sandbox.AlorRefreshToken, "production", tc.allowed...))
			if !tc.refused {
				if err != nil || len(tok.AccountIDs) != 0 || tok.Details["portfolios"] != nil {
					t.Fatalf("token %+v, err %v", tok, err)
				}
				return
			}
			if !errors.Is(err, ErrNarrowing) || !strings.Contains(err.Error(), "cannot be verified") {
				t.Fatalf("want a refusal saying the narrowing cannot be verified, got %v", err)
			}
			if strings.Contains(err.Error(), sandbox.AlorRefreshToken) {
				t.Fatalf("error leaks the refresh token: %v", err)
			}
		})
	}
}

// TestRequireReadOnlyRefusals: under require_readonly a JWT is refused
// unless its scope shows it cannot trade, and the refusal says why.
func TestRequireReadOnlyRefusals(t *testing.T) {
	now := time.Now()
	tests := []struct {
		name    string
		scope   any // nil: no scope claim
		refused string
	}{
		{name: "trading scope", scope: "OrdersRead OrdersCreate Trades", refused: "can trade (its scope grants OrdersCreate); every refresh token created on the ALOR portal carries full rights"},
		{name: "cancel is trading", scope: "OrdersRead OrdersCancel", refused: "its scope grants OrdersCancel"},
		{name: "no scope claim", refused: "has no scope claim, so it cannot be shown read-only"},
		{name: "empty scope", scope: "", refused: "scope claim is empty, so it cannot be shown read-only"},
		{name: "empty scope list", scope: []string{}, refused: "scope claim is empty"},
		{name: "read-only scope passes", scope: "OrdersRead Trades Personal Stats"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			claims := map[string]any{"sub": "P1", "portfolios": "D1", "iat": now.Unix(), "exp": now.Add(30 * time.Minute).Unix()}
			if tc.scope != nil {
				claims["scope"] = tc.scope
			}
			body, _ := json.Marshal(map[string]string{"AccessToken": fakeJWT(claims)})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
			defer srv.Close()
			req := request(newClient(t), srv.URL, "alor-refresh-secret-1", "")
			req.RequireReadOnly = true
			tok, err := New().Issue(context.Background(), req)
			if tc.refused == "" {
				if err != nil || !tok.ReadOnly {
					t.Fatalf("token %+v, err %v", tok, err)
				}
				return
			}
			if !errors.Is(err, ErrNotReadOnly) || !errors.Is(err, provider.ErrGuard) || !strings.Contains(err.Error(), tc.refused) {
				t.Fatalf("want a refusal saying %q, got %v", tc.refused, err)
			}
		})
	}
	// Against the sandbox: its (and ALOR's) refresh tokens all carry full
	// rights.
	e := newEnv(t)
	req := request(e.cl, e.url, sandbox.AlorRefreshToken, "production")
	req.RequireReadOnly = true
	if _, err := New().Issue(context.Background(), req); !errors.Is(err, ErrNotReadOnly) || !strings.Contains(err.Error(), "OrdersCreate") {
		t.Fatalf("sandbox token under require_readonly: %v", err)
	}
}
