package finam

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Fuzz targets for what Finam (or whatever answers in its place) sends back.
// Fuzzed bodies may hold the marker fuzzSecretMarker, replaced by the API
// secret before they are served: a broker that echoes the secret must not
// get it into an error.

const (
	fuzzSecret       = "fz-Finam-7Qx9LmN2pRk4Wv"
	fuzzSecretMarker = "@@SECRET@@"
)

// fuzzJWT is a Finam-shaped JWT: Finam's code reads its claims only.
func fuzzJWT(claims string) string {
	return brokertest.JWT(`{"alg":"HS256","typ":"JWT"}`, claims)
}

// checkUpstreamError holds for every error Finam's code returns.
func checkUpstreamError(t *testing.T, err error, bodyWithoutSecret string) *upstream.Error {
	t.Helper()
	msg := err.Error()
	brokertest.CheckLeak(t, msg, bodyWithoutSecret, fuzzSecret)
	ue, ok := upstream.AsError(err)
	if !ok {
		// Only the local refusals (empty secret) are plain errors.
		t.Fatalf("not an *upstream.Error: %T %v", err, err)
	}
	if ue.Broker != "Finam" || !strings.HasPrefix(msg, "Finam POST /v1/sessions") {
		t.Fatalf("error does not name Finam and the call: %q", msg)
	}
	brokertest.CheckExcerpt(t, msg, ue.Message, ue.Code)
	return ue
}

// FuzzTokenFrom: TokenDetails as the broker sends it. An accepted answer
// yields a token that is alive at receipt, ends no later than the broker
// said, keeps the broker's accounts, and never outlives what the JWT and the
// details agree on.
func FuzzTokenFrom(f *testing.F) {
	now := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	good := `{"created_at":"2026-03-01T10:00:00Z","expires_at":"2026-03-01T10:15:00Z","md_permissions":[{"quote_level":"QUOTE_LEVEL_LAST_PRICE","delay_minutes":0,"mic":"MISX"},{"quote_level":"QUOTE_LEVEL_BEST_BID_OFFER","delay_minutes":15,"worldwide":true}],"account_ids":["1899011","1899012"],"readonly":false}`
	claims := `{"iss":"broker-sandbox/finam","sub":"client-1a2b3c","iat":1772359200,"exp":1772360100}`
	f.Add(good, claims, int64(0))
	f.Add(`{"account_ids":["1899011"],"readonly":true}`, claims, int64(30))
	f.Add(`{"created_at":"2026-03-01T10:00:00.123456789+03:00","expires_at":"2026-03-01T13:15:00.5+03:00"}`, `{}`, int64(-120))
	f.Add(`{"expires_at":"tomorrow"}`, claims, int64(0))
	f.Add(`{"expires_at":"2026-03-01T09:00:00Z"}`, claims, int64(0))
	f.Add(`{"created_at":"2026-03-01T10:20:00Z","expires_at":"2026-03-01T10:15:00Z"}`, claims, int64(0))
	f.Add(`{"md_permissions":[{"quote_level":"X","country":"RU"},{"continent":"EU"},{}]}`, `{"exp":1772360100.9}`, int64(0))
	f.Add(`{"md_permissions":[{"quote_level":1,"mic":"MISX"},{"quote_level":99},{"quote_level":null}]}`, claims, int64(0))
	f.Add(`{}`, `{"exp":"1772360100"}`, int64(0))
	f.Add(`{}`, `null`, int64(0))
	f.Fuzz(func(t *testing.T, details, claims string, skewSec int64) {
		var det Details
		if json.Unmarshal([]byte(details), &det) != nil {
			return // post refuses such a body before tokenFrom sees it
		}
		if skewSec < -86400 || skewSec > 86400 {
			return
		}
		received := now.Add(time.Duration(skewSec) * time.Second)
		jwt := fuzzJWT(claims)
		tok, err := tokenFrom(jwt, det, received)
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			if ue := checkUpstreamError(t, err, details); ue.Failure != upstream.BadResponse {
				t.Fatalf("a bad answer is %v, want bad response", ue.Failure)
			}
			if strings.Contains(err.Error(), jwt) {
				t.Fatalf("error quotes the JWT: %v", err)
			}
			return
		}
		if tok.AccessToken != jwt {
			t.Fatal("access token is not the minted JWT")
		}
		if !tok.ExpiresAt.After(received) {
			t.Fatalf("accepted a token expiring at %v, received %v", tok.ExpiresAt, received)
		}
		if !tok.IssuedAt.Before(tok.ExpiresAt) {
			t.Fatalf("issued %v not before expiry %v", tok.IssuedAt, tok.ExpiresAt)
		}
		// Never later than the broker's expiry, from whichever field it came.
		var brokerExp time.Time
		if det.ExpiresAt != "" {
			brokerExp, _ = time.Parse(time.RFC3339Nano, det.ExpiresAt)
		} else {
			c, _ := provider.JWTClaims(jwt)
			brokerExp, _ = provider.NumericDate(c, "exp")
		}
		if tok.ExpiresAt.After(brokerExp) {
			t.Fatalf("expires %v, after the broker's %v", tok.ExpiresAt, brokerExp)
		}
		if tok.AccountIDs == nil || strings.Join(tok.AccountIDs, "\x00") != strings.Join(det.AccountIDs, "\x00") {
			t.Fatalf("accounts %q, broker said %q", tok.AccountIDs, det.AccountIDs)
		}
		if tok.ReadOnly != det.ReadOnly {
			t.Fatal("readonly flag changed")
		}
		perms, ok := tok.Details["md_permissions"].([]map[string]any)
		if !ok || len(perms) != len(det.MDPermissions) {
			t.Fatalf("md_permissions %v", tok.Details["md_permissions"])
		}
		if _, err := json.Marshal(tok.Details); err != nil {
			t.Fatalf("details are not JSON-friendly: %v", err)
		}
	})
}

