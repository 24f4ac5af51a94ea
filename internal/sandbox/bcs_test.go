package sandbox

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

func newBCSTest(t *testing.T) (*Server, *httptest.Server, *testClock) {
	t.Helper()
	clk := &testClock{t: time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)}
	s := New(Options{Now: clk.now})
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv, clk
}

type bcsReply struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

func bcsExchange(t *testing.T, base string, form url.Values) bcsReply {
	t.Helper()
	resp, err := http.PostForm(base+bcsTokenPath, form)
	if err != nil {
		t.Fatal(err)
	}
	return bcsRead(t, resp)
}

func bcsRead(t *testing.T, resp *http.Response) bcsReply {
	t.Helper()
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	r := bcsReply{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	_ = json.Unmarshal(raw, &r.body)
	return r
}

func bcsForm(client, token string) url.Values {
	return url.Values{"grant_type": {"refresh_token"}, "client_id": {client}, "refresh_token": {token}}
}

func bcsClaims(t *testing.T, tok string) map[string]any {
	t.Helper()
	c, err := bcsVerify(tok)
	if err != nil {
		t.Fatalf("not a token of the fake: %v", err)
	}
	return c
}

func TestBCSExchangeIssuesAPairWithTheSameSessionAndExpiry(t *testing.T) {
	s, srv, clk := newBCSTest(t)
	rt := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true})
	rc := bcsClaims(t, rt)
	if rc["exp"].(float64)-rc["iat"].(float64) != 7776000 || rc["typ"] != "Refresh" || rc["azp"] != BCSClientRead ||
		!strings.HasSuffix(rc["sub"].(string), ":"+BCSAgreement) || rc["iss"] != bcsIssuer || rc["aud"] != bcsIssuer {
		t.Fatalf("refresh claims: %v", rc)
	}
	clk.advance(time.Hour)
	r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt))
	if r.status != 200 || r.header.Get("Cache-Control") != "no-store" {
		t.Fatalf("exchange: %d %s", r.status, r.raw)
	}
	if r.body["expires_in"] != float64(86400) || r.body["token_type"] != "Bearer" || r.body["session_state"] != rc["sid"] ||
		r.body["scope"] != "openid" || r.body["refresh_expires_in"] != float64(7776000-3600) {
		t.Fatalf("body: %v", r.body)
	}
	nc := bcsClaims(t, r.body["refresh_token"].(string))
	if nc["sid"] != rc["sid"] || nc["exp"] != rc["exp"] || nc["azp"] != rc["azp"] || nc["jti"] == rc["jti"] {
		t.Fatalf("the new refresh token is not of the same session and expiry: %v vs %v", nc, rc)
	}
	ac := bcsClaims(t, r.body["access_token"].(string))
	if ac["typ"] != "Bearer" || ac["azp"] != BCSClientRead || ac["sid"] != rc["sid"] {
		t.Fatalf("access claims: %v", ac)
	}
	// The token sent stays valid by default.
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt)); r.status != 200 {
		t.Fatalf("the old token was retired: %d %s", r.status, r.raw)
	}
	if got := s.BCSIssuedRefreshTokens(); len(got) != 3 || got[0] != rt || got[1] != r.body["refresh_token"] {
		t.Fatalf("issued tokens recorded: %d", len(got))
	}
	if s.Calls(BCSTokenEP) != 2 || s.BCSPresented(rt) != 2 {
		t.Fatalf("counters: %d %d", s.Calls(BCSTokenEP), s.BCSPresented(rt))
	}
}

