package sandbox_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

type caClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *caClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *caClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newChatAppSandbox(t *testing.T) (*sandbox.Server, string, *caClock) {
	t.Helper()
	clock := &caClock{t: time.Date(2030, 3, 4, 10, 0, 0, 0, time.UTC)}
	sb := sandbox.New(sandbox.Options{Now: clock.now})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	return sb, srv.URL, clock
}

// caReply is a ChatApp answer, success or error.
type caReply struct {
	status  int
	raw     string
	Success *bool `json:"success"`
	Data    struct {
		CabinetUserID       int    `json:"cabinetUserId"`
		AccessToken         string `json:"accessToken"`
		AccessTokenEndTime  int64  `json:"accessTokenEndTime"`
		RefreshToken        string `json:"refreshToken"`
		RefreshTokenEndTime int64  `json:"refreshTokenEndTime"`
	} `json:"data"`
	Error *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func caDo(t *testing.T, method, url, body string, header map[string]string) caReply {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	out := caReply{status: resp.StatusCode, raw: string(raw)}
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("body is not JSON: %q", raw)
	}
	if resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("content type %q", resp.Header.Get("Content-Type"))
	}
	return out
}

func caMakeBody(email, password, appID string) string {
	b, _ := json.Marshal(map[string]string{"email": email, "password": password, "appId": appID})
	return string(b)
}

func caMake(t *testing.T, url string) caReply {
	t.Helper()
	r := caDo(t, "POST", url+"/v1/tokens", caMakeBody(sandbox.ChatAppEmail, sandbox.ChatAppPassword, sandbox.ChatAppAppID), nil)
	if r.status != 200 || r.Success == nil || !*r.Success {
		t.Fatalf("make: %d %s", r.status, r.raw)
	}
	return r
}

func caRefresh(t *testing.T, url, rt string) caReply {
	t.Helper()
	return caDo(t, "POST", url+"/v1/tokens/refresh", "", map[string]string{"Refresh": rt})
}

func caCheck(t *testing.T, url, at string) caReply {
	t.Helper()
	return caDo(t, "GET", url+"/v1/tokens/check", "", map[string]string{"Authorization": at})
}

// caWantError asserts the exact ChatApp error shape.
func caWantError(t *testing.T, r caReply, status int, code string) {
	t.Helper()
	var shape map[string]any
	_ = json.Unmarshal([]byte(r.raw), &shape)
	errObj, _ := shape["error"].(map[string]any)
	if r.status != status || len(shape) != 2 || shape["success"] != false || len(errObj) != 2 ||
		errObj["code"] != code || errObj["message"] == "" || errObj["message"] == nil {
		t.Fatalf("want %d %s, got %d %s", status, code, r.status, r.raw)
	}
}

