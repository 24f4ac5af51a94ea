package sandbox

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The T-Invest REST gateway (docs/tinvest.md). The real broker has two hosts,
// production and sandbox, with the same paths under /rest. One listener
// serves both here, so the environment is told by the path prefix: a client
// whose base URL is "<sandbox>/rest" talks to production, and one whose base
// URL is "<sandbox>/sandbox-rest" talks to the sandbox environment.
const (
	TInvestPrefix        = "/rest"
	TInvestSandboxPrefix = "/sandbox-rest"

	tinvestUsers = "/tinkoff.public.invest.api.contract.v1.UsersService/"

	// Endpoint names as Calls and InjectFault know them.
	TInvestGetInfoEP            = "POST " + TInvestPrefix + tinvestUsers + "GetInfo"
	TInvestGetAccountsEP        = "POST " + TInvestPrefix + tinvestUsers + "GetAccounts"
	TInvestSandboxGetInfoEP     = "POST " + TInvestSandboxPrefix + tinvestUsers + "GetInfo"
	TInvestSandboxGetAccountsEP = "POST " + TInvestSandboxPrefix + tinvestUsers + "GetAccounts"
)

// Default T-Invest tokens the sandbox knows from the start.
const (
	// TInvestFullToken has full access to every account of the user.
	TInvestFullToken = "sandbox-tinvest-full"
	// TInvestReadOnlyToken reads every account and cannot trade.
	TInvestReadOnlyToken = "sandbox-tinvest-readonly"
	// TInvestAccountToken has full access to TInvestAccountID only.
	TInvestAccountToken = "sandbox-tinvest-account"
	// TInvestSandboxToken works only on the sandbox environment.
	TInvestSandboxToken = "sandbox-tinvest-sandbox"

	// TInvestAccountID is the account TInvestAccountToken is limited to.
	TInvestAccountID = "2000000001"
	// TInvestUserID is the userId GetInfo reports for every default token:
	// they are one user's tokens, and share that user's rate limit.
	TInvestUserID = "8f4b2c1e-3a5d-4e6f-9a7b-0c1d2e3f4a5b"
)

// Access levels, as GetAccounts reports them per account and token.
const (
	TInvestFullAccess = "ACCOUNT_ACCESS_LEVEL_FULL_ACCESS"
	TInvestReadOnly   = "ACCOUNT_ACCESS_LEVEL_READ_ONLY"
	TInvestNoAccess   = "ACCOUNT_ACCESS_LEVEL_NO_ACCESS"
)

// TInvestAccount is one account as a token sees it: the access level is the
// token's, not the account's.
type TInvestAccount struct {
	ID          string    `json:"id"`
	Type        string    `json:"type"`
	Name        string    `json:"name"`
	Status      string    `json:"status"`
	OpenedDate  time.Time `json:"opened_date"`
	ClosedDate  time.Time `json:"closed_date"`
	AccessLevel string    `json:"access_level"`
}

type tinvestToken struct {
	user     string
	sandbox  bool
	accounts []TInvestAccount
	revoked  bool
}

type tinvestFake struct {
	s *Server

	mu     sync.Mutex
	limit  int
	tokens map[string]*tinvestToken
	window map[string]rateWindow // by prefix and user (token, for unknown tokens)
}

