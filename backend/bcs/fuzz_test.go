package bcs

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Fuzz targets for what BCS's token endpoint and portfolio service (or
// whatever answers in their place) send back, and for the refresh token
// an operator writes. Fuzzed bodies may hold the markers below, replaced by
// the tokens before they are served: an echo must never reach an error.

const (
	fuzzNewestMarker  = "@@NEWEST@@"
	fuzzWrittenMarker = "@@WRITTEN@@"
)

var (
	fuzzNewest  = brokertest.JWT(`{"alg":"HS512","typ":"JWT"}`, `{"azp":"trade-api-read","typ":"Refresh","sid":"fz-sid","jti":"fz-Newest-9Qw2","exp":4102444800}`)
	fuzzWritten = brokertest.JWT(`{"alg":"HS512","typ":"JWT"}`, `{"azp":"trade-api-read","typ":"Refresh","sid":"fz-sid","jti":"fz-Written-4Tk7","exp":4102444800}`)
)

func served(body string) string {
	return strings.NewReplacer(fuzzNewestMarker, fuzzNewest, fuzzWrittenMarker, fuzzWritten).Replace(body)
}

func unmarked(body string) string {
	return strings.NewReplacer(fuzzNewestMarker, "", fuzzWrittenMarker, "").Replace(body)
}

// FuzzParseTokenResponse: any body either parses into a positive, bounded
// lifetime and a non-empty access token, or fails without quoting it.
func FuzzParseTokenResponse(f *testing.F) {
	for _, s := range []string{
		`{"access_token":"a.b.c","expires_in":86400,"refresh_expires_in":3697433,"refresh_token":"` + fuzzNewestMarker + `","token_type":"Bearer","not-before-policy":0,"session_state":"x","scope":"openid"}`,
		`{"access_token":"a","expires_in":"86400","token_type":"bearer","not-before-policy":"0"}`,
		`{"access_token":"a","expires_in":-1}`, `{"access_token":"a","expires_in":"NaN"}`, `{"access_token":"a","expires_in":1e400}`,
		`{"access_token":"` + fuzzWrittenMarker + `","expires_in":[]}`, `{"refresh_token":{}}`, `[]`, `null`, `"x"`, ``,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		got, err := ParseTokenResponse([]byte(served(body)))
		if err != nil {
			if got != nil {
				t.Fatal("answer and error")
			}
			brokertest.CheckLeak(t, err.Error(), unmarked(body), fuzzNewest, fuzzWritten)
			return
		}
		if got.AccessToken == "" || got.ExpiresIn <= 0 || got.ExpiresIn > maxSeconds*time.Second || got.RefreshExpiresIn < 0 {
			t.Fatalf("accepted %+v from %q", got, body)
		}
	})
}

// FuzzParsePortfolio: accounts are distinct, bounded, printable and short,
// and never nil on success.
func FuzzParsePortfolio(f *testing.F) {
	for _, s := range []string{
		`[{"agreementId":"400123","account":"400123-MS","ticker":"SBER"}]`, `{"positions":[{"agreementId":1}]}`,
		`{"x":[{"agreementId":"1"}],"y":[{"agreementId":"2"}]}`, `[{"agreementId":"` + strings.Repeat("9", 70) + `"}]`,
		`[1,"a",null,[],{}]`, `{}`, `[]`, `null`, ` [ ] `,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		p, err := ParsePortfolio([]byte(body))
		if err != nil {
			if strings.Contains(err.Error(), body) && len(body) > 8 {
				t.Fatalf("error quotes the body: %v", err)
			}
			return
		}
		if p.Agreements == nil || len(p.Agreements) > maxAccounts || len(p.Accounts) > maxAccounts {
			t.Fatalf("portfolio %+v", p)
		}
		for _, list := range [][]string{p.Agreements, p.Accounts} {
			seen := map[string]bool{}
			for _, a := range list {
				if a == "" || len(a) > 64 || seen[a] || strings.ContainsFunc(a, func(r rune) bool { return r < 0x20 }) {
					t.Fatalf("account %q in %+v", a, p)
				}
				seen[a] = true
			}
		}
	})
}

