package sandbox_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

const tiUsersPath = "/tinkoff.public.invest.api.contract.v1.UsersService/"

type tiClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *tiClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *tiClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newTInvestSandbox(t *testing.T) (*sandbox.Server, string, *tiClock) {
	t.Helper()
	clock := &tiClock{t: time.Date(2025, 6, 2, 10, 0, 0, 0, time.UTC)}
	sb := sandbox.New(sandbox.Options{Now: clock.now})
	ts := httptest.NewServer(sb)
	t.Cleanup(ts.Close)
	return sb, ts.URL, clock
}

type tiResp struct {
	status int
	header http.Header
	body   []byte
}

// tiCall posts to a UsersService method; auth is the whole Authorization
// header ("" for none).
func tiCall(t *testing.T, url, prefix, method, auth, body string) tiResp {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url+prefix+tiUsersPath+method, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return tiResp{resp.StatusCode, resp.Header, b}
}

func tiBearer(token string) string { return "Bearer " + token }

// tiJSONEqual compares a body with the expected JSON, ignoring key order and
// whitespace but not types: "40003" and 40003 differ.
func tiJSONEqual(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("body is not JSON: %q", got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if string(gb) != string(wb) {
		t.Errorf("body = %s, want %s", gb, wb)
	}
}

const tiBody40003 = `{"code":16,"message":"authentication token is missing or invalid","description":"40003"}`

func TestTInvestHeaders(t *testing.T) {
	_, url, _ := newTInvestSandbox(t)
	seen := map[string]bool{}
	for i, method := range []string{"GetInfo", "GetAccounts", "GetInfo"} {
		r := tiCall(t, url, sandbox.TInvestPrefix, method, tiBearer(sandbox.TInvestFullToken), `{}`)
		if r.status != http.StatusOK {
			t.Fatalf("%s: status %d: %s", method, r.status, r.body)
		}
		id := r.header.Get("x-tracking-id")
		if id == "" || seen[id] {
			t.Errorf("%s: x-tracking-id %q missing or repeated", method, id)
		}
		seen[id] = true
		// The real form: the quota, then the policy and its window.
		if got := r.header.Get("x-ratelimit-limit"); got != "100, 100;w=60" {
			t.Errorf("x-ratelimit-limit = %q, want 100, 100;w=60", got)
		}
		if got, want := r.header.Get("x-ratelimit-remaining"), strconv.Itoa(99-i); got != want {
			t.Errorf("x-ratelimit-remaining = %q, want %s", got, want)
		}
		if got := r.header.Get("x-ratelimit-reset"); got != "60" {
			t.Errorf("x-ratelimit-reset = %q, want 60 (fixed clock, window just opened)", got)
		}
		if ct := r.header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type = %q", ct)
		}
	}
	// Errors carry the tracking id too: support asks for it.
	r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer("no-such-token"), `{}`)
	if r.status != http.StatusUnauthorized || r.header.Get("x-tracking-id") == "" {
		t.Errorf("401: status %d, x-tracking-id %q", r.status, r.header.Get("x-tracking-id"))
	}
}

func TestTInvestGetInfo(t *testing.T) {
	_, url, _ := newTInvestSandbox(t)
	r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestReadOnlyToken), `{}`)
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	var info map[string]any
	if err := json.Unmarshal(r.body, &info); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"premStatus", "qualStatus", "qualifiedForWorkWith", "tariff", "userId", "riskLevelCode"} {
		if _, ok := info[k]; !ok {
			t.Errorf("GetInfo lacks %s: %s", k, r.body)
		}
	}
	if info["userId"] != sandbox.TInvestUserID {
		t.Errorf("userId = %v", info["userId"])
	}
}

