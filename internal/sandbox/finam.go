package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Default Finam secrets the sandbox knows from the start.
const (
	FinamSecret         = "sandbox-finam-secret"
	FinamReadOnlySecret = "sandbox-finam-readonly"
)

type finamAccount struct {
	Accounts []string `json:"account_ids"`
	ReadOnly bool     `json:"readonly"`
	revoked  bool
}

type finamSession struct {
	secret  string
	created time.Time
	expires time.Time
}

type finamFake struct {
	s   *Server
	key []byte

	mu       sync.Mutex
	lifetime time.Duration
	limit    int
	// numericQuoteLevel sends quote_level as the enum's number, which a
	// gateway may do instead of the name (docs/finam.md).
	numericQuoteLevel bool
	secrets           map[string]*finamAccount
	sessions          map[string]finamSession // by jti
	window            map[string]rateWindow   // by method
}

type rateWindow struct {
	start time.Time
	n     int
}

func newFinam(s *Server, key []byte, lifetime time.Duration, limit int) *finamFake {
	return &finamFake{
		s: s, key: key, lifetime: lifetime, limit: limit,
		secrets: map[string]*finamAccount{
			FinamSecret:         {Accounts: []string{"1899011", "1899012"}},
			FinamReadOnlySecret: {Accounts: []string{"1899011"}, ReadOnly: true},
		},
		sessions: map[string]finamSession{},
		window:   map[string]rateWindow{},
	}
}

func (f *finamFake) endpoints() []string {
	return []string{"POST /v1/sessions", "POST /v1/sessions/details"}
}

func (f *finamFake) register(s *Server) {
	s.handle(http.MethodPost, "/v1/sessions", finamFault, f.auth)
	s.handle(http.MethodPost, "/v1/sessions/details", finamFault, f.details)
}

// finamStatus is google.rpc.Status, the body of every Finam error.
func finamStatus(code int, msg string) map[string]any {
	return map[string]any{"code": code, "message": msg, "details": []any{}}
}

func finamFault(status int) any {
	switch status {
	case http.StatusTooManyRequests:
		return finamStatus(8, "Too many requests. Limit: 200 requests per minute")
	case http.StatusServiceUnavailable:
		return finamStatus(14, "Service is unavailable. Try again later")
	case http.StatusGatewayTimeout:
		return finamStatus(4, "Deadline expired before operation could complete")
	case http.StatusUnauthorized:
		return finamStatus(16, "Token is expired or invalid")
	default:
		return finamStatus(13, "Internal server error. Try again later")
	}
}

// limited applies the per-method limit (fixed one-minute windows).
func (f *finamFake) limited(w http.ResponseWriter, method string) bool {
	now := f.s.now()
	f.mu.Lock()
	win := f.window[method]
	if now.Sub(win.start) >= time.Minute {
		win = rateWindow{start: now}
	}
	win.n++
	f.window[method] = win
	over := win.n > f.limit
	f.mu.Unlock()
	if over {
		writeJSON(w, http.StatusTooManyRequests, finamFault(http.StatusTooManyRequests))
	}
	return over
}

