package tinvest

import (
	"bytes"
	"context"
	"encoding/json"
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

// Fuzz targets for what the T-Invest REST gateway (or whatever answers in its
// place) sends back. Fuzzed bodies and headers may hold fuzzTokenMarker,
// replaced by the token before they are served: a gateway that echoes the
// token must not get it into an error.

const (
	fuzzToken       = "t.FzTinvest9QmX2LrP7kWv4NzB"
	fuzzTokenMarker = "@@TOKEN@@"
)

func checkError(t *testing.T, err error, without string) *upstream.Error {
	t.Helper()
	msg := err.Error()
	brokertest.CheckLeak(t, msg, without, fuzzToken)
	ue, ok := upstream.AsError(err)
	if !ok {
		t.Fatalf("not an *upstream.Error: %T %v", err, err)
	}
	if ue.Broker != display || !strings.HasPrefix(msg, "T-Invest POST UsersService/") {
		t.Fatalf("error does not name T-Invest and the call: %q", msg)
	}
	brokertest.CheckExcerpt(t, msg, ue.Message, ue.Code)
	return ue
}

// FuzzClassify: an error answer's kind follows T-Invest's own code first and
// the HTTP status second, and nothing the gateway says (message, code,
// x-tracking-id) carries the token into the error.
func FuzzClassify(f *testing.F) {
	f.Add(401, `{"code":16,"message":"authentication token is missing or invalid","description":"40003"}`, "trk-1", false)
	f.Add(401, `{"code":16,"message":"authentication token is missing or invalid","description":40003}`, "", true)
	f.Add(400, `{"code":16,"message":"x","description":40003}`, "", false)
	f.Add(403, `{"code":7,"message":"insufficient privileges","description":"40002"}`, "", false)
	f.Add(429, `{"code":8,"message":"request limit exceeded","description":"80002"}`, "", false)
	f.Add(500, `{"code":13,"message":"internal error"}`, "", false)
	f.Add(502, `<html><body><h1>502 Bad Gateway</h1></body></html>`, "", false)
	f.Add(401, `{"code":16,"message":"token `+fuzzTokenMarker+` is invalid","description":"40003"}`, "id-"+fuzzTokenMarker, false)
	f.Add(401, `{"code":16,"message":"`+strings.Repeat("x", 180)+fuzzTokenMarker+`","description":"40003"}`, "", false)
	f.Add(503, `{"code":14,"message":"a\nb","description":{"a":1}}`, "trk\r\n2", false)
	f.Add(404, ``, "", false)
	f.Add(403, "{\"desCription\":\""+strings.Repeat("\xc3", 21)+"00\"}", "0", false) // invalid UTF-8 grows when quoted
	f.Fuzz(checkClassify)
}

// TestFuzzFindingCodeNotScrubbed: the gateway's `description` becomes the
// error's code as sent: not scrubbed and not cut. A gateway (or a proxy in
// its place) that echoes the token there puts the T-Invest token into the
// creds error, the config's last_error and the server log.
func TestFuzzFindingCodeNotScrubbed(t *testing.T) {
	checkClassify(t, 401, `{"code":16,"message":"no","description":"`+fuzzTokenMarker+`"}`, "", false)
}

func checkClassify(t *testing.T, status int, body, tracking string, sandbox bool) {
	if status < 300 || status > 599 {
		return
	}
	env := EnvProduction
	if sandbox {
		env = EnvSandbox
	}
	h := http.Header{}
	if tr := strings.ReplaceAll(tracking, fuzzTokenMarker, fuzzToken); tr != "" {
		h.Set("x-tracking-id", tr)
	}
	call := upstream.Call{Method: http.MethodPost, Op: opGetInfo, Secrets: []string{fuzzToken}}
	served := strings.ReplaceAll(body, fuzzTokenMarker, fuzzToken)
	e := classify(call, env, &upstream.Response{Status: status, Header: h, Body: []byte(served)})
	if e == nil {
		t.Fatal("no error for a non-2xx answer")
	}
	without := strings.ReplaceAll(body+tracking, fuzzTokenMarker, "")
	ue := checkError(t, e, without)
	if ue.Status != status {
		t.Fatalf("status %d became %d", status, ue.Status)
	}
	// The expected kind, from the code the body carries (if any) and
	// then the status.
	var eb errorBody
	code := ""
	if json.Unmarshal([]byte(served), &eb) == nil && (eb.Message != "" || eb.Code != "" || eb.Description != "") {
		code = string(eb.Description)
	}
	want := upstream.FailureForStatus(status)
	switch {
	case code == codeUnauthenticated || (code != codeNoPrivileges && code != codeRateLimited && status == 401):
		want = upstream.Unauthorized
	case code == codeNoPrivileges || (code != codeRateLimited && status == 403):
		want = upstream.Rejected
	case code == codeRateLimited || status == 429:
		want = upstream.RateLimited
	case status >= 500:
		want = upstream.Unavailable
	}
	if ue.Failure != want {
		t.Fatalf("HTTP %d code %q is %v, want %v", status, code, ue.Failure, want)
	}
	if ue.Failure == upstream.Unauthorized && !strings.Contains(ue.Hint, env) {
		t.Fatalf("auth hint does not mention the %s environment: %q", env, ue.Hint)
	}
}

// FuzzTokenFrom: GetInfo and GetAccounts answers as the gateway sends them.
// decodeJSON takes exactly one JSON object; an accepted pair yields a token
// whose read-only flag is proven by every reachable account being read-only
// (require_readonly must never pass on a guess), whose accounts are exactly
// the reachable ones, and whose kind agrees with both.
func FuzzTokenFrom(f *testing.F) {
	f.Add(`{"premStatus":false,"qualStatus":false,"qualifiedForWorkWith":["bond"],"tariff":"investor","userId":"8f4b2c1e","riskLevelCode":"1"}`,
		`{"accounts":[{"id":"2000000001","type":"ACCOUNT_TYPE_TINKOFF","name":"Брокерский счёт","status":"ACCOUNT_STATUS_OPEN","openedDate":"2021-03-01T00:00:00Z","closedDate":"1970-01-01T00:00:00Z","accessLevel":"ACCOUNT_ACCESS_LEVEL_FULL_ACCESS"}]}`, false)
	f.Add(`{"tariff":"trader","userId":"u1"}`,
		`{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"},{"id":"2","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"}]}`, false)
	f.Add(`{}`, `{"accounts":[{"id":"1","type":2,"status":2,"accessLevel":2},{"id":"2","accessLevel":3}]}`, false)
	f.Add(`{}`, `{"accounts":[{"id":"1","accessLevel":"account_access_level_read_only"}]}`, false)
	f.Add(`{}`, `{"accounts":[{"id":"1","accessLevel":"2.0"}]}`, false)
	f.Add(`{}`, `{"accounts":[{"id":"1","accessLevel":" 2"}]}`, false)
	f.Add(`{}`, `{"accounts":[{"id":"1","accessLevel":"+2"}]}`, false)
	f.Add(`{}`, `{"accounts":[{"id":"1"}]}`, true)
	f.Add(`{}`, `{"accounts":[{"accessLevel":1}]}`, false)
	f.Add(`{}`, `{}`, false)
	f.Add(`null`, `[]`, false)
	f.Add(`{"tariff":"inv`, `{}`, false)
	f.Add(`{} {}`, `{}`, false)
	f.Add(`{"accounts":null}`, `{"accounts":[{"id":"1","openedDate":"not a date","closedDate":"2023-03-31T00:00:00Z","accessLevel":null}]}`, false)
	f.Fuzz(func(t *testing.T, infoBody, acctsBody string, sandbox bool) {
		var info getInfoResponse
		var accts getAccountsResponse
		infoErr := decodeJSON([]byte(infoBody), &info)
		acctsErr := decodeJSON([]byte(acctsBody), &accts)
		for _, c := range []struct {
			body string
			err  error
		}{{infoBody, infoErr}, {acctsBody, acctsErr}} {
			trimmed := bytes.TrimSpace([]byte(c.body))
			if c.err == nil && (len(trimmed) == 0 || trimmed[0] != '{' || !json.Valid(trimmed)) {
				t.Fatalf("decodeJSON accepted %q, which is not one JSON object", c.body)
			}
		}
		if infoErr != nil || acctsErr != nil {
			return
		}
		env := EnvProduction
		if sandbox {
			env = EnvSandbox
		}
		now := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
		tok, err := tokenFrom(fuzzToken, env, info, accts, now)
		if err != nil {
			checkError(t, err, acctsBody)
			if !slices.ContainsFunc(accts.Accounts, func(a account) bool { return a.ID == "" }) {
				t.Fatalf("refused accounts that all have ids: %v", err)
			}
			return
		}
		if tok.AccessToken != fuzzToken || !tok.ExpiresAt.IsZero() || !tok.IssuedAt.Equal(now) {
			t.Fatalf("token %q issued %v expires %v", tok.AccessToken, tok.IssuedAt, tok.ExpiresAt)
		}
		var reach []string
		readOnly, other := 0, 0
		for _, a := range accts.Accounts {
			level := a.AccessLevel.enum(accessLevels)
			if level == AccessNone {
				continue
			}
			reach = append(reach, a.ID)
			if level == AccessReadOnly {
				readOnly++
			} else {
				other++
			}
		}
		// Proven only by an account READ_ONLY and none anything else.
		provenReadOnly := readOnly > 0 && other == 0
		if reach == nil {
			reach = []string{}
		}
		if !slices.Equal(tok.AccountIDs, reach) {
			t.Fatalf("accounts %q, reachable %q", tok.AccountIDs, reach)
		}
		if tok.ReadOnly != provenReadOnly {
			t.Fatalf("readonly=%v but the accounts prove %v (%s)", tok.ReadOnly, provenReadOnly, acctsBody)
		}
		kind := tok.Details["token_kind"]
		switch {
		case sandbox:
			if kind != TokenSandbox {
				t.Fatalf("sandbox token of kind %v", kind)
			}
		case kind == TokenReadOnly && !tok.ReadOnly, kind == TokenFullAccess && tok.ReadOnly, kind == TokenUnknown && (tok.ReadOnly || len(reach) > 0):
			t.Fatalf("kind %v contradicts readonly=%v", kind, tok.ReadOnly)
		}
		if ev, _ := tok.Details["readonly_evidence"].(string); ev == "" {
			t.Fatal("no readonly_evidence")
		}
		if _, err := json.Marshal(tok.Details); err != nil {
			t.Fatalf("details are not JSON-friendly: %v", err)
		}
	})
}

// FuzzFlexString: a JSON string reads as itself, a JSON number as its
// literal, null as empty; anything else is refused. enum maps only in-range
// integers to names.
func FuzzFlexString(f *testing.F) {
	for _, s := range []string{`"40003"`, `40003`, `4.0003e4`, `null`, `"ACCOUNT_ACCESS_LEVEL_READ_ONLY"`, `2`, `-1`, `99`, `{}`, `[1]`, `true`, `"\u0032"`, ` 7 `, `"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		var v flexString
		err := v.UnmarshalJSON([]byte(raw))
		trimmed := strings.TrimSpace(raw)
		var asString string
		var asNumber json.Number
		switch {
		case trimmed == "null":
			if err != nil || v != "" {
				t.Fatalf("null read as %q, %v", v, err)
			}
		case json.Unmarshal([]byte(trimmed), &asString) == nil:
			if err != nil || string(v) != asString {
				t.Fatalf("string %s read as %q, %v", raw, v, err)
			}
		case json.Unmarshal([]byte(trimmed), &asNumber) == nil:
			if err != nil || string(v) != asNumber.String() {
				t.Fatalf("number %s read as %q, %v", raw, v, err)
			}
		default:
			if err == nil {
				t.Fatalf("accepted %q as %q", raw, v)
			}
			return
		}
		name := v.enum(accessLevels)
		if name != string(v) && !slices.Contains(accessLevels, name) {
			t.Fatalf("enum(%q) = %q", v, name)
		}
	})
}

type fuzzGateway struct {
	mu                     sync.Mutex
	infoStatus, acctStatus int
	infoBody, acctBody     string
	tracking               string
}

func (g *fuzzGateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	status, body := g.acctStatus, g.acctBody
	if strings.HasSuffix(r.URL.Path, "/GetInfo") {
		status, body = g.infoStatus, g.infoBody
	}
	if g.tracking != "" {
		w.Header().Set("x-tracking-id", strings.ReplaceAll(g.tracking, fuzzTokenMarker, fuzzToken))
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(strings.ReplaceAll(body, fuzzTokenMarker, fuzzToken)))
}

// FuzzIssue drives Issue end to end through the real upstream client.
func FuzzIssue(f *testing.F) {
	g := &fuzzGateway{}
	ts := httptest.NewServer(g)
	defer ts.Close()
	client, err := upstream.New(upstream.Options{Broker: display, MaxAttempts: 1, Timeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	info := `{"tariff":"investor","userId":"u1"}`
	accts := `{"accounts":[{"id":"2000000001","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"}]}`
	f.Add(200, info, 200, accts, "trk-1")
	f.Add(401, `{"code":16,"message":"authentication token is missing or invalid","description":"40003"}`, 200, accts, "")
	f.Add(200, info, 429, `{"code":8,"message":"request limit exceeded","description":"80002"}`, "")
	f.Add(200, `{"tariff":"inv`, 200, accts, "")
	f.Add(200, info, 200, `<html>`+fuzzTokenMarker+`</html>`, "x-"+fuzzTokenMarker)
	f.Add(503, `service unavailable `+fuzzTokenMarker, 200, accts, "")
	f.Fuzz(func(t *testing.T, infoStatus int, infoBody string, acctStatus int, acctBody, tracking string) {
		if infoStatus < 200 || infoStatus > 599 || acctStatus < 200 || acctStatus > 599 {
			return
		}
		if !httpHeaderValueOK(strings.ReplaceAll(tracking, fuzzTokenMarker, fuzzToken)) {
			return
		}
		g.mu.Lock()
		g.infoStatus, g.infoBody, g.acctStatus, g.acctBody, g.tracking = infoStatus, infoBody, acctStatus, acctBody, tracking
		g.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tok, err := New().Issue(ctx, provider.Request{BaseURL: ts.URL + "/rest", Client: client, Secrets: map[string]string{"token": fuzzToken}})
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			checkError(t, err, strings.ReplaceAll(infoBody+acctBody+tracking, fuzzTokenMarker, ""))
			return
		}
		if infoStatus >= 300 || acctStatus >= 300 {
			t.Fatalf("succeeded on HTTP %d/%d", infoStatus, acctStatus)
		}
		if tok.AccessToken != fuzzToken {
			t.Fatal("handed out something other than the token")
		}
	})
}

// httpHeaderValueOK reports whether net/http would send v as a header value.
func httpHeaderValueOK(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}