func TestTInvestGetAccounts(t *testing.T) {
	_, url, _ := newTInvestSandbox(t)
	cases := []struct {
		token, prefix string
		levels        map[string]string // id -> access level
	}{
		{sandbox.TInvestFullToken, sandbox.TInvestPrefix, map[string]string{
			"2000000001": sandbox.TInvestFullAccess, "2000000002": sandbox.TInvestFullAccess,
			"2000000003": sandbox.TInvestFullAccess, "2000000004": sandbox.TInvestFullAccess}},
		{sandbox.TInvestReadOnlyToken, sandbox.TInvestPrefix, map[string]string{
			"2000000001": sandbox.TInvestReadOnly, "2000000002": sandbox.TInvestReadOnly,
			"2000000003": sandbox.TInvestReadOnly, "2000000004": sandbox.TInvestReadOnly}},
		{sandbox.TInvestAccountToken, sandbox.TInvestPrefix, map[string]string{
			sandbox.TInvestAccountID: sandbox.TInvestFullAccess, "2000000002": sandbox.TInvestNoAccess,
			"2000000003": sandbox.TInvestNoAccess, "2000000004": sandbox.TInvestNoAccess}},
		{sandbox.TInvestSandboxToken, sandbox.TInvestSandboxPrefix, map[string]string{
			"0c3e4a8f-6b1d-4f2a-9e7c-5d8b2a1f3e60": sandbox.TInvestFullAccess}},
	}
	for _, tc := range cases {
		t.Run(tc.token, func(t *testing.T) {
			// An empty body is an empty message to the gateway.
			r := tiCall(t, url, tc.prefix, "GetAccounts", tiBearer(tc.token), ``)
			if r.status != http.StatusOK {
				t.Fatalf("status %d: %s", r.status, r.body)
			}
			var out struct {
				Accounts []map[string]any `json:"accounts"`
			}
			if err := json.Unmarshal(r.body, &out); err != nil {
				t.Fatal(err)
			}
			got := map[string]string{}
			for _, a := range out.Accounts {
				for _, k := range []string{"id", "type", "name", "status", "openedDate", "closedDate", "accessLevel"} {
					if _, ok := a[k]; !ok {
						t.Errorf("account %v lacks %s", a["id"], k)
					}
				}
				got[a["id"].(string)], _ = a["accessLevel"].(string)
			}
			if len(got) != len(tc.levels) {
				t.Errorf("accounts = %v, want %v", got, tc.levels)
			}
			for id, lvl := range tc.levels {
				if got[id] != lvl {
					t.Errorf("account %s accessLevel = %q, want %q", id, got[id], lvl)
				}
			}
		})
	}
	// Types, statuses and dates as the gateway writes them.
	r := tiCall(t, url, sandbox.TInvestPrefix, "GetAccounts", tiBearer(sandbox.TInvestFullToken), `{}`)
	var out struct {
		Accounts []struct {
			ID, Type, Status, OpenedDate, ClosedDate string
		} `json:"accounts"`
	}
	if err := json.Unmarshal(r.body, &out); err != nil {
		t.Fatal(err)
	}
	var types []string
	for _, a := range out.Accounts {
		types = append(types, a.Type)
		if _, err := time.Parse(time.RFC3339, a.OpenedDate); err != nil {
			t.Errorf("openedDate %q: %v", a.OpenedDate, err)
		}
		wantClosed := "1970-01-01T00:00:00Z"
		if a.Status == "ACCOUNT_STATUS_CLOSED" {
			wantClosed = "2023-03-31T00:00:00Z"
		}
		if a.ClosedDate != wantClosed {
			t.Errorf("account %s closedDate = %q, want %q", a.ID, a.ClosedDate, wantClosed)
		}
	}
	for _, ty := range []string{"ACCOUNT_TYPE_TINKOFF", "ACCOUNT_TYPE_TINKOFF_IIS", "ACCOUNT_TYPE_INVEST_BOX"} {
		if !slices.Contains(types, ty) {
			t.Errorf("no account of type %s in %v", ty, types)
		}
	}
}