func TestChatAppMakeAndCheck(t *testing.T) {
	sb, url, clock := newChatAppSandbox(t)
	r := caMake(t, url)
	d := r.Data
	now := clock.now()
	if d.CabinetUserID != sandbox.ChatAppCabinetUserID || d.AccessToken == "" || d.RefreshToken == "" || d.AccessToken == d.RefreshToken {
		t.Fatalf("make data %s", r.raw)
	}
	// Opaque and shaped like ChatApp's ($2y$10$ and 53 characters of
	// bcrypt's alphabet, which has dots: counting dots would not tell a
	// JWT from one).
	if !strings.HasPrefix(d.AccessToken, "$2y$10$") || strings.HasPrefix(d.AccessToken, "eyJ") {
		t.Fatalf("tokens must be opaque and ChatApp-shaped, not JWTs: %q", d.AccessToken)
	}
	if d.AccessTokenEndTime != now.Add(24*time.Hour).Unix() || d.RefreshTokenEndTime != now.Add(14*24*time.Hour).Unix() {
		t.Fatalf("end times %d %d", d.AccessTokenEndTime, d.RefreshTokenEndTime)
	}
	if sb.ChatAppMakes() != 1 || !sb.ChatAppAccessValid(d.AccessToken) || !sb.ChatAppRefreshValid(d.RefreshToken) {
		t.Fatal("sandbox does not know the pair")
	}
	if c := caCheck(t, url, d.AccessToken); c.status != 200 || c.Success == nil || !*c.Success {
		t.Fatalf("check: %d %s", c.status, c.raw)
	}
	// Refresh and access tokens are not interchangeable.
	caWantError(t, caCheck(t, url, d.RefreshToken), 401, "ApiInvalidTokenError")
	caWantError(t, caRefresh(t, url, d.AccessToken), 401, "ApiInvalidTokenError")
	// The check wants the bare token: "Bearer <token>" is not it.
	c := caCheck(t, url, "Bearer "+d.AccessToken)
	caWantError(t, c, 401, "ApiInvalidTokenError")
	if c.Error.Message != "Invalid Token" {
		t.Fatalf("message %q", c.Error.Message)
	}
	caWantError(t, caCheck(t, url, ""), 401, "ApiInvalidTokenError")

	// The access token dies at its end time, not before.
	clock.advance(24*time.Hour - time.Second)
	if c := caCheck(t, url, d.AccessToken); c.status != 200 {
		t.Fatalf("check before the end: %d", c.status)
	}
	clock.advance(time.Second)
	caWantError(t, caCheck(t, url, d.AccessToken), 401, "ApiInvalidTokenError")
	if sb.ChatAppAccessValid(d.AccessToken) {
		t.Fatal("expired access token still valid")
	}
}

func TestChatAppRefreshRotates(t *testing.T) {
	sb, url, clock := newChatAppSandbox(t)
	first := caMake(t, url).Data
	clock.advance(time.Hour)
	r := caRefresh(t, url, first.RefreshToken)
	if r.status != 200 || r.Success == nil || !*r.Success {
		t.Fatalf("refresh: %d %s", r.status, r.raw)
	}
	next := r.Data
	if next.AccessToken == first.AccessToken || next.RefreshToken == first.RefreshToken || next.CabinetUserID != sandbox.ChatAppCabinetUserID {
		t.Fatalf("refresh did not return a new pair: %s", r.raw)
	}
	if next.AccessTokenEndTime != clock.now().Add(24*time.Hour).Unix() {
		t.Fatalf("new pair's end time %d", next.AccessTokenEndTime)
	}
	// The old refresh token is refused from now on; the new one works once.
	if sb.ChatAppRefreshValid(first.RefreshToken) || !sb.ChatAppRefreshValid(next.RefreshToken) {
		t.Fatal("rotation did not kill the old refresh token")
	}
	caWantError(t, caRefresh(t, url, first.RefreshToken), 401, "ApiInvalidTokenError")
	if c := caCheck(t, url, next.AccessToken); c.status != 200 {
		t.Fatalf("new access token refused: %d", c.status)
	}
	if sb.ChatAppMakes() != 1 {
		t.Fatalf("a refresh counted as a make: %d", sb.ChatAppMakes())
	}

	caWantError(t, caRefresh(t, url, ""), 401, "ApiInvalidTokenError")
	caWantError(t, caRefresh(t, url, "never-issued"), 401, "ApiInvalidTokenError")

	// Revoked, then expired refresh tokens are refused.
	sb.RevokeChatAppRefresh(next.RefreshToken)
	caWantError(t, caRefresh(t, url, next.RefreshToken), 401, "ApiInvalidTokenError")
	sb.SetChatAppLifetimes(time.Minute, 2*time.Hour)
	short := caMake(t, url).Data
	if short.AccessTokenEndTime != clock.now().Add(time.Minute).Unix() || short.RefreshTokenEndTime != clock.now().Add(2*time.Hour).Unix() {
		t.Fatalf("lifetimes not applied: %+v", short)
	}
	clock.advance(2 * time.Hour)
	if sb.ChatAppRefreshValid(short.RefreshToken) {
		t.Fatal("expired refresh token still valid")
	}
	caWantError(t, caRefresh(t, url, short.RefreshToken), 401, "ApiInvalidTokenError")
}

