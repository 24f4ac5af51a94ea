package sandbox

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func post(t *testing.T, url string, body any, header map[string]string) (int, map[string]any) {
	t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", url, bytes.NewReader(b))
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out map[string]any
	_ = json.Unmarshal(raw, &out)
	return resp.StatusCode, out
}

func TestFinamFake(t *testing.T) {
	sb := New(Options{FinamTokenLifetime: time.Minute, FinamRateLimit: 5})
	srv := httptest.NewServer(sb)
	defer srv.Close()

	st, body := post(t, srv.URL+"/v1/sessions", map[string]string{"secret": FinamSecret}, nil)
	if st != 200 || body["token"] == nil {
		t.Fatalf("auth: %d %v", st, body)
	}
	tok := body["token"].(string)
	st, det := post(t, srv.URL+"/v1/sessions/details", map[string]string{"token": tok}, nil)
	if st != 200 {
		t.Fatalf("details: %d %v", st, det)
	}
	created, _ := time.Parse(time.RFC3339Nano, det["created_at"].(string))
	expires, _ := time.Parse(time.RFC3339Nano, det["expires_at"].(string))
	if expires.Sub(created) != time.Minute {
		t.Fatalf("lifetime %v", expires.Sub(created))
	}

	cases := []struct {
		name   string
		path   string
		body   any
		header map[string]string
		status int
		code   float64
	}{
		{"authorization header refused", "/v1/sessions", map[string]string{"secret": FinamSecret}, map[string]string{"Authorization": "x"}, 400, 3},
		{"unknown secret", "/v1/sessions", map[string]string{"secret": "nope"}, nil, 401, 16},
		{"forged token", "/v1/sessions/details", map[string]string{"token": tok[:len(tok)-2] + "xx"}, nil, 401, 16},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st, out := post(t, srv.URL+tc.path, tc.body, tc.header)
			if st != tc.status || out["code"] != tc.code || out["message"] == "" {
				t.Fatalf("%d %v", st, out)
			}
		})
	}

	// Revoking the secret kills its tokens.
	sb.RevokeFinamSecret(FinamSecret)
	if sb.FinamValid(tok) {
		t.Fatal("token of a revoked secret still valid")
	}
	// Rate limit: 5 a minute per method; Auth has had 3 calls so far.
	codes := []int{}
	for range 3 {
		st, _ := post(t, srv.URL+"/v1/sessions", map[string]string{"secret": FinamReadOnlySecret}, nil)
		codes = append(codes, st)
	}
	if codes[0] != 200 || codes[1] != 200 || codes[2] != 429 {
		t.Fatalf("rate limit: %v", codes)
	}
	if sb.Calls("POST /v1/sessions") != 6 {
		t.Fatalf("calls = %d", sb.Calls("POST /v1/sessions"))
	}
}

func TestAdminAPI(t *testing.T) {
	sb := New(Options{})
	srv := httptest.NewServer(sb)
	defer srv.Close()
	for _, c := range []struct {
		path string
		body any
	}{
		{"/_sandbox/finam/secrets", map[string]any{"secret": "mine", "account_ids": []string{"7"}, "readonly": true}},
		{"/_sandbox/settings", map[string]any{"finam_token_lifetime": "2m", "latency": "1ms"}},
		{"/_sandbox/fault", map[string]any{"endpoint": "POST /v1/sessions/details", "status": 503, "count": 1}},
	} {
		if st, _ := post(t, srv.URL+c.path, c.body, nil); st != 204 {
			t.Fatalf("%s: %d", c.path, st)
		}
	}
	st, body := post(t, srv.URL+"/v1/sessions", map[string]string{"secret": "mine"}, nil)
	if st != 200 {
		t.Fatalf("added secret refused: %d", st)
	}
	tok := body["token"].(string)
	if st, out := post(t, srv.URL+"/v1/sessions/details", map[string]string{"token": tok}, nil); st != 503 || out["code"] != float64(14) {
		t.Fatalf("fault not injected: %d %v", st, out)
	}
	st, det := post(t, srv.URL+"/v1/sessions/details", map[string]string{"token": tok}, nil)
	if st != 200 || det["readonly"] != true {
		t.Fatalf("after the fault: %d %v", st, det)
	}
	resp, _ := http.Get(srv.URL + "/_sandbox/calls")
	var calls map[string]int
	json.NewDecoder(resp.Body).Decode(&calls)
	resp.Body.Close()
	if calls["POST /v1/sessions/details"] != 2 || calls["POST /v1/sessions"] != 1 {
		t.Fatalf("calls = %v", calls)
	}
	if st, _ := post(t, srv.URL+"/_sandbox/settings", map[string]any{"bogus": 1}, nil); st != 400 {
		t.Fatalf("unknown admin field accepted: %d", st)
	}
}

// TestFinamVariants: the fake sends what Finam may (docs/finam.md), not
// only the easy form: quote_level as a number on request, empty lists and
// false flags left out (proto3 JSON), and the presented secret echoed in a
// 401.
func TestFinamVariants(t *testing.T) {
	sb := New(Options{})
	srv := httptest.NewServer(sb)
	defer srv.Close()
	sb.AddFinamSecret("no-accounts", nil, false)
	cases := []struct {
		name      string
		secret    string
		numeric   bool
		level     any
		accounts  bool
		readonly  bool
		adminBody map[string]any
	}{
		{name: "names", secret: FinamSecret, level: "QUOTE_LEVEL_LAST_PRICE", accounts: true},
		{name: "numbers", secret: FinamSecret, numeric: true, level: float64(1), accounts: true},
		{name: "numbers through the admin API", secret: FinamSecret, level: float64(1), accounts: true,
			adminBody: map[string]any{"finam_numeric_quote_level": true}},
		{name: "no accounts: field left out", secret: "no-accounts", level: "QUOTE_LEVEL_LAST_PRICE"},
		{name: "read-only flag sent when true", secret: FinamReadOnlySecret, level: "QUOTE_LEVEL_LAST_PRICE", accounts: true, readonly: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sb.SetFinamNumericQuoteLevel(tc.numeric)
			if tc.adminBody != nil {
				if st, _ := post(t, srv.URL+"/_sandbox/settings", tc.adminBody, nil); st != 204 {
					t.Fatalf("admin: %d", st)
				}
			}
			_, auth := post(t, srv.URL+"/v1/sessions", map[string]string{"secret": tc.secret}, nil)
			st, det := post(t, srv.URL+"/v1/sessions/details", map[string]string{"token": auth["token"].(string)}, nil)
			if st != 200 {
				t.Fatalf("details: %d %v", st, det)
			}
			perms := det["md_permissions"].([]any)
			if got := perms[0].(map[string]any)["quote_level"]; got != tc.level {
				t.Errorf("quote_level %#v, want %#v", got, tc.level)
			}
			if _, ok := det["account_ids"]; ok != tc.accounts {
				t.Errorf("account_ids present = %v, want %v", ok, tc.accounts)
			}
			if _, ok := det["readonly"]; ok != tc.readonly {
				t.Errorf("readonly present = %v, want %v", ok, tc.readonly)
			}
		})
	}
	for _, c := range []struct{ path, field, value string }{
		{"/v1/sessions", "secret", "revoked-or-unknown-secret"},
		{"/v1/sessions/details", "token", "not.a.token"},
	} {
		st, out := post(t, srv.URL+c.path, map[string]string{c.field: c.value}, nil)
		if msg, _ := out["message"].(string); st != 401 || !strings.Contains(msg, c.value) {
			t.Errorf("%s: %d %v: the presented value is not echoed", c.path, st, out)
		}
	}
}