func TestBCSCheckOrderAndDescriptions(t *testing.T) {
	s, srv, clk := newBCSTest(t)
	read := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true})
	write := s.IssueBCSToken(BCSTokenOptions{})
	expired := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true, IssuedAt: clk.now().Add(-91 * 24 * time.Hour)})
	deleted := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true})
	s.DeleteBCSToken(deleted)
	tampered := read[:len(read)-3] + "AAA"
	for _, c := range []struct {
		name          string
		form          url.Values
		status        int
		code, message string
	}{
		{"unknown client first", bcsForm("tradeapi", expired), 401, "invalid_client", "Invalid client or Invalid client credentials"},
		{"garbage", bcsForm(BCSClientRead, "garbage"), 400, "invalid_grant", BCSInvalidToken},
		{"tampered", bcsForm(BCSClientRead, tampered), 400, "invalid_grant", BCSInvalidToken},
		{"empty", bcsForm(BCSClientRead, ""), 400, "invalid_grant", BCSInvalidToken},
		{"expired before the client check", bcsForm(BCSClientWrite, expired), 400, "invalid_grant", BCSNotActive},
		{"read token as write", bcsForm(BCSClientWrite, read), 400, "invalid_grant", BCSClientMismatch},
		{"write token as read", bcsForm(BCSClientRead, write), 400, "invalid_grant", BCSClientMismatch},
		{"deleted", bcsForm(BCSClientRead, deleted), 400, "invalid_grant", BCSSessionGone},
		{"no grant_type", url.Values{"client_id": {BCSClientRead}, "refresh_token": {read}}, 400, "invalid_request", "Missing form parameter: grant_type"},
		{"other grant", url.Values{"grant_type": {"password"}, "client_id": {BCSClientRead}}, 400, "unsupported_grant_type", "Unsupported grant_type"},
		{"twice", url.Values{"grant_type": {"refresh_token"}, "client_id": {BCSClientRead, BCSClientRead}, "refresh_token": {read}}, 400, "invalid_request", "duplicated parameter: client_id"},
	} {
		r := bcsExchange(t, srv.URL, c.form)
		if r.status != c.status || r.body["error"] != c.code || r.body["error_description"] != c.message {
			t.Errorf("%s: %d %s", c.name, r.status, r.raw)
		}
	}
	// A JSON body has no form parameters.
	resp, err := http.Post(srv.URL+bcsTokenPath, "application/json", strings.NewReader(`{"grant_type":"refresh_token"}`))
	if err != nil {
		t.Fatal(err)
	}
	if r := bcsRead(t, resp); r.status != 400 || r.body["error"] != "invalid_request" {
		t.Fatalf("JSON body: %d %s", r.status, r.raw)
	}
	if st := s.BCSStats(); st.ClientMismatches != 3 {
		t.Fatalf("client mismatches counted: %+v", st)
	}
}

func TestBCSRevokeOnUseRetiresTheTokenSent(t *testing.T) {
	s, srv, _ := newBCSTest(t)
	s.SetBCSRevokeOnUse(true)
	rt := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true})
	r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt))
	if r.status != 200 {
		t.Fatalf("first use: %d %s", r.status, r.raw)
	}
	if again := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt)); again.status != 400 || again.body["error_description"] != BCSReused {
		t.Fatalf("second use: %d %s", again.status, again.raw)
	}
	next := r.body["refresh_token"].(string)
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, next)); r.status != 200 {
		t.Fatalf("the rotated token: %d %s", r.status, r.raw)
	}
	if st := s.BCSStats(); st.Reuses != 1 || st.MaxPresented != 2 {
		t.Fatalf("stats: %+v", st)
	}
	// A refused token alone fails while its session works.
	s.SetBCSRevokeOnUse(false)
	other := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true})
	s.RefuseBCSToken(rt)
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt)); r.body["error_description"] != BCSInvalidToken {
		t.Fatalf("refused token: %s", r.raw)
	}
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, other)); r.status != 200 {
		t.Fatalf("another token: %s", r.raw)
	}
}

func TestBCSAccessTokenIsCappedAtTheSessionEnd(t *testing.T) {
	s, srv, clk := newBCSTest(t)
	rt := s.IssueBCSToken(BCSTokenOptions{Expires: clk.now().Add(2 * time.Hour), IssuedAt: clk.now().Add(-89 * 24 * time.Hour)})
	r := bcsExchange(t, srv.URL, bcsForm(BCSClientWrite, rt))
	if r.status != 200 || r.body["expires_in"] != float64(7200) || r.body["refresh_expires_in"] != float64(7200) {
		t.Fatalf("last day: %d %s", r.status, r.raw)
	}
}

func bcsGet(t *testing.T, rawURL, auth string) bcsReply {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, rawURL, nil)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return bcsRead(t, resp)
}

