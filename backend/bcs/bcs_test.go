package bcs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

type seen struct {
	method, path, ctype, auth string
	body                      string
}

type env struct {
	sb  *sandbox.Server
	url string
	cl  *upstream.Client
	mu  sync.Mutex
	got []seen
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{sb: sandbox.New(sandbox.Options{})}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(b))
		e.mu.Lock()
		e.got = append(e.got, seen{r.Method, r.URL.Path, r.Header.Get("Content-Type"), r.Header.Get("Authorization"), string(b)})
		e.mu.Unlock()
		e.sb.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	e.url = srv.URL
	cl, err := upstream.New(upstream.Options{Broker: display})
	if err != nil {
		t.Fatal(err)
	}
	e.cl = cl
	return e
}

func (e *env) requests() []seen {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]seen(nil), e.got...)
}

// issue runs Issue with newest as the stored token and written as the
// operator's.
func (e *env) issue(newest, written string, readonly bool) (*provider.Token, error) {
	return Provider{}.Issue(context.Background(), provider.Request{
		BaseURL: e.url, Client: e.cl, Environment: "production", RequireReadOnly: readonly,
		Secrets: map[string]string{fieldToken: newest}, Written: map[string]string{fieldToken: written},
	})
}

func TestIssueExchangesWithTheTokensOwnAzp(t *testing.T) {
	for _, c := range []struct {
		name     string
		readOnly bool
		client   string
	}{{"read-only", true, ClientRead}, {"trade", false, ClientWrite}} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			rt := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: c.readOnly})
			rc, _ := ParseRefreshToken(rt)
			before := time.Now()
			tok, err := e.issue(rt, rt, false)
			if err != nil {
				t.Fatal(err)
			}
			reqs := e.requests()
			if len(reqs) != 2 {
				t.Fatalf("calls: %+v", reqs)
			}
			x := reqs[0]
			want := "client_id=" + c.client + "&grant_type=refresh_token&refresh_token=" + rt
			if x.method != "POST" || x.path != PathToken || x.ctype != "application/x-www-form-urlencoded" || x.auth != "" || x.body != want {
				t.Fatalf("exchange request: %+v", x)
			}
			if p := reqs[1]; p.method != "GET" || p.path != PathPortfolio || p.auth != "Bearer "+tok.AccessToken {
				t.Fatalf("portfolio request: %+v", p)
			}
			if tok.ReadOnly != c.readOnly || len(tok.AccountIDs) != 1 || tok.AccountIDs[0] != sandbox.BCSAgreement {
				t.Fatalf("token: %+v", tok)
			}
			if life := tok.ExpiresAt.Sub(before); life < 24*time.Hour-time.Minute || life > 24*time.Hour+time.Minute {
				t.Fatalf("access token life %s, want 24h from expires_in", life)
			}
			nt := tok.Rotated[fieldToken]
			nc, err := ParseRefreshToken(nt)
			if err != nil || nt == rt || !nc.Expires.Equal(rc.Expires) || !tok.SecretExpiresAt.Equal(rc.Expires) {
				t.Fatalf("rotated %v %v, secret expires %v, want %v", nc, err, tok.SecretExpiresAt, rc.Expires)
			}
			if tok.Details["client_id"] != c.client || strings.Join(tok.Details["trading_accounts"].([]string), ",") != sandbox.BCSAgreement+"-MS" {
				t.Fatalf("details: %v", tok.Details)
			}
			if st := e.sb.BCSStats(); st.ClientMismatches != 0 {
				t.Fatalf("client mismatches: %+v", st)
			}
		})
	}
}

func TestIssueRefusals(t *testing.T) {
	e := newEnv(t)
	expired := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, IssuedAt: time.Now().Add(-91 * 24 * time.Hour)})
	deleted := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	e.sb.DeleteBCSToken(deleted)
	forged := brokertest.JWT(`{"alg":"HS512"}`, `{"typ":"Refresh","azp":"trade-api-read","exp":4102444800}`)
	unknown := brokertest.JWT(`{"alg":"HS512"}`, `{"typ":"Refresh","azp":"mobile_app"}`)
	for _, c := range []struct {
		name, token   string
		status        int
		code, message string
		hint          string
	}{
		{"forged", forged, 400, "invalid_grant", sandbox.BCSInvalidToken, "copy the whole token again"},
		{"expired", expired, 400, "invalid_grant", sandbox.BCSNotActive, "90 days are over"},
		{"deleted", deleted, 400, "invalid_grant", sandbox.BCSSessionGone, "deleted in the BCS web terminal"},
		{"unknown client", unknown, 401, "invalid_client", "Invalid client or Invalid client credentials", "does not know the client_id"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := e.issue(c.token, c.token, false)
			ue, ok := upstream.AsError(err)
			if !ok || ue.Failure != upstream.Unauthorized || ue.Status != c.status || ue.Code != c.code || ue.Message != c.message || !strings.Contains(ue.Hint, c.hint) {
				t.Fatalf("got %v", err)
			}
			if !strings.Contains(err.Error(), "issue a new token in the BCS web terminal") || strings.Contains(err.Error(), c.token) {
				t.Fatalf("message: %v", err)
			}
		})
	}
}