func (f *finamFake) auth(w http.ResponseWriter, r *http.Request) {
	if f.limited(w, "Auth") {
		return
	}
	// The session calls take the secret in the body; Finam rejects an
	// Authorization header on them.
	if r.Header.Get("Authorization") != "" {
		writeJSON(w, http.StatusBadRequest, finamStatus(3, "Authorization header is not allowed for this method"))
		return
	}
	var body struct {
		Secret string `json:"secret"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&body); err != nil || body.Secret == "" {
		writeJSON(w, http.StatusBadRequest, finamStatus(3, "secret is required"))
		return
	}
	now := f.s.now()
	f.mu.Lock()
	acct, ok := f.secrets[body.Secret]
	if !ok || acct.revoked {
		f.mu.Unlock()
		writeJSON(w, http.StatusUnauthorized, finamEcho(body.Secret))
		return
	}
	jti := randomID()
	exp := now.Add(f.lifetime)
	f.sessions[jti] = finamSession{secret: body.Secret, created: now, expires: exp}
	f.mu.Unlock()
	tok := signHS256(f.key, map[string]any{
		"iss": "broker-sandbox/finam", "sub": "client-" + jti[:6], "jti": jti,
		"iat": now.Unix(), "exp": exp.Unix(),
	})
	writeJSON(w, http.StatusOK, map[string]string{"token": tok})
}

func (f *finamFake) details(w http.ResponseWriter, r *http.Request) {
	if f.limited(w, "TokenDetails") {
		return
	}
	if r.Header.Get("Authorization") != "" {
		writeJSON(w, http.StatusBadRequest, finamStatus(3, "Authorization header is not allowed for this method"))
		return
	}
	var body struct {
		Token string `json:"token"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&body); err != nil || body.Token == "" {
		writeJSON(w, http.StatusBadRequest, finamStatus(3, "token is required"))
		return
	}
	sess, acct, ok := f.session(body.Token)
	if !ok {
		writeJSON(w, http.StatusUnauthorized, finamEcho(body.Token))
		return
	}
	f.mu.Lock()
	numeric := f.numericQuoteLevel
	f.mu.Unlock()
	// QUOTE_LEVEL_LAST_PRICE = 1, QUOTE_LEVEL_BEST_BID_OFFER = 2.
	var last, bbo any = "QUOTE_LEVEL_LAST_PRICE", "QUOTE_LEVEL_BEST_BID_OFFER"
	if numeric {
		last, bbo = 1, 2
	}
	det := map[string]any{
		"created_at": sess.created.UTC().Format(time.RFC3339Nano),
		"expires_at": sess.expires.UTC().Format(time.RFC3339Nano),
		"md_permissions": []map[string]any{
			{"quote_level": last, "delay_minutes": 0, "mic": "MISX"},
			{"quote_level": bbo, "delay_minutes": 15, "worldwide": true},
		},
	}
	// proto3 JSON leaves out an empty list and a false bool, as Finam's
	// gateway may: the plugin must not read "absent" as "none".
	if len(acct.Accounts) > 0 {
		det["account_ids"] = acct.Accounts
	}
	if acct.ReadOnly {
		det["readonly"] = true
	}
	writeJSON(w, http.StatusOK, det)
}

// finamEcho is the 401 for a secret or token Finam does not accept. It
// quotes what was presented, as gateways' error texts often do, so that
// tests see whether the plugin scrubs a secret echoed back to it.
func finamEcho(presented string) map[string]any {
	return finamStatus(16, "Token is expired or invalid: "+strconv.Quote(presented))
}

// session validates a JWT the sandbox issued and finds its live session.
func (f *finamFake) session(token string) (finamSession, finamAccount, bool) {
	claims, err := verifyHS256(f.key, token)
	if err != nil {
		return finamSession{}, finamAccount{}, false
	}
	jti, _ := claims["jti"].(string)
	f.mu.Lock()
	defer f.mu.Unlock()
	sess, ok := f.sessions[jti]
	if !ok || !f.s.now().Before(sess.expires) {
		return finamSession{}, finamAccount{}, false
	}
	acct, ok := f.secrets[sess.secret]
	if !ok || acct.revoked {
		return finamSession{}, finamAccount{}, false
	}
	return sess, *acct, true
}

// FinamValid reports whether a JWT would be accepted by the broker now.
func (s *Server) FinamValid(token string) bool {
	_, _, ok := s.finam.session(token)
	return ok
}

// AddFinamSecret registers (or replaces) a Finam API secret.
func (s *Server) AddFinamSecret(secret string, accounts []string, readonly bool) {
	s.finam.mu.Lock()
	defer s.finam.mu.Unlock()
	s.finam.secrets[secret] = &finamAccount{Accounts: append([]string(nil), accounts...), ReadOnly: readonly}
}

// RevokeFinamSecret revokes a secret on the "portal": it can mint no more,
// and the JWTs it minted are refused.
func (s *Server) RevokeFinamSecret(secret string) {
	s.finam.mu.Lock()
	defer s.finam.mu.Unlock()
	if a, ok := s.finam.secrets[secret]; ok {
		a.revoked = true
	}
}

// SetFinamTokenLifetime changes the lifetime of JWTs minted from now on.
func (s *Server) SetFinamTokenLifetime(d time.Duration) {
	s.finam.mu.Lock()
	defer s.finam.mu.Unlock()
	s.finam.lifetime = d
}

// SetFinamNumericQuoteLevel makes TokenDetails send quote_level as the
// enum's number instead of its name.
func (s *Server) SetFinamNumericQuoteLevel(numeric bool) {
	s.finam.mu.Lock()
	defer s.finam.mu.Unlock()
	s.finam.numericQuoteLevel = numeric
}

// SetFinamRateLimit changes the per-method limit (requests a minute).
func (s *Server) SetFinamRateLimit(n int) {
	s.finam.mu.Lock()
	defer s.finam.mu.Unlock()
	s.finam.limit = n
	s.finam.window = map[string]rateWindow{}
}

func randomID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