func TestBCSPortfolioAndRevocationLag(t *testing.T) {
	s, srv, clk := newBCSTest(t)
	read := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true, Agreement: BCSOtherAgreement})
	write := s.IssueBCSToken(BCSTokenOptions{})
	ra := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, read)).body["access_token"].(string)
	wa := bcsExchange(t, srv.URL, bcsForm(BCSClientWrite, write)).body["access_token"].(string)

	r := bcsGet(t, srv.URL+bcsPortfolioPath, "Bearer "+ra)
	var positions []map[string]any
	if err := json.Unmarshal([]byte(r.raw), &positions); err != nil || r.status != 200 || len(positions) != 3 || positions[0]["agreementId"] != BCSOtherAgreement {
		t.Fatalf("portfolio: %d %s", r.status, r.raw)
	}
	for _, auth := range []string{"", "Bearer nope", "Bearer " + read} {
		if r := bcsGet(t, srv.URL+bcsPortfolioPath, auth); r.status != 401 || r.raw != "" || !strings.Contains(r.header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Fatalf("bad bearer %q: %d %q %v", auth, r.status, r.raw, r.header)
		}
	}
	s.SetBCSWrapPortfolio(true)
	if r := bcsGet(t, srv.URL+bcsPortfolioPath, "Bearer "+wa); !strings.HasPrefix(r.raw, `{"positions":[`) {
		t.Fatalf("wrapped: %s", r.raw)
	}
	s.SetBCSEmptyPortfolio(true)
	if r := bcsGet(t, srv.URL+bcsPortfolioPath, "Bearer "+wa); r.raw != "{\"positions\":[]}\n" {
		t.Fatalf("empty: %q", r.raw)
	}
	// Deleting in the web terminal: the trade token's access token dies,
	// the read-only one's lives to its end.
	s.DeleteBCSToken(read)
	s.DeleteBCSToken(write)
	if !s.BCSAccessValid(ra) || s.BCSAccessValid(wa) {
		t.Fatal("revocation lag not modelled")
	}
	if r := bcsGet(t, srv.URL+bcsPortfolioPath, "Bearer "+wa); r.status != 401 {
		t.Fatalf("deleted trade token's access: %d", r.status)
	}
	clk.advance(24 * time.Hour)
	if s.BCSAccessValid(ra) {
		t.Fatal("an access token outlived its 24 hours")
	}
}

func TestBCSRateLimitAndOrders(t *testing.T) {
	s, srv, clk := newBCSTest(t)
	read := s.IssueBCSToken(BCSTokenOptions{ReadOnly: true})
	ra := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, read)).body["access_token"].(string)
	for i := 0; i < 10; i++ {
		if r := bcsGet(t, srv.URL+bcsPortfolioPath, "Bearer "+ra); r.status != 200 {
			t.Fatalf("call %d: %d", i, r.status)
		}
	}
	if r := bcsGet(t, srv.URL+bcsPortfolioPath, "Bearer "+ra); r.status != 429 || r.body["type"] != "RESOURCE_EXHAUSTED" {
		t.Fatalf("11th call in a second: %d %s", r.status, r.raw)
	}
	clk.advance(time.Second)
	req, _ := http.NewRequest(http.MethodPost, srv.URL+bcsOrdersPath, strings.NewReader(`{}`))
	req.Header.Set("Authorization", "Bearer "+ra)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if r := bcsRead(t, resp); r.status != 403 || r.body["type"] != "FORBIDDEN" {
		t.Fatalf("order with a read-only token: %d %s", r.status, r.raw)
	}
}

func TestBCSAdminAPI(t *testing.T) {
	s, srv, _ := newBCSTest(t)
	post := func(path, body string) bcsReply {
		resp, err := http.Post(srv.URL+path, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		return bcsRead(t, resp)
	}
	r := post("/_sandbox/bcs/tokens", `{"readonly":true,"agreement":"400777"}`)
	rt, _ := r.body["refresh_token"].(string)
	if c := bcsClaims(t, rt); c["azp"] != BCSClientRead || !strings.HasSuffix(c["sub"].(string), ":400777") {
		t.Fatalf("issued: %v", c)
	}
	if r := post("/_sandbox/bcs/settings", `{"revoke_on_use":true,"access_lifetime":"1h"}`); r.status != 204 {
		t.Fatalf("settings: %d %s", r.status, r.raw)
	}
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt)); r.body["expires_in"] != float64(3600) {
		t.Fatalf("lifetime: %s", r.raw)
	}
	bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt))
	if r := post("/_sandbox/bcs/revoke", `{"refresh_token":"`+rt+`"}`); r.status != 204 {
		t.Fatalf("revoke: %d", r.status)
	}
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientRead, rt)); r.body["error_description"] != BCSSessionGone {
		t.Fatalf("after revoke: %s", r.raw)
	}
	st := bcsGet(t, srv.URL+"/_sandbox/bcs/stats", "")
	if st.body["reuses"] != float64(1) || st.body["max_presented"] != float64(3) {
		t.Fatalf("stats: %s", st.raw)
	}
	exp := post("/_sandbox/bcs/tokens", `{"expires_at":"2026-01-01T00:00:00Z"}`).body["refresh_token"].(string)
	if r := bcsExchange(t, srv.URL, bcsForm(BCSClientWrite, exp)); r.body["error_description"] != BCSNotActive {
		t.Fatalf("expired: %s", r.raw)
	}
	// Tokens of BCSToken (the real clock) are valid on any sandbox.
	if c := bcsClaims(t, BCSToken(BCSTokenOptions{})); c["azp"] != BCSClientWrite {
		t.Fatal(c)
	}
	_ = s
}