// FuzzClassify: any non-2xx answer becomes an error that names Finam and the
// call, never shows the secret, and has the kind its status means.
func FuzzClassify(f *testing.F) {
	f.Add(401, `{"code":16,"message":"Token is expired or invalid","details":[]}`, true)
	f.Add(400, `{"code":3,"message":"secret `+fuzzSecretMarker+` is invalid"}`, true)
	f.Add(400, `{"code":3,"message":"bad token"}`, false)
	f.Add(429, `{"code":8,"message":"Too many requests. Limit: 200 requests per minute"}`, true)
	f.Add(503, `<html><body><h1>503 Service Temporarily Unavailable</h1><hr><center>nginx</center></body></html>`, true)
	f.Add(500, strings.Repeat("x", 190)+fuzzSecretMarker+strings.Repeat("y", 50), true)
	f.Add(500, `{"code":"13","message":"`+strings.Repeat("m", 300)+`"}`, false)
	f.Add(404, `{"code":5,"message":"account 1899013 not found"}`, false)
	f.Add(302, ``, false)
	f.Fuzz(checkClassify)
}

// TestFuzzFindingMessageNotExcerpted: the message of a JSON error body
// (google.rpc.Status) goes into the error whole: unbounded, and with its
// control characters, into Vault's response, the config's last_error and
// the server log. Every other broker text is cut to an excerpt.
func TestFuzzFindingMessageNotExcerpted(t *testing.T) {
	t.Run("long", func(t *testing.T) {
		checkClassify(t, 500, `{"code":"13","message":"`+strings.Repeat("m", 3000)+`"}`, false)
	})
	t.Run("control characters", func(t *testing.T) {
		checkClassify(t, 502, "{\"code\":13,\"message\":\"line one\\nline two\\r\\u0000\"}", true)
	})
}

func checkClassify(t *testing.T, status int, body string, sessions bool) {
	if status < 300 || status > 599 {
		return
	}
	op := "POST " + pathDetails
	if sessions {
		op = "POST " + pathSessions
	}
	call := upstream.Call{Method: http.MethodPost, Op: op, Secrets: []string{fuzzSecret}}
	served := strings.ReplaceAll(body, fuzzSecretMarker, fuzzSecret)
	e := classify(call, &upstream.Response{Status: status, Header: http.Header{}, Body: []byte(served)})
	if e == nil {
		t.Fatal("no error for a non-2xx answer")
	}
	if e.Status != status || e.Op != op {
		t.Fatalf("status/op %d %q", e.Status, e.Op)
	}
	ue := checkUpstreamError(t, e, strings.ReplaceAll(body, fuzzSecretMarker, ""))
	want := upstream.FailureForStatus(status)
	// Every AuthService call answers 400/401 for a dead secret or token.
	if status == http.StatusUnauthorized || status == http.StatusBadRequest {
		want = upstream.Unauthorized
	}
	if ue.Failure != want {
		t.Fatalf("HTTP %d on %s is %v, want %v", status, op, ue.Failure, want)
	}
}