func TestChatAppMakeErrors(t *testing.T) {
	sb, url, _ := newChatAppSandbox(t)
	cases := []struct {
		name   string
		body   string
		status int
		code   string
	}{
		{"wrong password", caMakeBody(sandbox.ChatAppEmail, "nope", sandbox.ChatAppAppID), 401, "ApiInvalidCredentialsError"},
		{"wrong appId", caMakeBody(sandbox.ChatAppEmail, sandbox.ChatAppPassword, "app_999"), 401, "ApiInvalidCredentialsError"},
		{"unknown email", caMakeBody("who@example.com", sandbox.ChatAppPassword, sandbox.ChatAppAppID), 401, "ApiInvalidCredentialsError"},
		{"missing appId", `{"email":"ops@example.com","password":"x"}`, 422, "ApiValidationError"},
		{"not JSON", `email=ops`, 422, "ApiValidationError"},
		{"empty", ``, 422, "ApiValidationError"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := caDo(t, "POST", url+"/v1/tokens", tc.body, nil)
			caWantError(t, r, tc.status, tc.code)
			if strings.Contains(r.raw, sandbox.ChatAppPassword) {
				t.Fatal("error echoes the password")
			}
		})
	}
	if sb.ChatAppMakes() != 0 {
		t.Fatalf("refused makes counted: %d", sb.ChatAppMakes())
	}
}

func TestChatAppMakeQuota(t *testing.T) {
	sb, url, clock := newChatAppSandbox(t)
	login := caMakeBody(sandbox.ChatAppEmail, sandbox.ChatAppPassword, sandbox.ChatAppAppID)
	rt := caMake(t, url).Data.RefreshToken
	// The default is 100 a day per email and appId.
	for i := 1; i < 100; i++ {
		if r := caDo(t, "POST", url+"/v1/tokens", login, nil); r.status != 200 {
			t.Fatalf("make %d: %d %s", i+1, r.status, r.raw)
		}
	}
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", login, nil), 429, "ApiTooManyRequestsError")
	if sb.ChatAppMakes() != 100 || sb.Calls(sandbox.ChatAppMakeEP) != 101 {
		t.Fatalf("makes=%d calls=%d", sb.ChatAppMakes(), sb.Calls(sandbox.ChatAppMakeEP))
	}
	// Wrong credentials are still told as such; refresh is not limited.
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", caMakeBody(sandbox.ChatAppEmail, "nope", sandbox.ChatAppAppID), nil), 401, "ApiInvalidCredentialsError")
	if r := caRefresh(t, url, rt); r.status != 200 {
		t.Fatalf("refresh under a spent quota: %d %s", r.status, r.raw)
	}
	// Raising the quota counts today's makes; no limit lets one through.
	sb.SetChatAppMakeQuota(100)
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", login, nil), 429, "ApiTooManyRequestsError")
	sb.SetChatAppMakeQuota(-1)
	caMake(t, url)
	// A new day starts a new count.
	sb.SetChatAppMakeQuota(1)
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", login, nil), 429, "ApiTooManyRequestsError")
	clock.advance(24 * time.Hour)
	if sb.ChatAppMakes() != 0 {
		t.Fatalf("makes today = %d", sb.ChatAppMakes())
	}
	caMake(t, url)
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", login, nil), 429, "ApiTooManyRequestsError")
	// Zero refuses every make.
	clock.advance(24 * time.Hour)
	sb.SetChatAppMakeQuota(0)
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", login, nil), 429, "ApiTooManyRequestsError")
}

