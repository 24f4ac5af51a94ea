package sandbox

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// The ChatApp fake follows ChatApp's token docs (docs/chatapp.md):
// tokens.make (email, password, appId) returns an access/refresh pair,
// tokens.refresh (header Refresh:) returns a new pair and kills the old
// refresh token, tokens.check (header Authorization: <accessToken>, no
// Bearer) validates an access token. Tokens are shaped like ChatApp's real
// ones ("$2y$10$" and 53 characters), and clients must treat them as opaque
// (docs/chatapp.md, docs/sandbox.md).
//
// UNCONFIRMED, and so chosen here: every error code except
// ApiInvalidTokenError (documented for an invalid or expired access token),
// the HTTP statuses of the errors, the body of a successful check, and the
// make-quota window (a calendar day in UTC). Whether the old access token
// keeps working after a refresh is UNCONFIRMED too: by default it does, and
// SetChatAppAccessDiesAtRefresh switches to the strict variant.
const (
	// The one known cabinet login.
	ChatAppEmail    = "ops@example.com"
	ChatAppPassword = "sandbox-chatapp-password"
	ChatAppAppID    = "app_123"
	// ChatAppCabinetUserID is the cabinetUserId the known login reports.
	ChatAppCabinetUserID = 4242

	// Endpoint names for Calls and InjectFault.
	ChatAppMakeEP    = "POST /v1/tokens"
	ChatAppRefreshEP = "POST /v1/tokens/refresh"
	ChatAppCheckEP   = "GET /v1/tokens/check"

	// Error codes the fake answers with. Only ChatAppInvalidToken is
	// documented; the others are plausible guesses.
	ChatAppInvalidToken       = "ApiInvalidTokenError"
	ChatAppInvalidCredentials = "ApiInvalidCredentialsError" // UNCONFIRMED
	ChatAppTooManyRequests    = "ApiTooManyRequestsError"    // UNCONFIRMED
	ChatAppValidation         = "ApiValidationError"         // UNCONFIRMED
	ChatAppServerError        = "ApiServerError"             // UNCONFIRMED
	ChatAppUnavailable        = "ApiServiceUnavailableError" // UNCONFIRMED

	chatappDefaultAccess  = 24 * time.Hour
	chatappDefaultRefresh = 14 * 24 * time.Hour
	chatappDefaultQuota   = 100
	// chatappPruneAt bounds the token records of a long-running sandbox.
	chatappPruneAt = 1024
)

type chatappAccount struct {
	password      string
	appID         string
	cabinetUserID int
}

// chatappGrant is one issued token: which login it belongs to and when it
// ends.
type chatappGrant struct {
	email   string
	appID   string
	expires time.Time
	// access is, for a refresh token, the access token issued with it.
	access string
}

type chatappDay struct {
	day string // YYYY-MM-DD, UTC
	n   int
}

type chatappFake struct {
	s *Server

	mu          sync.Mutex
	accessLife  time.Duration
	refreshLife time.Duration
	quota       int // makes a day per email+appId; negative: unlimited
	// accessDiesAtRefresh kills the pair's access token when its refresh
	// token is used: the strict variant of an UNCONFIRMED fact.
	accessDiesAtRefresh bool
	accounts            map[string]chatappAccount
	access              map[string]chatappGrant
	refresh             map[string]chatappGrant
	makes               map[string]chatappDay // by email+"\x00"+appId
	// issued remembers every refresh token handed out, live or dead, so
	// leak tests can search for each.
	issued []string
}

// registerChatApp builds the fake, mounts its endpoints and admin API, and
// returns it for the Server to hold.
func registerChatApp(s *Server) *chatappFake {
	f := &chatappFake{
		s:           s,
		accessLife:  chatappDefaultAccess,
		refreshLife: chatappDefaultRefresh,
		quota:       chatappDefaultQuota,
		accounts: map[string]chatappAccount{
			ChatAppEmail: {password: ChatAppPassword, appID: ChatAppAppID, cabinetUserID: ChatAppCabinetUserID},
		},
		access:  map[string]chatappGrant{},
		refresh: map[string]chatappGrant{},
		makes:   map[string]chatappDay{},
	}
	s.handle(http.MethodPost, "/v1/tokens", chatappFault, f.make)
	s.handle(http.MethodPost, "/v1/tokens/refresh", chatappFault, f.refreshPair)
	s.handle(http.MethodGet, "/v1/tokens/check", chatappFault, f.check)
	f.registerAdmin()
	return f
}

func (f *chatappFake) endpoints() []string {
	return []string{ChatAppMakeEP, ChatAppRefreshEP, ChatAppCheckEP}
}

// chatappError is the body of every ChatApp error.
func chatappError(code, msg string) map[string]any {
	return map[string]any{"success": false, "error": map[string]any{"code": code, "message": msg}}
}