// FuzzParseRefreshToken: a token is accepted only with a non-blank azp,
// and no error (the one a config write shows) quotes any of it.
func FuzzParseRefreshToken(f *testing.F) {
	for _, s := range []string{
		`{"azp":"trade-api-read","exp":1773815757,"typ":"Refresh"}`, `{"azp":"trade-api-write"}`, `{"azp":""}`,
		`{"azp":"x","exp":-5}`, `{"azp":"x","exp":1e30}`, `{"azp":["x"]}`, `null`, `[]`, `{`,
	} {
		f.Add(s, true)
	}
	f.Add("eyJh**********lCGA", false)
	f.Fuzz(func(t *testing.T, claims string, asJWT bool) {
		tok := claims
		if asJWT {
			tok = brokertest.JWT(`{"alg":"HS512"}`, claims)
		}
		rc, err := ParseRefreshToken(tok)
		_, serr := SecretExpiry(map[string]string{fieldToken: tok})
		if (err == nil) != (serr == nil) {
			t.Fatalf("ParseRefreshToken %v, SecretExpiry %v", err, serr)
		}
		if err != nil {
			if len(tok) >= 8 {
				brokertest.CheckLeak(t, serr.Error(), "", tok)
			}
			if !strings.HasPrefix(serr.Error(), "refresh_token: ") {
				t.Fatalf("does not name the field: %v", serr)
			}
			return
		}
		if strings.TrimSpace(rc.Azp) == "" || (!rc.Expires.IsZero() && rc.Expires.Year() > 9999) {
			t.Fatalf("accepted %+v", rc)
		}
	})
}

// FuzzExchange serves a fuzzed answer of any status at the token endpoint
// (and a fixed portfolio), through Issue with a rotated token and the
// written one: no error shows either token, an error quotes BCS only as an
// excerpt, the four invalid_grant answers and only they (with
// invalid_client) are the secret refused, and at most one fallback is made.
func FuzzExchange(f *testing.F) {
	ok := `{"access_token":"a.b.c","expires_in":86400,"refresh_token":"` + fuzzNewestMarker + `","token_type":"Bearer"}`
	for _, s := range []struct {
		status int
		body   string
	}{
		{200, ok}, {200, `{"access_token":"x","expires_in":60,"refresh_token":"not-a-jwt"}`},
		{400, `{"error":"invalid_grant","error_description":"Invalid refresh token"}`},
		{400, `{"error":"invalid_grant","error_description":"Token is not active"}`},
		{400, `{"error":"invalid_grant","error_description":"Session not active"}`},
		{400, `{"error":"invalid_grant","error_description":"Invalid refresh token. Token client and authorized client don't match"}`},
		{400, `{"error":"invalid_grant","error_description":"bad token ` + fuzzNewestMarker + `"}`},
		{401, `{"error":"invalid_client","error_description":"` + fuzzWrittenMarker + `"}`},
		{400, `{"error":"` + strings.Repeat("e", 300) + fuzzNewestMarker + `"}`},
		{429, `{"type":"RESOURCE_EXHAUSTED"}`}, {503, `<html>` + fuzzWrittenMarker}, {500, ``}, {302, ``},
	} {
		f.Add(s.status, s.body)
	}
	// One server and client for every input: the answer is set per input
	// (a worker runs its inputs one at a time).
	var mu sync.Mutex
	var answerStatus, calls int
	var answerBody string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == PathPortfolio {
			w.Write([]byte(`[{"agreementId":"1"}]`))
			return
		}
		mu.Lock()
		calls++
		status, body := answerStatus, answerBody
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		w.Write([]byte(served(body)))
	}))
	f.Cleanup(srv.Close)
	cl, _ := upstream.New(upstream.Options{Broker: display, MaxAttempts: 1})
	f.Cleanup(cl.Close)
	f.Fuzz(func(t *testing.T, status int, body string) {
		if status < 200 || status > 599 {
			return
		}
		mu.Lock()
		answerStatus, answerBody, calls = status, body, 0
		mu.Unlock()
		tok, err := Provider{}.Issue(context.Background(), provider.Request{
			BaseURL: srv.URL, Client: cl,
			Secrets: map[string]string{fieldToken: fuzzNewest}, Written: map[string]string{fieldToken: fuzzWritten},
		})
		mu.Lock()
		n := calls
		mu.Unlock()
		if n > 2 {
			t.Fatalf("%d exchanges", n)
		}
		if err == nil {
			if tok.AccessToken == "" || !tok.ExpiresAt.After(tok.IssuedAt) {
				t.Fatalf("token %+v", tok)
			}
			return
		}
		msg := err.Error()
		brokertest.CheckLeak(t, msg, unmarked(body), fuzzNewest, fuzzWritten)
		ue, isUpstream := upstream.AsError(err)
		if !isUpstream {
			var le *localError
			if !errors.As(err, &le) {
				t.Fatalf("unexpected error %T: %v", err, err)
			}
			return
		}
		brokertest.CheckExcerpt(t, ue.Error(), ue.Message, ue.Code)
		if !strings.HasPrefix(msg, "BCS ") {
			t.Fatalf("error does not name BCS: %q", msg)
		}
		if ue.Failure == upstream.Unauthorized && ue.Op == opToken && (ue.Status < 400 || ue.Status >= 500) {
			t.Fatalf("HTTP %d taken as a refusal: %v", ue.Status, err)
		}
		if ue.Status >= 500 && ue.Failure != upstream.Unavailable {
			t.Fatalf("HTTP %d not transient: %v", ue.Status, err)
		}
	})
}