func TestTInvestAuthErrors(t *testing.T) {
	_, url, _ := newTInvestSandbox(t)
	cases := []struct {
		name, prefix, auth string
	}{
		{"no header", sandbox.TInvestPrefix, ""},
		{"not bearer", sandbox.TInvestPrefix, "Token " + sandbox.TInvestFullToken},
		{"bearer without token", sandbox.TInvestPrefix, "Bearer "},
		{"unknown token", sandbox.TInvestPrefix, tiBearer("t.unknown")},
		{"sandbox token on production", sandbox.TInvestPrefix, tiBearer(sandbox.TInvestSandboxToken)},
		{"production token on sandbox", sandbox.TInvestSandboxPrefix, tiBearer(sandbox.TInvestFullToken)},
		{"read-only token on sandbox", sandbox.TInvestSandboxPrefix, tiBearer(sandbox.TInvestReadOnlyToken)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, m := range []string{"GetInfo", "GetAccounts"} {
				r := tiCall(t, url, tc.prefix, m, tc.auth, `{}`)
				if r.status != http.StatusUnauthorized {
					t.Fatalf("%s: status %d, want 401: %s", m, r.status, r.body)
				}
				tiJSONEqual(t, r.body, tiBody40003)
			}
		})
	}
	// The scheme is case-insensitive, as in HTTP.
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", "bearer "+sandbox.TInvestFullToken, `{}`); r.status != http.StatusOK {
		t.Errorf("lower-case scheme: status %d", r.status)
	}
}

func TestTInvestBadBody(t *testing.T) {
	_, url, _ := newTInvestSandbox(t)
	for _, body := range []string{`{`, `[]`, `"x"`, `{"a":1}x`} {
		r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestFullToken), body)
		if r.status != http.StatusBadRequest {
			t.Errorf("body %q: status %d, want 400", body, r.status)
			continue
		}
		var e struct {
			Code int `json:"code"`
		}
		if err := json.Unmarshal(r.body, &e); err != nil || e.Code != 3 {
			t.Errorf("body %q: error %s, want gRPC code 3", body, r.body)
		}
	}
}

func TestTInvestRateLimit(t *testing.T) {
	sb, url, clock := newTInvestSandbox(t)
	sb.SetTInvestRateLimit(3)
	tok := tiBearer(sandbox.TInvestFullToken)
	for i := 0; i < 3; i++ {
		// GetInfo and GetAccounts share the UsersService limit.
		m := []string{"GetInfo", "GetAccounts"}[i%2]
		if r := tiCall(t, url, sandbox.TInvestPrefix, m, tok, `{}`); r.status != http.StatusOK {
			t.Fatalf("call %d: status %d", i+1, r.status)
		}
	}
	clock.advance(20 * time.Second)
	r := tiCall(t, url, sandbox.TInvestPrefix, "GetAccounts", tok, `{}`)
	if r.status != http.StatusTooManyRequests {
		t.Fatalf("4th call: status %d, want 429", r.status)
	}
	tiJSONEqual(t, r.body, `{"code":8,"message":"request limit exceeded","description":"80002"}`)
	if got := r.header.Get("x-ratelimit-remaining"); got != "0" {
		t.Errorf("x-ratelimit-remaining = %q, want 0", got)
	}
	if got := r.header.Get("x-ratelimit-reset"); got != "40" {
		t.Errorf("x-ratelimit-reset = %q, want 40", got)
	}
	if r.header.Get("x-tracking-id") == "" {
		t.Error("429 lacks x-tracking-id")
	}
	if got := r.header.Get("x-ratelimit-limit"); got != "3, 3;w=60" {
		t.Errorf("x-ratelimit-limit = %q, want the real form 3, 3;w=60", got)
	}
	// Per user: every token of the user draws on the same window, while
	// another user's token, and the other environment, have their own.
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestReadOnlyToken), `{}`); r.status != http.StatusTooManyRequests {
		t.Errorf("another token of the same user: status %d, want 429", r.status)
	}
	sb.AddTInvestToken("t.other-user", false, sandbox.TInvestAccount{ID: "9", AccessLevel: sandbox.TInvestReadOnly})
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer("t.other-user"), `{}`); r.status != http.StatusOK {
		t.Errorf("another user's token: status %d", r.status)
	}
	sb.AddTInvestUserToken(sandbox.TInvestUserID, "t.same-user", false, sandbox.TInvestAccount{ID: "9", AccessLevel: sandbox.TInvestReadOnly})
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer("t.same-user"), `{}`); r.status != http.StatusTooManyRequests {
		t.Errorf("a new token of the same user: status %d, want 429", r.status)
	}
	if r := tiCall(t, url, sandbox.TInvestSandboxPrefix, "GetInfo", tiBearer(sandbox.TInvestSandboxToken), `{}`); r.status != http.StatusOK {
		t.Errorf("sandbox environment: status %d", r.status)
	}
	clock.advance(40 * time.Second)
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tok, `{}`); r.status != http.StatusOK {
		t.Errorf("next window: status %d", r.status)
	}
}