func chatappFault(status int) any {
	switch {
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return chatappError(ChatAppInvalidToken, "Invalid Token")
	case status == http.StatusTooManyRequests:
		return chatappError(ChatAppTooManyRequests, "Too Many Requests")
	case status == http.StatusServiceUnavailable || status == http.StatusBadGateway || status == http.StatusGatewayTimeout:
		return chatappError(ChatAppUnavailable, "Service temporarily unavailable")
	case status >= 500:
		return chatappError(ChatAppServerError, "Internal Server Error")
	default:
		return chatappError(ChatAppValidation, "Bad Request")
	}
}

func chatappInvalidToken(w http.ResponseWriter) {
	writeJSON(w, http.StatusUnauthorized, chatappError(ChatAppInvalidToken, "Invalid Token"))
}

func (f *chatappFake) make(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Email    string `json:"email"`
		Password string `json:"password"`
		AppID    string `json:"appId"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&body); err != nil ||
		body.Email == "" || body.Password == "" || body.AppID == "" {
		writeJSON(w, http.StatusUnprocessableEntity, chatappError(ChatAppValidation, "The email, password and appId fields are required"))
		return
	}
	now := f.s.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	acct, ok := f.accounts[body.Email]
	if !ok || acct.password != body.Password || acct.appID != body.AppID {
		// The login is quoted back, as validation errors often do, so tests
		// see whether the plugin scrubs it.
		writeJSON(w, http.StatusUnauthorized, chatappError(ChatAppInvalidCredentials,
			"Invalid email, password or appId for "+strconv.Quote(body.Email)))
		return
	}
	// Only tokens actually issued count against the daily limit.
	key := body.Email + "\x00" + body.AppID
	today := now.UTC().Format(time.DateOnly)
	d := f.makes[key]
	if d.day != today {
		d = chatappDay{day: today}
	}
	if f.quota >= 0 && d.n >= f.quota {
		writeJSON(w, http.StatusTooManyRequests, chatappError(ChatAppTooManyRequests,
			fmt.Sprintf("Token limit exceeded: %d tokens a day per email and appId", f.quota)))
		return
	}
	d.n++
	f.makes[key] = d
	writeJSON(w, http.StatusOK, f.issueLocked(now, body.Email, acct))
}

func (f *chatappFake) refreshPair(w http.ResponseWriter, r *http.Request) {
	rt := r.Header.Get("Refresh")
	now := f.s.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	g, ok := f.refresh[rt]
	if rt == "" || !ok || !now.Before(g.expires) {
		// A refused refresh token is quoted back: the plugin must scrub it.
		writeJSON(w, http.StatusUnauthorized, chatappError(ChatAppInvalidToken, "Invalid Token: "+strconv.Quote(rt)))
		return
	}
	acct, ok := f.accounts[g.email]
	if !ok || acct.appID != g.appID {
		chatappInvalidToken(w)
		return
	}
	// The pair rotates: the refresh token just used is dead from now on,
	// and under the strict variant its access token too.
	delete(f.refresh, rt)
	if f.accessDiesAtRefresh {
		delete(f.access, g.access)
	}
	writeJSON(w, http.StatusOK, f.issueLocked(now, g.email, acct))
}

func (f *chatappFake) check(w http.ResponseWriter, r *http.Request) {
	at := r.Header.Get("Authorization")
	now := f.s.now()
	f.mu.Lock()
	g, ok := f.access[at]
	cabinet := f.accounts[g.email].cabinetUserID
	f.mu.Unlock()
	// A "Bearer " prefix makes the header an unknown token: ChatApp wants
	// the bare access token.
	if at == "" || !ok || !now.Before(g.expires) {
		chatappInvalidToken(w)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"success": true, "data": map[string]any{
		"cabinetUserId":      cabinet,
		"accessTokenEndTime": g.expires.Unix(),
	}})
}

// issueLocked creates a pair and returns the success body. f.mu is held.
func (f *chatappFake) issueLocked(now time.Time, email string, acct chatappAccount) map[string]any {
	f.pruneLocked(now)
	// End times are whole unix seconds on the wire: the fake holds tokens to
	// exactly what it reported.
	atEnd := time.Unix(now.Add(f.accessLife).Unix(), 0)
	rtEnd := time.Unix(now.Add(f.refreshLife).Unix(), 0)
	at, rt := chatappToken(), chatappToken()
	f.access[at] = chatappGrant{email: email, appID: acct.appID, expires: atEnd}
	f.refresh[rt] = chatappGrant{email: email, appID: acct.appID, expires: rtEnd, access: at}
	f.issued = append(f.issued, rt)
	return map[string]any{"success": true, "data": map[string]any{
		"cabinetUserId":       acct.cabinetUserID,
		"accessToken":         at,
		"accessTokenEndTime":  atEnd.Unix(),
		"refreshToken":        rt,
		"refreshTokenEndTime": rtEnd.Unix(),
	}}
}

func (f *chatappFake) pruneLocked(now time.Time) {
	for _, m := range []map[string]chatappGrant{f.access, f.refresh} {
		if len(m) < chatappPruneAt {
			continue
		}
		for k, g := range m {
			if !now.Before(g.expires) {
				delete(m, k)
			}
		}
	}
}

// chatappAlphabet is bcrypt's base64 alphabet, which ChatApp's tokens use.
const chatappAlphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// chatappToken makes a token shaped like ChatApp's: "$2y$10$" and 53
// characters of bcrypt's alphabet (60 in all). The "$" and "/" in it are
// what a client that does not treat tokens as opaque trips on.
func chatappToken() string {
	b := make([]byte, 53)
	if _, err := rand.Read(b); err != nil {
		panic("sandbox: no randomness: " + err.Error())
	}
	for i := range b {
		b[i] = chatappAlphabet[int(b[i])%len(chatappAlphabet)]
	}
	return "$2y$10$" + string(b)
}

// registerAdmin adds /_sandbox/chatapp/{settings,revoke,makes}.
func (f *chatappFake) registerAdmin() {
	s := f.s
	s.mux.HandleFunc("POST /_sandbox/chatapp/settings", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			AccessLifetime  *string `json:"access_lifetime"`
			RefreshLifetime *string `json:"refresh_lifetime"`
			MakeQuota       *int    `json:"make_quota"`
			// AccessDiesAtRefresh: the strict variant, see
			// SetChatAppAccessDiesAtRefresh.
			AccessDiesAtRefresh *bool `json:"access_dies_at_refresh"`
		}
		if !decode(w, r, &req) {
			return
		}
		// Parse everything before applying anything, so a bad request
		// changes nothing.
		var life [2]time.Duration
		for i, v := range []*string{req.AccessLifetime, req.RefreshLifetime} {
			if v == nil {
				continue
			}
			d, err := time.ParseDuration(*v)
			if err != nil || d <= 0 {
				http.Error(w, "bad request: lifetimes must be positive durations", http.StatusBadRequest)
				return
			}
			life[i] = d
		}
		s.SetChatAppLifetimes(life[0], life[1])
		if req.MakeQuota != nil {
			s.SetChatAppMakeQuota(*req.MakeQuota)
		}
		if req.AccessDiesAtRefresh != nil {
			s.SetChatAppAccessDiesAtRefresh(*req.AccessDiesAtRefresh)
		}
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/chatapp/revoke", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RefreshToken string `json:"refresh_token"`
		}
		if !decode(w, r, &req) {
			return
		}
		s.RevokeChatAppRefresh(req.RefreshToken)
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("GET /_sandbox/chatapp/makes", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]int{"makes": s.ChatAppMakes()})
	})
}

// ChatAppMakes returns how many tokens.make calls issued a pair today (UTC),
// over every login.
func (s *Server) ChatAppMakes() int {
	today := s.now().UTC().Format(time.DateOnly)
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	n := 0
	for _, d := range s.chatapp.makes {
		if d.day == today {
			n += d.n
		}
	}
	return n
}

// ChatAppIssuedRefreshTokens returns every refresh token ever issued.
func (s *Server) ChatAppIssuedRefreshTokens() []string {
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	return append([]string(nil), s.chatapp.issued...)
}

// ChatAppRefreshValid reports whether tokens.refresh would accept rt now.
func (s *Server) ChatAppRefreshValid(rt string) bool {
	now := s.now()
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	g, ok := s.chatapp.refresh[rt]
	return ok && now.Before(g.expires)
}

// ChatAppAccessValid reports whether tokens.check would accept at now.
func (s *Server) ChatAppAccessValid(at string) bool {
	now := s.now()
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	g, ok := s.chatapp.access[at]
	return ok && now.Before(g.expires)
}

// RevokeChatAppRefresh kills a refresh token, as if ChatApp had dropped it:
// the next refresh with it is refused. Its access token keeps working.
func (s *Server) RevokeChatAppRefresh(rt string) {
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	delete(s.chatapp.refresh, rt)
}

// SetChatAppLifetimes sets the lifetimes of pairs issued from now on. A zero
// or negative duration leaves that lifetime unchanged.
func (s *Server) SetChatAppLifetimes(access, refresh time.Duration) {
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	if access > 0 {
		s.chatapp.accessLife = access
	}
	if refresh > 0 {
		s.chatapp.refreshLife = refresh
	}
}

// SetChatAppAccessDiesAtRefresh makes a refresh kill the access token
// issued with the refresh token used (true), instead of leaving it working
// until its own end time (false, the default). Which ChatApp does is
// UNCONFIRMED; under the strict variant every lease holding the old access
// token is cut short by a refresh.
func (s *Server) SetChatAppAccessDiesAtRefresh(dies bool) {
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	s.chatapp.accessDiesAtRefresh = dies
}

// SetChatAppMakeQuota sets how many makes a day each email+appId gets
// (default 100). Zero refuses every make; a negative n means no limit.
// Makes already served today still count.
func (s *Server) SetChatAppMakeQuota(n int) {
	s.chatapp.mu.Lock()
	defer s.chatapp.mu.Unlock()
	s.chatapp.quota = n
}