// registerTInvest builds the fake, mounts both environments and its admin
// endpoints, and returns it for the Server to hold.
func registerTInvest(s *Server) *tinvestFake {
	f := &tinvestFake{s: s, limit: 100, tokens: map[string]*tinvestToken{}, window: map[string]rateWindow{}}
	user := tinvestUserAccounts()
	f.tokens[TInvestFullToken] = &tinvestToken{user: TInvestUserID, accounts: withAccess(user, func(string) string { return TInvestFullAccess })}
	f.tokens[TInvestReadOnlyToken] = &tinvestToken{user: TInvestUserID, accounts: withAccess(user, func(string) string { return TInvestReadOnly })}
	// A one-account token still sees the user's other accounts, as
	// NO_ACCESS (confirmed by the maintainers, investAPI #55 and #333).
	f.tokens[TInvestAccountToken] = &tinvestToken{user: TInvestUserID, accounts: withAccess(user, func(id string) string {
		if id == TInvestAccountID {
			return TInvestFullAccess
		}
		return TInvestNoAccess
	})}
	f.tokens[TInvestSandboxToken] = &tinvestToken{user: TInvestUserID, sandbox: true, accounts: []TInvestAccount{{
		ID: "0c3e4a8f-6b1d-4f2a-9e7c-5d8b2a1f3e60", Type: "ACCOUNT_TYPE_TINKOFF", Name: "sandbox",
		Status: "ACCOUNT_STATUS_OPEN", OpenedDate: day(2024, 1, 10), AccessLevel: TInvestFullAccess,
	}}}
	for _, prefix := range []string{TInvestPrefix, TInvestSandboxPrefix} {
		sandbox := prefix == TInvestSandboxPrefix
		s.handle(http.MethodPost, prefix+tinvestUsers+"GetInfo", tinvestFault, f.serve(prefix, sandbox, f.getInfo))
		s.handle(http.MethodPost, prefix+tinvestUsers+"GetAccounts", tinvestFault, f.serve(prefix, sandbox, f.getAccounts))
	}
	f.registerAdmin()
	return f
}

func (f *tinvestFake) endpoints() []string {
	return []string{TInvestGetInfoEP, TInvestGetAccountsEP, TInvestSandboxGetInfoEP, TInvestSandboxGetAccountsEP}
}

// tinvestUserAccounts is the production user's accounts, fresh each call.
func tinvestUserAccounts() []TInvestAccount {
	return []TInvestAccount{
		{ID: TInvestAccountID, Type: "ACCOUNT_TYPE_TINKOFF", Name: "Брокерский счёт", Status: "ACCOUNT_STATUS_OPEN", OpenedDate: day(2021, 3, 1)},
		{ID: "2000000002", Type: "ACCOUNT_TYPE_TINKOFF_IIS", Name: "ИИС", Status: "ACCOUNT_STATUS_OPEN", OpenedDate: day(2022, 1, 15)},
		{ID: "2000000003", Type: "ACCOUNT_TYPE_INVEST_BOX", Name: "Инвесткопилка", Status: "ACCOUNT_STATUS_OPEN", OpenedDate: day(2023, 6, 10)},
		{ID: "2000000004", Type: "ACCOUNT_TYPE_TINKOFF", Name: "Старый счёт", Status: "ACCOUNT_STATUS_CLOSED", OpenedDate: day(2019, 5, 21), ClosedDate: day(2023, 3, 31)},
	}
}

func withAccess(accts []TInvestAccount, level func(id string) string) []TInvestAccount {
	out := make([]TInvestAccount, len(accts))
	for i, a := range accts {
		a.AccessLevel = level(a.ID)
		out[i] = a
	}
	return out
}

func day(y int, m time.Month, d int) time.Time { return time.Date(y, m, d, 0, 0, 0, 0, time.UTC) }

// tinvestError is the REST gateway's error body: the gRPC status code, a
// message, and T-Invest's own code in description.
func tinvestError(code int, msg, description string) map[string]any {
	m := map[string]any{"code": code, "message": msg}
	if description != "" {
		m["description"] = description
	}
	return m
}

func tinvestUnauthenticated() map[string]any {
	return tinvestError(16, "authentication token is missing or invalid", "40003")
}

// tinvestFault renders an injected failure. 5xx bodies carry no T-Invest code:
// which one the gateway sends is not documented.
func tinvestFault(status int) any {
	switch status {
	case http.StatusUnauthorized:
		return tinvestUnauthenticated()
	case http.StatusForbidden:
		return tinvestError(7, "insufficient privileges", "40002")
	case http.StatusTooManyRequests:
		return tinvestError(8, "request limit exceeded", "80002")
	case http.StatusServiceUnavailable:
		return tinvestError(14, "service is unavailable", "")
	case http.StatusGatewayTimeout:
		return tinvestError(4, "deadline exceeded", "")
	default:
		return tinvestError(13, "internal error", "")
	}
}