// fuzzServer serves the fuzzed answers of one Issue.
type fuzzServer struct {
	mu                      sync.Mutex
	authStatus, detStatus   int
	authBody, detBody       string
	authCalls, detailsCalls int
}

func (s *fuzzServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var status int
	var body string
	switch r.URL.Path {
	case pathSessions:
		s.authCalls++
		status, body = s.authStatus, s.authBody
	case pathDetails:
		s.detailsCalls++
		status, body = s.detStatus, s.detBody
	default:
		status, body = 404, "no such path"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(strings.ReplaceAll(body, fuzzSecretMarker, fuzzSecret)))
}

// FuzzIssue drives Issue end to end through the real upstream client against
// a server answering with the fuzzed statuses and bodies.
func FuzzIssue(f *testing.F) {
	srv := &fuzzServer{}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	client, err := upstream.New(upstream.Options{Broker: "Finam", MaxAttempts: 1, Timeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	now := time.Now().Unix()
	jwt := fuzzJWT(`{"iat":` + strconv.FormatInt(now, 10) + `,"exp":` + strconv.FormatInt(now+900, 10) + `}`)
	detOK := `{"created_at":"` + time.Unix(now, 0).UTC().Format(time.RFC3339) + `","expires_at":"` + time.Unix(now+900, 0).UTC().Format(time.RFC3339) + `","account_ids":["1899011"],"readonly":true}`
	f.Add(200, `{"token":"`+jwt+`"}`, 200, detOK)
	f.Add(200, `{"token":"`+jwt+`"}`, 200, `{}`)
	f.Add(200, `{"token":""}`, 200, detOK)
	f.Add(200, `{"token":"`+jwt[:20], 200, detOK)
	f.Add(200, `<!DOCTYPE html><html><body>Sign in</body></html>`, 200, detOK)
	f.Add(401, `{"code":16,"message":"Token is expired or invalid"}`, 200, detOK)
	f.Add(200, `{"token":"`+jwt+`"}`, 401, `{"code":16,"message":"`+fuzzSecretMarker+`"}`)
	f.Add(200, `{"token":"`+jwt+`"}`, 503, `upstream connect error`)
	f.Add(200, `{"token":"`+fuzzSecretMarker+`"}`, 200, `{"expires_at":"2020-01-01T00:00:00Z"}`)
	f.Fuzz(func(t *testing.T, authStatus int, authBody string, detStatus int, detBody string) {
		if authStatus < 200 || authStatus > 599 || detStatus < 200 || detStatus > 599 {
			return
		}
		srv.mu.Lock()
		srv.authStatus, srv.authBody, srv.detStatus, srv.detBody = authStatus, authBody, detStatus, detBody
		srv.authCalls, srv.detailsCalls = 0, 0
		srv.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tok, err := New().Issue(ctx, provider.Request{BaseURL: ts.URL, Client: client, Secrets: map[string]string{"secret": fuzzSecret}})
		srv.mu.Lock()
		authCalls := srv.authCalls
		srv.mu.Unlock()
		if authCalls != 1 {
			t.Fatalf("mint called %d times: it must never be retried", authCalls)
		}
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			checkUpstreamError(t, err, strings.ReplaceAll(authBody+detBody, fuzzSecretMarker, ""))
			return
		}
		if authStatus >= 300 || detStatus >= 300 {
			t.Fatalf("succeeded on HTTP %d/%d", authStatus, detStatus)
		}
		if tok.AccessToken == "" || !tok.ExpiresAt.After(time.Now().Add(-time.Second)) {
			t.Fatalf("accepted token %+v", tok)
		}
	})
}