func TestChatAppFaultsAndEndpoints(t *testing.T) {
	sb, url, _ := newChatAppSandbox(t)
	eps := sb.Endpoints()
	for _, ep := range []string{sandbox.ChatAppMakeEP, sandbox.ChatAppRefreshEP, sandbox.ChatAppCheckEP} {
		if !slices.Contains(eps, ep) {
			t.Errorf("Endpoints() lacks %s", ep)
		}
	}
	rt := caMake(t, url).Data.RefreshToken
	cases := []struct {
		status int
		code   string
	}{
		{503, "ApiServiceUnavailableError"},
		{500, "ApiServerError"},
		{429, "ApiTooManyRequestsError"},
		{401, "ApiInvalidTokenError"},
	}
	for _, tc := range cases {
		sb.InjectFault(sandbox.ChatAppRefreshEP, tc.status, 1)
		caWantError(t, caRefresh(t, url, rt), tc.status, tc.code)
	}
	// Faults answer before the handler: the refresh token was not spent.
	if r := caRefresh(t, url, rt); r.status != 200 {
		t.Fatalf("refresh after faults: %d %s", r.status, r.raw)
	}
	if sb.Calls(sandbox.ChatAppRefreshEP) != len(cases)+1 {
		t.Fatalf("refresh calls %d", sb.Calls(sandbox.ChatAppRefreshEP))
	}
}

func caAdmin(t *testing.T, method, url, body string, want int) string {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("%s %s: %d %s", method, url, resp.StatusCode, raw)
	}
	return string(raw)
}

func TestChatAppAdmin(t *testing.T) {
	sb, url, clock := newChatAppSandbox(t)
	caAdmin(t, "POST", url+"/_sandbox/chatapp/settings", `{"access_lifetime":"30m","refresh_lifetime":"48h","make_quota":2}`, 204)
	d := caMake(t, url).Data
	if d.AccessTokenEndTime != clock.now().Add(30*time.Minute).Unix() || d.RefreshTokenEndTime != clock.now().Add(48*time.Hour).Unix() {
		t.Fatalf("settings not applied: %+v", d)
	}
	caMake(t, url)
	caWantError(t, caDo(t, "POST", url+"/v1/tokens", caMakeBody(sandbox.ChatAppEmail, sandbox.ChatAppPassword, sandbox.ChatAppAppID), nil), 429, "ApiTooManyRequestsError")
	if got := caAdmin(t, "GET", url+"/_sandbox/chatapp/makes", "", 200); strings.TrimSpace(got) != `{"makes":2}` {
		t.Fatalf("makes = %s", got)
	}
	// Only one lifetime given: the other stays.
	caAdmin(t, "POST", url+"/_sandbox/chatapp/settings", `{"access_lifetime":"1h","make_quota":-1}`, 204)
	d = caMake(t, url).Data
	if d.AccessTokenEndTime != clock.now().Add(time.Hour).Unix() || d.RefreshTokenEndTime != clock.now().Add(48*time.Hour).Unix() {
		t.Fatalf("partial settings: %+v", d)
	}
	// A bad request changes nothing.
	caAdmin(t, "POST", url+"/_sandbox/chatapp/settings", `{"access_lifetime":"2h","refresh_lifetime":"soon"}`, 400)
	caAdmin(t, "POST", url+"/_sandbox/chatapp/settings", `{"access_lifetime":"-1h"}`, 400)
	caAdmin(t, "POST", url+"/_sandbox/chatapp/settings", `{"unknown":1}`, 400)
	if d := caMake(t, url).Data; d.AccessTokenEndTime != clock.now().Add(time.Hour).Unix() {
		t.Fatalf("rejected settings applied: %+v", d)
	}

	caAdmin(t, "POST", url+"/_sandbox/chatapp/revoke", `{"refresh_token":"`+d.RefreshToken+`"}`, 204)
	if sb.ChatAppRefreshValid(d.RefreshToken) || !sb.ChatAppAccessValid(d.AccessToken) {
		t.Fatal("revoke must kill the refresh token only")
	}
	caWantError(t, caRefresh(t, url, d.RefreshToken), 401, "ApiInvalidTokenError")
}