func TestRequireReadOnlyIsCheckedOnTheTokenBeforeAnyCall(t *testing.T) {
	e := newEnv(t)
	write := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{})
	_, err := e.issue(write, write, true)
	if !errors.Is(err, provider.ErrGuard) || !strings.Contains(err.Error(), `its azp is "trade-api-write"`) || len(e.requests()) != 0 {
		t.Fatalf("err %v, calls %d", err, len(e.requests()))
	}
	read := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
	if tok, err := e.issue(read, read, true); err != nil || !tok.ReadOnly {
		t.Fatalf("read-only token: %v %v", tok, err)
	}
}

func TestFallbackToTheWrittenTokenOnce(t *testing.T) {
	for _, c := range []struct {
		name        string
		setup       func(e *env, written, newest string)
		fallback    bool // the written token is presented
		ok          bool
		wantMessage string
	}{
		{"newest refused as invalid: written works", func(e *env, _, newest string) { e.sb.RefuseBCSToken(newest) }, true, true, ""},
		{"both refused as invalid: one try each", func(e *env, written, newest string) {
			e.sb.RefuseBCSToken(newest)
			e.sb.RefuseBCSToken(written)
		}, true, false, "was tried once because BCS refused the newest"},
		{"session deleted: both condemned, no fallback", func(e *env, _, newest string) { e.sb.DeleteBCSToken(newest) }, false, false, sandbox.BCSSessionGone},
		{"newest used under revoke-on-use: no fallback to a used token", func(e *env, _, newest string) {
			e.sb.SetBCSRevokeOnUse(true)
			e.issue(newest, "", false) // uses it
		}, false, false, sandbox.BCSReused},
		{"newest unreadable: written works", func(*env, string, string) {}, true, true, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t)
			written := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
			tok, err := e.issue(written, written, false)
			if err != nil {
				t.Fatal(err)
			}
			newest := tok.Rotated[fieldToken]
			c.setup(e, written, newest)
			if strings.HasPrefix(c.name, "newest unreadable") {
				newest = "not-a-jwt"
			}
			before := e.sb.BCSPresented(written)
			tok, err = e.issue(newest, written, false)
			if (err == nil) != c.ok || (err != nil && !strings.Contains(err.Error(), c.wantMessage)) {
				t.Fatalf("got %v %v", tok, err)
			}
			if got := e.sb.BCSPresented(written) - before; got != map[bool]int{true: 1, false: 0}[c.fallback] {
				t.Fatalf("the written token was presented %d times", got)
			}
			if c.ok && (tok.Details["fell_back"] != true || tok.Rotated[fieldToken] == "") {
				t.Fatalf("fallback token: %+v", tok)
			}
			if err != nil {
				brokertest.CheckLeak(t, err.Error(), "", written, newest)
			}
		})
	}
}

func TestPortfolioEvidence(t *testing.T) {
	e := newEnv(t)
	rt := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true, Agreement: sandbox.BCSOtherAgreement})
	e.sb.SetBCSWrapPortfolio(true)
	tok, err := e.issue(rt, rt, false)
	if err != nil || strings.Join(tok.AccountIDs, ",") != sandbox.BCSOtherAgreement {
		t.Fatalf("wrapped portfolio: %v %v", tok, err)
	}
	e.sb.SetBCSEmptyPortfolio(true)
	tok, err = e.issue(rt, rt, false)
	if err != nil || len(tok.AccountIDs) != 0 || tok.AccountIDs == nil {
		t.Fatalf("empty portfolio: %v %v", tok, err)
	}
	// A failing portfolio keeps the exchange's rotation: the token comes
	// back with no account and says why.
	e.sb.InjectFault(sandbox.BCSPortfolioEP, 500, -1)
	tok, err = e.issue(rt, rt, false)
	if err != nil || len(tok.AccountIDs) != 0 || tok.Rotated[fieldToken] == "" || !strings.Contains(tok.Details["portfolio_error"].(string), "HTTP 500") {
		t.Fatalf("failing portfolio: %+v %v", tok, err)
	}
}