// serve wraps a method with what every T-Invest answer has: x-tracking-id,
// the rate-limit headers, the limit itself, the body check and the token
// check. (Faults injected through Server.handle are written before this runs
// and so lack the headers.)
func (f *tinvestFake) serve(prefix string, sandbox bool, method func(*tinvestToken) any) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("x-tracking-id", randomID())
		token, _ := bearer(r.Header.Get("Authorization"))
		// The limit is per user, across all that user's tokens. It is
		// counted before the token is checked, and an unknown token counts
		// against a window of its own, so a flood of bad tokens is limited
		// too. UNCONFIRMED which the real gateway checks first, and how it
		// counts calls it cannot tie to a user.
		if f.limited(w, prefix+" "+f.limitKey(token)) {
			writeJSON(w, http.StatusTooManyRequests, tinvestFault(http.StatusTooManyRequests))
			return
		}
		// The gateway takes an empty body as an empty message; anything
		// else must be a JSON object. INVALID_ARGUMENT carries no T-Invest
		// code here: which one the gateway sends is not documented.
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10))
		if err != nil || !jsonObjectOrEmpty(body) {
			writeJSON(w, http.StatusBadRequest, tinvestError(3, "request body is not a valid JSON object", ""))
			return
		}
		tok, ok := f.lookup(token, sandbox)
		if !ok {
			writeJSON(w, http.StatusUnauthorized, tinvestUnauthenticated())
			return
		}
		writeJSON(w, http.StatusOK, method(tok))
	}
}

// bearer extracts the token; the scheme is case-insensitive as in HTTP.
func bearer(h string) (string, bool) {
	scheme, token, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	token = strings.TrimSpace(token)
	return token, token != ""
}

func jsonObjectOrEmpty(b []byte) bool {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return true
	}
	var m map[string]json.RawMessage
	return b[0] == '{' && json.Unmarshal(b, &m) == nil
}

// limited counts a call in the token's fixed one-minute window and sets the
// rate-limit headers; it reports whether the call is over the limit.
func (f *tinvestFake) limited(w http.ResponseWriter, key string) bool {
	now := f.s.now()
	f.mu.Lock()
	win := f.window[key]
	if win.start.IsZero() || now.Sub(win.start) >= time.Minute {
		win = rateWindow{start: now}
		if len(f.window) >= 4096 {
			// Every distinct bearer string gets a window: drop the stale
			// ones so a flood of made-up tokens cannot grow the map forever.
			for k, v := range f.window {
				if now.Sub(v.start) >= time.Minute {
					delete(f.window, k)
				}
			}
		}
	}
	win.n++
	f.window[key] = win
	limit := f.limit
	f.mu.Unlock()
	reset := int(math.Ceil(win.start.Add(time.Minute).Sub(now).Seconds()))
	h := w.Header()
	// The real form: the current quota, then the policy with its window.
	h.Set("x-ratelimit-limit", strconv.Itoa(limit)+", "+strconv.Itoa(limit)+";w=60")
	h.Set("x-ratelimit-remaining", strconv.Itoa(max(limit-win.n, 0)))
	h.Set("x-ratelimit-reset", strconv.Itoa(max(reset, 0)))
	return win.n > limit
}

// limitKey is whose window a call counts in: the token's user, or the
// token itself when the fake does not know it.
func (f *tinvestFake) limitKey(token string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t, ok := f.tokens[token]; ok {
		return "user " + t.user
	}
	return "token " + token
}

// lookup finds a live token of the environment asked for. A token of the
// other environment is refused exactly like an unknown one, as the broker
// does.
func (f *tinvestFake) lookup(token string, sandbox bool) (*tinvestToken, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.tokens[token]
	if !ok || t.revoked || t.sandbox != sandbox {
		return nil, false
	}
	cp := *t
	cp.accounts = append([]TInvestAccount(nil), t.accounts...)
	return &cp, true
}

func (f *tinvestFake) getInfo(t *tinvestToken) any {
	return map[string]any{
		"premStatus":           false,
		"qualStatus":           false,
		"qualifiedForWorkWith": []string{"bond", "foreign_shares", "leverage"},
		"tariff":               "investor",
		"userId":               t.user,
		"riskLevelCode":        "",
	}
}