// TestChatAppTokensLookReal: tokens are shaped like ChatApp's own, "$2y$10$"
// and 53 characters of bcrypt's alphabet, and still work in the Refresh and
// Authorization headers.
func TestChatAppTokensLookReal(t *testing.T) {
	_, url, _ := newChatAppSandbox(t)
	pair := caMake(t, url)
	for _, tok := range []string{pair.Data.AccessToken, pair.Data.RefreshToken} {
		rest, ok := strings.CutPrefix(tok, "$2y$10$")
		if !ok || len(rest) != 53 || strings.Trim(rest, "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") != "" {
			t.Errorf("token %q is not shaped like ChatApp's", tok)
		}
	}
	if r := caCheck(t, url, pair.Data.AccessToken); r.status != 200 {
		t.Fatalf("check: %s", r.raw)
	}
	if r := caRefresh(t, url, pair.Data.RefreshToken); r.status != 200 {
		t.Fatalf("refresh: %s", r.raw)
	}
}

// TestChatAppAccessDiesAtRefreshSwitch: by default the old access token
// lives on after a refresh; the strict variant (switched through the API or
// the admin endpoint) kills it, and only it.
func TestChatAppAccessDiesAtRefreshSwitch(t *testing.T) {
	for _, tc := range []struct {
		name    string
		set     func(sb *sandbox.Server, url string)
		oldDies bool
	}{
		{"default: old access token lives", func(*sandbox.Server, string) {}, false},
		{"strict via API", func(sb *sandbox.Server, _ string) { sb.SetChatAppAccessDiesAtRefresh(true) }, true},
		{"strict via admin", func(_ *sandbox.Server, url string) {
			caAdmin(t, http.MethodPost, url+"/_sandbox/chatapp/settings", `{"access_dies_at_refresh":true}`, http.StatusNoContent)
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb, url, _ := newChatAppSandbox(t)
			tc.set(sb, url)
			other := caMake(t, url) // another pair of the same login
			pair := caMake(t, url)
			next := caRefresh(t, url, pair.Data.RefreshToken)
			if next.status != 200 {
				t.Fatalf("refresh: %s", next.raw)
			}
			if got := sb.ChatAppAccessValid(pair.Data.AccessToken); got == tc.oldDies {
				t.Errorf("old access token valid = %v, want %v", got, !tc.oldDies)
			}
			if !sb.ChatAppAccessValid(next.Data.AccessToken) || !sb.ChatAppAccessValid(other.Data.AccessToken) {
				t.Error("the new access token, or another pair's, does not work")
			}
		})
	}
}

// TestChatAppErrorsEchoWhatWasPresented: a refused refresh token and a
// refused login are quoted back, as gateways' texts often do, so that the
// plugin's scrubbing is exercised.
func TestChatAppErrorsEchoWhatWasPresented(t *testing.T) {
	_, url, _ := newChatAppSandbox(t)
	const deadRT = "$2y$10$deadrefreshtokendeadrefreshtokendeadrefreshtokendeadr"
	r := caRefresh(t, url, deadRT)
	caWantError(t, r, http.StatusUnauthorized, sandbox.ChatAppInvalidToken)
	if !strings.Contains(r.raw, `deadrefreshtoken`) {
		t.Errorf("refresh refusal does not quote the token: %s", r.raw)
	}
	r = caDo(t, http.MethodPost, url+"/v1/tokens", caMakeBody("who@example.com", "pw", sandbox.ChatAppAppID), nil)
	caWantError(t, r, http.StatusUnauthorized, sandbox.ChatAppInvalidCredentials)
	if !strings.Contains(r.raw, "who@example.com") {
		t.Errorf("login refusal does not quote the email: %s", r.raw)
	}
}
