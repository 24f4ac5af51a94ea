package chatapp

import (
	"context"
	"encoding/json"
	"errors"
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

// Fuzz targets for what ChatApp (or whatever answers in its place) sends
// back. Fuzzed bodies may hold the markers below, replaced by the login's
// secrets before they are served: an echo must not reach an error.

const (
	fuzzPassword = "fz-ChatPass-8Jd2Kq5XwT0m"
	fuzzRefresh  = "fz-ChatRefresh-4Vn7Bc1Lp9Ys"
	fuzzEmail    = "fuzz.ops@example.com"
	fuzzAppID    = "app_fz_5521"
	markPassword = "@@PASSWORD@@"
	markRefresh  = "@@REFRESH@@"
)

var fuzzSecrets = []string{fuzzPassword, fuzzRefresh, fuzzEmail, fuzzAppID}

func serve(body string) string {
	return strings.NewReplacer(markPassword, fuzzPassword, markRefresh, fuzzRefresh).Replace(body)
}

func unmarked(body string) string {
	return strings.NewReplacer(markPassword, "", markRefresh, "").Replace(body)
}

func checkError(t *testing.T, err error, without string) *upstream.Error {
	t.Helper()
	msg := err.Error()
	brokertest.CheckLeak(t, msg, without, fuzzSecrets...)
	ue, ok := upstream.AsError(err)
	if !ok {
		t.Fatalf("not an *upstream.Error: %T %v", err, err)
	}
	if ue.Broker != display || !strings.HasPrefix(msg, "ChatApp ") {
		t.Fatalf("error does not name ChatApp: %q", msg)
	}
	brokertest.CheckExcerpt(t, msg, ue.Message, ue.Code)
	return ue
}

// FuzzClassify: every ChatApp error answer (including a 2xx with
// success:false) names ChatApp and the call, shows no secret, and has a kind
// that keeps the make quota safe: only a refusal (auth) of tokens.refresh
// may lead to tokens.make, and a 5xx is never a refusal.
func FuzzClassify(f *testing.F) {
	f.Add(401, `{"success":false,"error":{"code":"ApiInvalidTokenError","message":"Invalid Token"}}`, 1)
	f.Add(401, `{"success":false,"error":{"code":"ApiInvalidCredentialsError","message":"Invalid email, password or appId"}}`, 0)
	f.Add(429, `{"success":false,"error":{"code":"ApiTooManyRequestsError","message":"Token limit exceeded: 100 tokens a day"}}`, 0)
	f.Add(200, `{"success":false,"error":{"code":"ApiRefreshTokenExpiredError","message":"expired"}}`, 1)
	f.Add(200, `{"success":false}`, 1)
	f.Add(503, `{"success":false,"error":{"code":"ApiInvalidTokenError","message":"upstream down"}}`, 1)
	f.Add(524, `{"error":{"Code":"TooMAnY"}}`, 0)
	f.Add(500, `<html><body>Internal Server Error</body></html>`, 2)
	f.Add(422, `{"success":false,"error":{"code":"ApiValidationError","message":"password `+markPassword+` too short"}}`, 0)
	f.Add(401, `{"success":false,"error":{"code":"`+markRefresh+`","message":"unknown refresh token"}}`, 1)
	// A proxy, a WAF or a gateway answering 401/403 in ChatApp's place:
	// no envelope, so no refusal.
	f.Add(401, ``, 1)
	f.Add(403, `<html><head><title>403 Forbidden</title></head><body>Request blocked `+markRefresh+`</body></html>`, 1)
	f.Add(403, `{"error":"forbidden"}`, 0)
	f.Add(401, `{"success":false}`, 2)
	f.Add(403, `{"error":{"code":"ApiInvalidTokenError","message":"Invalid Token"}}`, 1)
	f.Add(401, `{"success":"false","error":{"code":"ApiInvalidTokenError"}}`, 1)
	f.Add(403, `{"success":false,"error":{"code":"ApiForbiddenError","message":"Forbidden"}}`, 1)
	f.Fuzz(checkClassify)
}

// TestFuzzFindingErrorText: ChatApp's error text is not handled like the
// other brokers': a non-JSON body is cut to an excerpt before it is
// scrubbed, so a secret echoed across the cut shows in part; and the
// message of a JSON error goes in whole, unbounded and with its control
// characters.
func TestFuzzFindingErrorText(t *testing.T) {
	t.Run("secret across the excerpt's cut", func(t *testing.T) {
		checkClassify(t, 502, strings.Repeat("g", 190)+markRefresh, 1)
	})
	t.Run("long message", func(t *testing.T) {
		checkClassify(t, 400, `{"success":false,"error":{"code":"X","message":"`+strings.Repeat("m", 5000)+`"}}`, 0)
	})
	t.Run("control characters", func(t *testing.T) {
		checkClassify(t, 400, "{\"success\":false,\"error\":{\"code\":\"X\",\"message\":\"a\\nb\\u0000\"}}", 2)
	})
}

func checkClassify(t *testing.T, status int, body string, which int) {
	if status < 200 || status > 599 {
		return
	}
	envelope := isEnvelope(serve(body))
	ops := []string{opMake, opRefresh, opCheck}
	op := ops[((which%3)+3)%3]
	call := upstream.Call{Op: op, Secrets: fuzzSecrets}
	e := classify(call, &upstream.Response{Status: status, Header: http.Header{}, Body: []byte(serve(body))})
	ue := checkError(t, e, unmarked(body))
	if ue.Status != status || ue.Op != op {
		t.Fatalf("status/op %d %q", ue.Status, ue.Op)
	}
	switch {
	case status >= 500 && ue.Failure != upstream.Unavailable && ue.Failure != upstream.RateLimited:
		// Transient either way (a quota code may make it "rate limited"),
		// never a refusal or a final answer.
		t.Fatalf("HTTP %d is %v: a failing ChatApp must look transient", status, ue.Failure)
	case status == 429 && ue.Failure != upstream.RateLimited:
		t.Fatalf("HTTP 429 is %v", ue.Failure)
	case (status == 401 || status == 403) && envelope && ue.Failure != upstream.Unauthorized && ue.Failure != upstream.RateLimited:
		t.Fatalf("HTTP %d in ChatApp's envelope is %v", status, ue.Failure)
	case (status == 401 || status == 403) && !envelope && ue.Failure != upstream.Unavailable:
		// A proxy or WAF answered: retried, never a refusal.
		t.Fatalf("a bare HTTP %d is %v", status, ue.Failure)
	case ue.Failure == upstream.Unauthorized && !envelope:
		t.Fatalf("HTTP %d without ChatApp's envelope is a refusal", status)
	}
	if ue.Failure == upstream.Unavailable && refused(e) {
		t.Fatal("an unavailable ChatApp counts as refusing the refresh token")
	}
}

// isEnvelope is the test's own reading of brokers.md: ChatApp's error
// answer is an object with "success": false and an "error" object holding a
// code or a message.
func isEnvelope(body string) bool {
	var env struct {
		Success *bool `json:"success"`
		Error   *struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	return json.Unmarshal([]byte(body), &env) == nil && env.Success != nil && !*env.Success &&
		env.Error != nil && (env.Error.Code != "" || env.Error.Message != "")
}

// FuzzTokenFrom: a make/refresh answer is accepted only with all four
// fields, end times read as sent (unix seconds, before year 10000), and the
// new refresh token handed back for storage. A refusal describes the answer
// and never quotes it (it may hold fresh tokens the scrubber does not know);
// and whenever the answer carries a usable refresh token, the refusal is a
// *provider.RotatedError handing it back all the same.
func FuzzTokenFrom(f *testing.F) {
	f.Add(`{"cabinetUserId":4242,"accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":1773568800}`, true)
	f.Add(`{"cabinetUserId":"4242","accessToken":"at-0123456789abcdef","accessTokenEndTime":"1772445600","refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":1.7735688e9}`, false)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600,"refreshToken":"rt-0123456789abcdef"}`, false)
	f.Add(`{"accessToken":"","accessTokenEndTime":0,"refreshToken":"","refreshTokenEndTime":-1}`, false)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":1e16,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":"NaN"}`, false)
	// The new refresh token with something else wrong: kept.
	f.Add(`{"cabinetUserId":4242,"accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600,"refreshToken":"rt-0123456789abcdef"}`, false)
	f.Add(`{"cabinetUserId":"user-4242","accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":1773568800}`, true)
	f.Add(`{"cabinetUserId":[1],"accessToken":7,"accessTokenEndTime":{},"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":null}`, false)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":"soon","refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":"1773568800"}`, false)
	// Milliseconds where seconds are documented, and the bound itself.
	f.Add(`{"cabinetUserId":4242,"accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600000,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":1773568800000}`, false)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":1.7e12,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":"1773568800000"}`, true)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":253402300799,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":253402300800}`, false)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":9223372036854775807,"refreshToken":"rt-0123456789abcdef","refreshTokenEndTime":1e300}`, false)
	// A refresh token that could never be sent back: not kept.
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600,"refreshToken":"rt-0123\r\nX: y","refreshTokenEndTime":1773568800}`, false)
	f.Add(`{"accessToken":"at-0123456789abcdef","accessTokenEndTime":1772445600,"refreshToken":1773568800,"refreshTokenEndTime":1773568800}`, false)
	// A token that is also the name of a field.
	f.Add(`{"accessToken":"refreshTokenEndTime","accessTokenEndTime":1772445600,"refreshToken":"accessTokenEndTime"}`, false)
	f.Add(`null`, false)
	f.Add(`[]`, false)
	f.Add(`"data"`, false)
	f.Add(``, false)
	f.Fuzz(func(t *testing.T, data string, made bool) {
		tok, err := tokenFrom(opRefresh, json.RawMessage(data), time.Now(), made)
		kept := usableRefresh(data)
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			ue := checkError(t, err, "")
			if ue.Failure != upstream.BadResponse {
				t.Fatalf("kind %v", ue.Failure)
			}
			var p map[string]any
			if json.Unmarshal([]byte(data), &p) == nil {
				for _, k := range []string{"accessToken", "refreshToken"} {
					// The message is the part made from the answer; the
					// rest of the text is the provider's own.
					if s, _ := p[k].(string); len(s) >= 8 && strings.Contains(ue.Message, s) {
						t.Fatalf("error quotes %s: %v", k, err)
					}
				}
			}
			var re *provider.RotatedError
			isRotated := errors.As(err, &re)
			switch {
			case kept != "" && !isRotated:
				t.Fatalf("the answer's refresh token %q is lost: %v", kept, err)
			case kept == "" && isRotated:
				t.Fatalf("kept %q from an answer without a usable refresh token", re.Rotated)
			case isRotated && (len(re.Rotated) != 1 || re.Rotated["refresh_token"] != kept):
				t.Fatalf("rotated %q, the answer had %q", re.Rotated, kept)
			case isRotated && !re.SecretExpiresAt.IsZero() && (re.SecretExpiresAt.Unix() <= 0 || re.SecretExpiresAt.Year() > 9999):
				t.Fatalf("secret end time %v out of bounds", re.SecretExpiresAt)
			}
			return
		}
		var p oraclePair
		if err := json.Unmarshal([]byte(data), &p); err != nil {
			t.Fatalf("accepted data that does not decode: %v", err)
		}
		if tok.AccessToken == "" || tok.AccessToken != p.AccessToken {
			t.Fatalf("access token %q", tok.AccessToken)
		}
		if rt := tok.Rotated["refresh_token"]; rt == "" || rt != p.RefreshToken || rt != kept {
			t.Fatalf("rotated refresh token %q, answer had %q", rt, p.RefreshToken)
		}
		if !tok.ExpiresAt.Equal(time.Unix(p.AccessTokenEndTime.value(), 0)) || !tok.SecretExpiresAt.Equal(time.Unix(p.RefreshTokenEndTime.value(), 0)) {
			t.Fatalf("end times %v %v not read as sent", tok.ExpiresAt, tok.SecretExpiresAt)
		}
		if tok.ExpiresAt.Unix() <= 0 || tok.SecretExpiresAt.Unix() <= 0 {
			t.Fatal("accepted a non-positive end time")
		}
		if tok.ExpiresAt.Year() > 9999 || tok.SecretExpiresAt.Year() > 9999 {
			t.Fatalf("accepted an end time past year 9999: %v %v", tok.ExpiresAt, tok.SecretExpiresAt)
		}
		if tok.Details["made"] != made {
			t.Fatal("made flag lost")
		}
		if _, err := json.Marshal(tok.Details); err != nil {
			t.Fatalf("details are not JSON-friendly: %v", err)
		}
	})
}

// oraclePair is the test's own reading of a whole, good answer.
type oraclePair struct {
	CabinetUserID       *unixOrInt `json:"cabinetUserId"`
	AccessToken         string     `json:"accessToken"`
	AccessTokenEndTime  *unixOrInt `json:"accessTokenEndTime"`
	RefreshToken        string     `json:"refreshToken"`
	RefreshTokenEndTime *unixOrInt `json:"refreshTokenEndTime"`
}

func (u *unixOrInt) value() int64 {
	if u == nil {
		return 0
	}
	return int64(*u)
}

// usableRefresh is the refresh token an answer's data carries when it can
// be sent back (a string, not empty, no control characters, not huge), or "".
func usableRefresh(data string) string {
	var p struct {
		RefreshToken json.RawMessage `json:"refreshToken"`
	}
	var s string
	if json.Unmarshal([]byte(data), &p) != nil || json.Unmarshal(p.RefreshToken, &s) != nil {
		return ""
	}
	if s == "" || len(s) > 4096 || strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }) {
		return ""
	}
	return s
}

// FuzzUnixOrInt: integers as numbers or numeric strings; the value of a
// plain integer literal is exact.
func FuzzUnixOrInt(f *testing.F) {
	for _, s := range []string{`1772445600`, `"1772445600"`, `1.7724456e9`, `null`, `""`, `"abc"`, `1e300`, `-5`, `"NaN"`, `"Inf"`, `9223372036854775807`, `"""`, `"1"2"`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		var u unixOrInt
		err := u.UnmarshalJSON([]byte(raw))
		if n, perr := strconv.ParseInt(raw, 10, 64); perr == nil {
			if err != nil || int64(u) != n {
				t.Fatalf("integer %s read as %d, %v", raw, u, err)
			}
		}
		if err == nil && (int64(u) > 1e15 || int64(u) < -1e15) {
			if _, perr := strconv.ParseInt(strings.Trim(raw, `"`), 10, 64); perr != nil {
				t.Fatalf("non-integer %q read as the huge %d", raw, u)
			}
		}
	})
}

type fuzzChatApp struct {
	mu                   sync.Mutex
	refreshStatus        int
	refreshBody          string
	makeStatus           int
	makeBody             string
	refreshCalls, makes  int
	refreshHeaderSeen    string
	makeRequestPassword  string
	unexpectedPathOrVerb string
}

func (s *fuzzChatApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var status int
	var body string
	switch r.Method + " " + r.URL.Path {
	case opRefresh:
		s.refreshCalls++
		s.refreshHeaderSeen = r.Header.Get("Refresh")
		status, body = s.refreshStatus, s.refreshBody
	case opMake:
		s.makes++
		var req map[string]string
		_ = json.NewDecoder(r.Body).Decode(&req)
		s.makeRequestPassword = req["password"]
		status, body = s.makeStatus, s.makeBody
	default:
		s.unexpectedPathOrVerb = r.Method + " " + r.URL.Path
		status, body = 404, ""
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(serve(body)))
}

// FuzzIssue drives Issue end to end through the real upstream client with a
// stored refresh token. The make quota is spent only after a refusal of the
// refresh token, at most once, and only through ReserveQuota.
func FuzzIssue(f *testing.F) {
	srv := &fuzzChatApp{}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	client, err := upstream.New(upstream.Options{Broker: display, MaxAttempts: 3, Timeout: 5 * time.Second})
	if err != nil {
		f.Fatal(err)
	}
	end := time.Now().Add(24 * time.Hour).Unix()
	okBody := `{"success":true,"data":{"cabinetUserId":4242,"accessToken":"at-` + strconv.FormatInt(end, 10) + `","accessTokenEndTime":` + strconv.FormatInt(end, 10) + `,"refreshToken":"rt-new-0123456789","refreshTokenEndTime":` + strconv.FormatInt(end+13*86400, 10) + `}}`
	invalid := `{"success":false,"error":{"code":"ApiInvalidTokenError","message":"Invalid Token"}}`
	f.Add(200, okBody, 200, okBody)
	f.Add(401, invalid, 200, okBody)
	f.Add(401, invalid, 401, `{"success":false,"error":{"code":"ApiInvalidCredentialsError","message":"bad `+markPassword+`"}}`)
	f.Add(503, `{"success":false,"error":{"code":"ApiInvalidTokenError","message":"down"}}`, 200, okBody)
	f.Add(200, `{"success":true,"data":{"accessToken":"x"}}`, 200, okBody)
	f.Add(200, `{"success":true,"data":{"cabinetUserId":4242,"accessToken":"at-`, 200, okBody)
	f.Add(200, `<!DOCTYPE html><html>`+markRefresh+`</html>`, 200, okBody)
	f.Add(429, `{"success":false,"error":{"code":"ApiTooManyRequestsError","message":"slow down"}}`, 200, okBody)
	// A bare 401/403 from something in front of ChatApp: no make.
	f.Add(401, ``, 200, okBody)
	f.Add(403, `<html><body>Access denied</body></html>`, 200, okBody)
	f.Add(403, `{"message":"Forbidden"}`, 200, okBody)
	// A new pair with something else wrong: the refresh token is kept and
	// no make follows, on the refresh and on the make after a refusal.
	rotatedBad := `{"success":true,"data":{"cabinetUserId":"user-4242","accessToken":"at-new-0123456789","accessTokenEndTime":` + strconv.FormatInt(end, 10) + `,"refreshToken":"rt-new-0123456789"}}`
	rotatedMs := `{"success":true,"data":{"cabinetUserId":4242,"accessToken":"at-new-0123456789","accessTokenEndTime":` + strconv.FormatInt(end*1000, 10) + `,"refreshToken":"rt-new-0123456789","refreshTokenEndTime":` + strconv.FormatInt((end+13*86400)*1000, 10) + `}}`
	f.Add(200, rotatedBad, 200, okBody)
	f.Add(200, rotatedMs, 200, okBody)
	f.Add(401, invalid, 200, rotatedBad)
	f.Add(401, invalid, 200, rotatedMs)
	f.Add(200, `{"success":"yes","data":{"accessToken":"at-new-0123456789","refreshToken":"rt-new-0123456789"}}`, 200, okBody)
	f.Fuzz(func(t *testing.T, refreshStatus int, refreshBody string, makeStatus int, makeBody string) {
		if refreshStatus < 200 || refreshStatus > 599 || makeStatus < 200 || makeStatus > 599 {
			return
		}
		srv.mu.Lock()
		srv.refreshStatus, srv.refreshBody, srv.makeStatus, srv.makeBody = refreshStatus, refreshBody, makeStatus, makeBody
		srv.refreshCalls, srv.makes, srv.unexpectedPathOrVerb = 0, 0, ""
		srv.mu.Unlock()
		reserved := 0
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		tok, err := New().Issue(ctx, provider.Request{
			BaseURL: ts.URL, Client: client,
			Secrets:      map[string]string{"email": fuzzEmail, "password": fuzzPassword, "app_id": fuzzAppID, "refresh_token": fuzzRefresh},
			ReserveQuota: func(context.Context) error { reserved++; return nil },
		})
		srv.mu.Lock()
		refreshCalls, makes, odd := srv.refreshCalls, srv.makes, srv.unexpectedPathOrVerb
		srv.mu.Unlock()
		if odd != "" {
			t.Fatalf("called %s", odd)
		}
		if refreshCalls != 1 {
			t.Fatalf("refresh called %d times: it rotates the pair and is never retried", refreshCalls)
		}
		if makes > 1 || makes != reserved {
			t.Fatalf("%d makes, %d reserved", makes, reserved)
		}
		// Whether ChatApp refused the refresh token: an answer in ChatApp's
		// own error envelope that classifies as an auth failure. A bare
		// 401/403 (a proxy, a WAF) is not ChatApp refusing anything.
		served := serve(refreshBody)
		refreshRefused := isEnvelope(served) &&
			classify(upstream.Call{Op: opRefresh}, &upstream.Response{Status: refreshStatus, Body: []byte(served)}).Failure == upstream.Unauthorized
		if makes == 1 && !refreshRefused {
			t.Fatalf("spent a make after refresh answered HTTP %d %q", refreshStatus, refreshBody)
		}
		if refreshStatus >= 500 && makes != 0 {
			t.Fatal("spent a make on a failing ChatApp")
		}
		// A 2xx answer that is not an error and carries a refresh token
		// that can be sent back has rotated the pair: it is handed back,
		// with a token or in a RotatedError, and no make follows.
		var env struct {
			Success *bool           `json:"success"`
			Data    json.RawMessage `json:"data"`
		}
		rotatedAt := ""
		// (A 204 reaches the client without its body.)
		if refreshStatus < 300 && refreshStatus != http.StatusNoContent && json.Unmarshal([]byte(served), &env) == nil && (env.Success == nil || *env.Success) {
			rotatedAt = usableRefresh(string(env.Data))
		}
		var re *provider.RotatedError
		switch {
		case rotatedAt == "":
		case makes != 0:
			t.Fatalf("spent a make after a refresh answer carrying a new refresh token: %q", refreshBody)
		case err == nil && tok.Rotated["refresh_token"] != rotatedAt:
			t.Fatalf("rotated %q, the answer had %q", tok.Rotated["refresh_token"], rotatedAt)
		case err != nil && (!errors.As(err, &re) || re.Rotated["refresh_token"] != rotatedAt):
			t.Fatalf("the answer's refresh token %q is lost: %v", rotatedAt, err)
		}
		if err != nil {
			if tok != nil {
				t.Fatal("token and error")
			}
			if errors.Is(err, ErrMakeNotAllowed) {
				t.Fatal("ReserveQuota was given")
			}
			checkError(t, err, unmarked(refreshBody+makeBody))
			return
		}
		if tok.Rotated["refresh_token"] == "" {
			t.Fatalf("no new refresh token to store: %q", tok.Rotated["refresh_token"])
		}
	})
}