func (f *tinvestFake) getAccounts(t *tinvestToken) any {
	accts := make([]map[string]any, 0, len(t.accounts))
	for _, a := range t.accounts {
		m := map[string]any{
			"id": a.ID, "type": a.Type, "name": a.Name, "status": a.Status,
			"openedDate": timestamp(a.OpenedDate), "closedDate": timestamp(a.ClosedDate),
			"accessLevel": a.AccessLevel,
		}
		accts = append(accts, m)
	}
	return map[string]any{"accounts": accts}
}

// timestamp renders a proto Timestamp. An unset one is sent as the Unix
// epoch, as the gateway does for an open account's closedDate.
func timestamp(t time.Time) string {
	if t.IsZero() {
		t = time.Unix(0, 0)
	}
	return t.UTC().Format(time.RFC3339)
}

// TInvestValid reports whether token would be accepted now by its own
// environment.
func (s *Server) TInvestValid(token string) bool {
	s.tinvest.mu.Lock()
	defer s.tinvest.mu.Unlock()
	t, ok := s.tinvest.tokens[token]
	return ok && !t.revoked
}

// AddTInvestToken registers (or replaces) a token of a user of its own (its
// userId is TInvestTokenUser(token)): sandbox tokens work only under
// TInvestSandboxPrefix, the others only under TInvestPrefix. Each account
// carries this token's access level to it.
func (s *Server) AddTInvestToken(token string, sandbox bool, accounts ...TInvestAccount) {
	s.AddTInvestUserToken(TInvestTokenUser(token), token, sandbox, accounts...)
}

// AddTInvestUserToken registers (or replaces) a token of the given user:
// tokens of one user share that user's rate limit, as at T-Invest.
func (s *Server) AddTInvestUserToken(user, token string, sandbox bool, accounts ...TInvestAccount) {
	s.tinvest.mu.Lock()
	defer s.tinvest.mu.Unlock()
	s.tinvest.tokens[token] = &tinvestToken{user: user, sandbox: sandbox, accounts: append([]TInvestAccount(nil), accounts...)}
}

// TInvestTokenUser is the userId of a token added by AddTInvestToken.
func TInvestTokenUser(token string) string {
	sum := sha256.Sum256([]byte(token))
	return "user-" + hex.EncodeToString(sum[:8])
}

// RevokeTInvestToken revokes a token as the user would in the web account:
// every later call with it gets 40003.
func (s *Server) RevokeTInvestToken(token string) {
	s.tinvest.mu.Lock()
	defer s.tinvest.mu.Unlock()
	if t, ok := s.tinvest.tokens[token]; ok {
		t.revoked = true
	}
}

// SetTInvestRateLimit changes the UsersService limit (requests a minute per
// user) and starts every window afresh.
func (s *Server) SetTInvestRateLimit(n int) {
	s.tinvest.mu.Lock()
	defer s.tinvest.mu.Unlock()
	s.tinvest.limit = n
	s.tinvest.window = map[string]rateWindow{}
}

// registerAdmin adds /_sandbox/tinvest/{tokens,revoke,settings}.
func (f *tinvestFake) registerAdmin() {
	s := f.s
	s.mux.HandleFunc("POST /_sandbox/tinvest/tokens", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Token    string           `json:"token"`
			User     string           `json:"user"` // optional: share a user's limit
			Sandbox  bool             `json:"sandbox"`
			Accounts []TInvestAccount `json:"accounts"`
		}
		if !decode(w, r, &req) {
			return
		}
		if req.Token == "" {
			http.Error(w, "bad request: token is required", http.StatusBadRequest)
			return
		}
		if req.User == "" {
			req.User = TInvestTokenUser(req.Token)
		}
		s.AddTInvestUserToken(req.User, req.Token, req.Sandbox, req.Accounts...)
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/tinvest/revoke", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Token string `json:"token"`
		}
		if !decode(w, r, &req) {
			return
		}
		s.RevokeTInvestToken(req.Token)
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/tinvest/settings", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RateLimit *int `json:"rate_limit"`
		}
		if !decode(w, r, &req) {
			return
		}
		if req.RateLimit != nil {
			if *req.RateLimit <= 0 {
				http.Error(w, "bad request: rate_limit must be positive", http.StatusBadRequest)
				return
			}
			s.SetTInvestRateLimit(*req.RateLimit)
		}
		w.WriteHeader(http.StatusNoContent)
	})
}