func TestTInvestRevoke(t *testing.T) {
	sb, url, _ := newTInvestSandbox(t)
	if !sb.TInvestValid(sandbox.TInvestAccountToken) {
		t.Fatal("default token not valid")
	}
	if sb.TInvestValid("t.unknown") {
		t.Error("unknown token valid")
	}
	sb.RevokeTInvestToken(sandbox.TInvestAccountToken)
	if sb.TInvestValid(sandbox.TInvestAccountToken) {
		t.Error("revoked token still valid")
	}
	r := tiCall(t, url, sandbox.TInvestPrefix, "GetAccounts", tiBearer(sandbox.TInvestAccountToken), `{}`)
	if r.status != http.StatusUnauthorized {
		t.Fatalf("status %d, want 401", r.status)
	}
	tiJSONEqual(t, r.body, tiBody40003)
	// Other tokens are unaffected.
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetAccounts", tiBearer(sandbox.TInvestFullToken), `{}`); r.status != http.StatusOK {
		t.Errorf("other token: status %d", r.status)
	}

	// The same through the admin API.
	tiAdminPost(t, url+"/_sandbox/tinvest/revoke", `{"token":"`+sandbox.TInvestSandboxToken+`"}`, http.StatusNoContent)
	if sb.TInvestValid(sandbox.TInvestSandboxToken) {
		t.Error("admin revoke did not revoke")
	}
	if r := tiCall(t, url, sandbox.TInvestSandboxPrefix, "GetInfo", tiBearer(sandbox.TInvestSandboxToken), `{}`); r.status != http.StatusUnauthorized {
		t.Errorf("revoked sandbox token: status %d", r.status)
	}
}

func tiAdminPost(t *testing.T, url, body string, want int) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != want {
		t.Fatalf("POST %s: status %d, want %d: %s", url, resp.StatusCode, want, b)
	}
}

func TestTInvestAdminTokens(t *testing.T) {
	sb, url, _ := newTInvestSandbox(t)
	tiAdminPost(t, url+"/_sandbox/tinvest/tokens", `{"token":"t.new","sandbox":true,"accounts":[
		{"id":"sb-1","type":"ACCOUNT_TYPE_TINKOFF","name":"bot","status":"ACCOUNT_STATUS_OPEN","opened_date":"2024-02-03T00:00:00Z","access_level":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"}]}`,
		http.StatusNoContent)
	if !sb.TInvestValid("t.new") {
		t.Fatal("added token not valid")
	}
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer("t.new"), `{}`); r.status != http.StatusUnauthorized {
		t.Errorf("sandbox token on production: status %d", r.status)
	}
	r := tiCall(t, url, sandbox.TInvestSandboxPrefix, "GetAccounts", tiBearer("t.new"), `{}`)
	if r.status != http.StatusOK {
		t.Fatalf("status %d: %s", r.status, r.body)
	}
	tiJSONEqual(t, r.body, `{"accounts":[{"id":"sb-1","type":"ACCOUNT_TYPE_TINKOFF","name":"bot","status":"ACCOUNT_STATUS_OPEN",
		"openedDate":"2024-02-03T00:00:00Z","closedDate":"1970-01-01T00:00:00Z","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"}]}`)

	tiAdminPost(t, url+"/_sandbox/tinvest/tokens", `{"token":"t.x","bogus":1}`, http.StatusBadRequest)
	tiAdminPost(t, url+"/_sandbox/tinvest/tokens", `{"sandbox":true}`, http.StatusBadRequest)

	tiAdminPost(t, url+"/_sandbox/tinvest/settings", `{"rate_limit":1}`, http.StatusNoContent)
	tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestFullToken), `{}`)
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestFullToken), `{}`); r.status != http.StatusTooManyRequests {
		t.Errorf("after rate_limit 1: status %d, want 429", r.status)
	}
	tiAdminPost(t, url+"/_sandbox/tinvest/settings", `{"rate_limit":0}`, http.StatusBadRequest)
}