func TestTokenEndpointFailuresAreTransientAndNotRetried(t *testing.T) {
	for _, status := range []int{429, 500, 502, 503} {
		e := newEnv(t)
		rt := e.sb.IssueBCSToken(sandbox.BCSTokenOptions{ReadOnly: true})
		e.sb.InjectFault(sandbox.BCSTokenEP, status, -1)
		_, err := e.issue(rt, rt, false)
		ue, ok := upstream.AsError(err)
		if !ok || !ue.Retryable() || e.sb.Calls(sandbox.BCSTokenEP) != 1 {
			t.Fatalf("%d: %v after %d calls", status, err, e.sb.Calls(sandbox.BCSTokenEP))
		}
	}
}

func TestSpec(t *testing.T) {
	s := New().Spec()
	if s.Name != "bcs" || len(s.Environments) != 1 || s.Environments["production"] != ProductionURL || !s.RotatesSecret ||
		s.SecretExpiry == nil || s.ReportsNoAccess || s.DeclaredExpiry || s.RatePerMinute > 600 {
		t.Fatalf("spec: %+v", s)
	}
	rt := sandbox.BCSToken(sandbox.BCSTokenOptions{})
	exp, err := s.SecretExpiry(map[string]string{fieldToken: rt})
	if err != nil || time.Until(exp) < 89*24*time.Hour {
		t.Fatalf("expiry %v %v", exp, err)
	}
	for _, bad := range []string{"eyJh**********lCGA", "not a token", brokertest.JWT(`{}`, `{"typ":"Refresh"}`), brokertest.JWT(`{}`, `{"azp":"trade-api-read","exp":"soon"}`)} {
		if _, err := s.SecretExpiry(map[string]string{fieldToken: bad}); err == nil || !strings.HasPrefix(err.Error(), "refresh_token: ") || strings.Contains(err.Error(), bad) {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

func TestParseTokenResponse(t *testing.T) {
	jwt := brokertest.JWT(`{}`, `{"typ":"Bearer"}`)
	for _, c := range []struct {
		name, body string
		ok         bool
		expires    time.Duration
		refresh    string
	}{
		{"number", `{"access_token":"` + jwt + `","expires_in":86400,"refresh_token":"r","token_type":"Bearer","not-before-policy":0}`, true, 24 * time.Hour, "r"},
		{"string", `{"access_token":"a","expires_in":"86400","token_type":"bearer","not-before-policy":"0","scope":"openid"}`, true, 24 * time.Hour, ""},
		{"float and refresh life", `{"access_token":"a","expires_in":3600.0,"refresh_expires_in":"100"}`, true, time.Hour, ""},
		{"id_token ignored", `{"access_token":"a","expires_in":60,"id_token":{"x":1},"scope":["a"]}`, true, time.Minute, ""},
		{"no token_type is fine", `{"access_token":"a","expires_in":60,"refresh_token":null}`, true, time.Minute, ""},
		{"mac token", `{"access_token":"a","expires_in":60,"token_type":"mac"}`, false, 0, ""},
		{"no expires_in", `{"access_token":"a"}`, false, 0, ""},
		{"zero", `{"access_token":"a","expires_in":0}`, false, 0, ""},
		{"garbage expires_in", `{"access_token":"a","expires_in":"soon"}`, false, 0, ""},
		{"huge", `{"access_token":"a","expires_in":1e300}`, false, 0, ""},
		{"no access token", `{"expires_in":60}`, false, 0, ""},
		{"access token not a string", `{"access_token":7,"expires_in":60}`, false, 0, ""},
		{"refresh not a string", `{"access_token":"a","expires_in":60,"refresh_token":7}`, false, 0, ""},
		{"array", `[]`, false, 0, ""},
		{"null", `null`, false, 0, ""},
		{"html", `<html>`, false, 0, ""},
	} {
		got, err := ParseTokenResponse([]byte(c.body))
		if (err == nil) != c.ok || (c.ok && (got.ExpiresIn != c.expires || got.RefreshToken != c.refresh)) {
			t.Errorf("%s: %+v %v", c.name, got, err)
		}
	}
}

func TestParsePortfolio(t *testing.T) {
	for _, c := range []struct {
		name, body         string
		ok                 bool
		agreements, trades string
	}{
		{"array", `[{"agreementId":"400123","account":"400123-MS"},{"agreementId":"400123","account":"400123-FX"}]`, true, "400123", "400123-MS,400123-FX"},
		{"numbers", `[{"agreementId":400123,"account":7}]`, true, "400123", "7"},
		{"wrapped", `{"positions":[{"agreementId":"1"}]}`, true, "1", ""},
		{"wrapped under another key", `{"total":3,"list":[{"agreementId":"2"}]}`, true, "2", ""},
		{"two lists", `{"a":[{"agreementId":"2"}],"b":[]}`, false, "", ""},
		{"empty", `[]`, true, "", ""},
		{"no ids", `[{"ticker":"SBER"},7,"x",null]`, true, "", ""},
		{"bad ids", `[{"agreementId":""},{"agreementId":"a\u0001b"},{"agreementId":{"x":1}}]`, true, "", ""},
		{"object without a list", `{"a":1}`, false, "", ""},
		{"not json", `oops`, false, "", ""},
		{"truncated", `[{"agreementId":"1"`, false, "", ""},
	} {
		p, err := ParsePortfolio([]byte(c.body))
		if (err == nil) != c.ok {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if c.ok && (strings.Join(p.Agreements, ",") != c.agreements || strings.Join(p.Accounts, ",") != c.trades || p.Agreements == nil) {
			t.Errorf("%s: %+v", c.name, p)
		}
	}
}

func TestParseRefreshToken(t *testing.T) {
	rc, err := ParseRefreshToken(brokertest.JWT(`{"alg":"HS512"}`, `{"azp":"trade-api-read","exp":1773815757,"typ":"Refresh","sid":"s"}`))
	if err != nil || rc.Azp != ClientRead || rc.Expires.Unix() != 1773815757 || rc.Typ != "Refresh" {
		t.Fatalf("%+v %v", rc, err)
	}
	if rc, err := ParseRefreshToken(brokertest.JWT(`{}`, `{"azp":"trade-api-write"}`)); err != nil || !rc.Expires.IsZero() {
		t.Fatalf("no exp: %+v %v", rc, err)
	}
	for _, bad := range []string{"", "a.b", brokertest.JWT(`{}`, `{"azp":7}`), brokertest.JWT(`{}`, `{"azp":" "}`), brokertest.JWT(`{}`, `[]`)} {
		if _, err := ParseRefreshToken(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestReasons(t *testing.T) {
	for desc, want := range map[string]reason{
		"Invalid refresh token": reasonInvalid, "Token is not active": reasonExpired, "Session not active": reasonSession,
		"Invalid refresh token. Token client and authorized client don't match": reasonClient,
		"Maximum allowed refresh token reuse exceeded":                          reasonReused, "Stale token": reasonReused,
		"Refresh token expired": reasonExpired, "something else": reasonOther,
	} {
		if got := reasonOf(desc); got != want {
			t.Errorf("%q: %v, want %v", desc, got, want)
		}
	}
}

func TestABadAnswerStillHandsBackTheRotatedToken(t *testing.T) {
	next := brokertest.JWT(`{"alg":"HS512"}`, `{"azp":"trade-api-read","typ":"Refresh","exp":4102444800}`)
	sent := brokertest.JWT(`{"alg":"HS512"}`, `{"azp":"trade-api-read","typ":"Refresh","exp":4102444800,"jti":"sent"}`)
	for _, c := range []struct {
		name, body string
		kept       bool
	}{
		{"no expires_in", `{"access_token":"a","refresh_token":"` + next + `"}`, true},
		{"token_type mac", `{"access_token":"a","expires_in":60,"token_type":"mac","refresh_token":"` + next + `"}`, true},
		{"no access token", `{"expires_in":60,"refresh_token":"` + next + `"}`, true},
		{"unreadable new token", `{"expires_in":60,"refresh_token":"garbage"}`, false},
		{"the same token back", `{"expires_in":60,"refresh_token":"` + sent + `"}`, false},
		{"no JSON", `<html>`, false},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(c.body)) }))
		cl, _ := upstream.New(upstream.Options{Broker: display})
		_, err := Provider{}.Issue(context.Background(), provider.Request{BaseURL: srv.URL, Client: cl,
			Secrets: map[string]string{fieldToken: sent}})
		srv.Close()
		var re *provider.RotatedError
		ue, isUpstream := upstream.AsError(err)
		if errors.As(err, &re) != c.kept || !isUpstream || ue.Failure != upstream.BadResponse {
			t.Errorf("%s: %v (rotated kept: %v)", c.name, err, re != nil)
			continue
		}
		if c.kept && (re.Rotated[fieldToken] != next || re.SecretExpiresAt.Unix() != 4102444800) {
			t.Errorf("%s: %+v", c.name, re)
		}
		brokertest.CheckLeak(t, err.Error(), "", sent, next)
	}
}