func TestTInvestFaultsAndCounts(t *testing.T) {
	sb, url, _ := newTInvestSandbox(t)
	for _, ep := range []string{sandbox.TInvestGetInfoEP, sandbox.TInvestGetAccountsEP, sandbox.TInvestSandboxGetInfoEP, sandbox.TInvestSandboxGetAccountsEP} {
		if !slices.Contains(sb.Endpoints(), ep) {
			t.Errorf("Endpoints() lacks %s", ep)
		}
	}
	sb.InjectFault(sandbox.TInvestGetInfoEP, http.StatusForbidden, 1)
	r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestFullToken), `{}`)
	if r.status != http.StatusForbidden {
		t.Fatalf("status %d, want injected 403", r.status)
	}
	tiJSONEqual(t, r.body, `{"code":7,"message":"insufficient privileges","description":"40002"}`)
	if r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(sandbox.TInvestFullToken), `{}`); r.status != http.StatusOK {
		t.Errorf("fault count 1 outlived: status %d", r.status)
	}
	tiCall(t, url, sandbox.TInvestSandboxPrefix, "GetAccounts", tiBearer(sandbox.TInvestSandboxToken), `{}`)
	want := map[string]int{
		sandbox.TInvestGetInfoEP:            2,
		sandbox.TInvestGetAccountsEP:        0,
		sandbox.TInvestSandboxGetInfoEP:     0,
		sandbox.TInvestSandboxGetAccountsEP: 1,
	}
	for ep, n := range want {
		if got := sb.Calls(ep); got != n {
			t.Errorf("Calls(%s) = %d, want %d", ep, got, n)
		}
	}
}

// A token added through the admin API belongs to a user of its own unless
// it names one; GetInfo reports that user.
func TestTInvestAdminTokenUser(t *testing.T) {
	_, url, _ := newTInvestSandbox(t)
	tiAdminPost(t, url+"/_sandbox/tinvest/tokens", `{"token":"t.shared","user":"`+sandbox.TInvestUserID+`","accounts":[{"id":"1","access_level":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"}]}`, http.StatusNoContent)
	tiAdminPost(t, url+"/_sandbox/tinvest/tokens", `{"token":"t.own","accounts":[{"id":"1","access_level":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"}]}`, http.StatusNoContent)
	for token, want := range map[string]string{"t.shared": sandbox.TInvestUserID, "t.own": sandbox.TInvestTokenUser("t.own")} {
		r := tiCall(t, url, sandbox.TInvestPrefix, "GetInfo", tiBearer(token), `{}`)
		var info struct {
			UserID string `json:"userId"`
		}
		if err := json.Unmarshal(r.body, &info); err != nil || info.UserID != want {
			t.Errorf("%s: userId %q (%v), want %q", token, info.UserID, err, want)
		}
	}
	if sandbox.TInvestTokenUser("t.own") == sandbox.TInvestTokenUser("t.shared") {
		t.Error("two tokens added alone share a user")
	}
}
