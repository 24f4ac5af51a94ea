package sandbox

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The ALOR fake follows ALOR's protocol (docs/alor.md, docs/sandbox.md): POST
// /refresh exchanges a refresh token (query ?token= or JSON body
// {"token","allowedPortfolios"}) for an ES256 access JWT. One listener serves every broker, and ALOR's production and
// test environments share the path /refresh, so the test environment
// (oauthdev.alor.ru) is served under the prefix AlorDevPrefix: a config of
// environment "sandbox" uses base URL "<sandbox>/alor-dev", and the provider
// appends /refresh to either base unchanged.
const (
	// AlorRefreshToken is a production refresh token of login P012345. Like
	// every self-issued ALOR refresh token it carries full rights (its JWT
	// scope holds OrdersCreate): no public source shows a read-only one, so
	// the fake offers none.
	AlorRefreshToken = "sandbox-alor-refresh"
	// AlorDevRefreshToken is valid on the test environment only.
	AlorDevRefreshToken = "sandbox-alor-dev"

	// AlorDevPrefix is the path prefix of the test environment.
	AlorDevPrefix = "/alor-dev"
	// AlorRefreshEP and AlorDevRefreshEP name the endpoints for Calls and
	// InjectFault.
	AlorRefreshEP    = "POST /refresh"
	AlorDevRefreshEP = "POST " + AlorDevPrefix + "/refresh"

	alorProduction = "production"
	alorTest       = "test"

	// ALOR does not document the access token's lifetime; about 30 minutes
	// is what it is seen to be.
	alorDefaultLifetime    = 30 * time.Minute
	alorDefaultConcurrency = 10
	// alorPruneAt bounds the record of issued JWTs in a long-running sandbox.
	alorPruneAt = 1024

	alorTradingScope = "OrdersRead OrdersCreate Trades Personal Stats"
)

type alorPortfolio struct {
	id        string
	agreement string
}

// alorUser is what a refresh token stands for: a trading account (login)
// in one environment, with the rights the token was created with.
type alorUser struct {
	env        string
	login      string
	clientID   string
	ein        string
	scope      string
	portfolios []alorPortfolio
	revoked    bool
}

// alorIssued records a minted JWT, so that revoking its refresh token kills
// it, as on the real portal.
type alorIssued struct {
	refresh string
	expires time.Time
}

type alorFake struct {
	s   *Server
	key *ecdsa.PrivateKey

	mu              sync.Mutex
	lifetime        time.Duration
	limit           int
	processing      time.Duration
	inFlight        int
	ignoreNarrowing bool
	// omitPortfolios leaves the portfolios claim out of the JWT: whether a
	// narrowed JWT's claim shows the narrowing is not documented, and this
	// is the strict variant of that open fact.
	omitPortfolios bool
	lastAllowed    []string
	users          map[string]*alorUser  // by refresh token
	issued         map[string]alorIssued // by JWT
}

// newAlor builds the ALOR fake and registers its broker endpoints and its
// admin API on s.
func newAlor(s *Server) *alorFake {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic("sandbox: no randomness: " + err.Error())
	}
	f := &alorFake{
		s: s, key: key,
		lifetime: alorDefaultLifetime,
		limit:    alorDefaultConcurrency,
		users: map[string]*alorUser{
			AlorRefreshToken: alorMainUser(),
			AlorDevRefreshToken: {env: alorTest, login: "P098765", clientID: "98765", ein: "99002",
				scope: alorTradingScope, portfolios: []alorPortfolio{{"D88888", "8888888"}, {"G88888", "8888888"}}},
		},
		issued: map[string]alorIssued{},
	}
	s.handle(http.MethodPost, "/refresh", alorFault, f.refresh(alorProduction))
	s.handle(http.MethodPost, AlorDevPrefix+"/refresh", alorFault, f.refresh(alorTest))
	f.registerAdmin(s)
	return f
}

// alorMainUser is login P012345 on production, with full rights, as every
// refresh token self-issued on the portal has.
func alorMainUser() *alorUser {
	owned := []alorPortfolio{{"D12345", "1234567"}, {"D67890", "7654321"}, {"G11111", "1234567"}}
	return &alorUser{env: alorProduction, login: "P012345", clientID: "12345", ein: "99001",
		scope: alorTradingScope, portfolios: owned}
}

func (f *alorFake) endpoints() []string {
	return []string{AlorRefreshEP, AlorDevRefreshEP}
}

// alorFault renders an injected failure. ALOR's error bodies are not
// documented; its services are ASP.NET, so an injected failure gets an
// RFC 7807 problem body (UNCONFIRMED), while the fake's own refusals below
// are short plain text.
func alorFault(status int) any {
	return map[string]any{"type": "about:blank", "title": http.StatusText(status), "status": status}
}

// alorText writes a short plain-text error, the form the fake uses for its
// own 400/403/429 (UNCONFIRMED: ALOR sends an empty or short body).
func alorText(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg)
}

// enter admits a request unless the concurrency limit is reached: ALOR
// answers 429 to too many concurrent requests, not to a rate. It returns
// how long the request is to stay in flight.
func (f *alorFake) enter() (time.Duration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.inFlight >= f.limit {
		return 0, false
	}
	f.inFlight++
	return f.processing, true
}

func (f *alorFake) leave() {
	f.mu.Lock()
	f.inFlight--
	f.mu.Unlock()
}

func (f *alorFake) refresh(env string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		hold, ok := f.enter()
		if !ok {
			alorText(w, http.StatusTooManyRequests, "Too many requests")
			return
		}
		defer f.leave()
		// The body is read before the hold: net/http notices a client
		// that went away only once the body is consumed.
		token, allowed, err := alorReadRequest(w, r)
		f.mu.Lock()
		f.lastAllowed = allowed
		f.mu.Unlock()
		if hold > 0 {
			t := time.NewTimer(hold)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
		if err != nil {
			alorText(w, http.StatusBadRequest, err.Error())
			return
		}
		jwt, status, msg := f.mint(env, token, allowed)
		if status != http.StatusOK {
			alorText(w, status, msg)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"AccessToken": jwt})
	}
}

// alorReadRequest takes the refresh token from the JSON body or, failing
// that, from the query string: ALOR accepts both.
func alorReadRequest(w http.ResponseWriter, r *http.Request) (string, []string, error) {
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10))
	if err != nil {
		return "", nil, errors.New("request body too large")
	}
	var body struct {
		Token             string   `json:"token"`
		AllowedPortfolios []string `json:"allowedPortfolios"`
	}
	if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &body); err != nil {
			return "", nil, errors.New("request body is not valid JSON")
		}
	}
	token := body.Token
	if token == "" {
		token = r.URL.Query().Get("token")
	}
	if token == "" {
		return "", body.AllowedPortfolios, errors.New("token is required")
	}
	return token, body.AllowedPortfolios, nil
}

// mint checks the refresh token and signs an access JWT, narrowed to the
// allowed portfolios unless narrowing is switched off.
func (f *alorFake) mint(env, token string, allowed []string) (string, int, string) {
	now := f.s.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	u, ok := f.users[token]
	// A token of the other environment is unknown there: the two are
	// separate systems.
	if !ok || u.revoked || u.env != env {
		// The presented token is quoted back, as gateways' error texts
		// often do, so tests see whether the plugin scrubs it.
		return "", http.StatusForbidden, "Forbidden: refresh token " + strconv.Quote(token) + " is invalid, expired or revoked"
	}
	ports := u.portfolios
	if len(allowed) > 0 && !f.ignoreNarrowing {
		want := map[string]bool{}
		for _, id := range allowed {
			want[id] = true
		}
		var kept []alorPortfolio
		for _, p := range u.portfolios {
			if want[p.id] {
				kept = append(kept, p)
				delete(want, p.id)
			}
		}
		for _, id := range allowed {
			if want[id] {
				return "", http.StatusBadRequest, "portfolio " + id + " is not available to this user"
			}
		}
		ports = kept
	}
	ids := make([]string, 0, len(ports))
	var agreements []string
	seen := map[string]bool{}
	for _, p := range ports {
		ids = append(ids, p.id)
		if !seen[p.agreement] {
			seen[p.agreement] = true
			agreements = append(agreements, p.agreement)
		}
	}
	exp := time.Unix(now.Add(f.lifetime).Unix(), 0)
	// iss and aud values are plausible, not confirmed.
	iss := "Alor.Identity"
	if env == alorTest {
		iss = "AlorDev.Identity"
	}
	claims := map[string]any{
		"sub": u.login, "ein": u.ein, "clientid": u.clientID,
		"agreements": strings.Join(agreements, " "), "portfolios": strings.Join(ids, " "),
		"scope": u.scope, "iss": iss, "aud": "Client WARP WarpATConnector subscriptionsApi",
		"iat": now.Unix(), "exp": exp.Unix(),
	}
	if f.omitPortfolios {
		delete(claims, "portfolios")
	}
	jwt, err := signES256(f.key, claims)
	if err != nil {
		return "", http.StatusInternalServerError, "Internal Server Error"
	}
	if len(f.issued) >= alorPruneAt {
		for k, v := range f.issued {
			if !now.Before(v.expires) {
				delete(f.issued, k)
			}
		}
	}
	f.issued[jwt] = alorIssued{refresh: token, expires: exp}
	return jwt, http.StatusOK, ""
}

func (f *alorFake) registerAdmin(s *Server) {
	s.mux.HandleFunc("POST /_sandbox/alor/revoke", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RefreshToken string `json:"refresh_token"`
		}
		if !decode(w, r, &req) {
			return
		}
		s.RevokeAlorRefreshToken(req.RefreshToken)
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/alor/settings", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			TokenLifetime    *string `json:"token_lifetime"`
			ProcessingTime   *string `json:"processing_time"`
			ConcurrencyLimit *int    `json:"concurrency_limit"`
			IgnoreNarrowing  *bool   `json:"ignore_narrowing"`
			OmitPortfolios   *bool   `json:"omit_portfolios"`
		}
		if !decode(w, r, &req) {
			return
		}
		// Parse everything before applying anything, so a bad request
		// changes nothing.
		durs := []struct {
			v   *string
			set func(time.Duration)
		}{{req.TokenLifetime, s.SetAlorTokenLifetime}, {req.ProcessingTime, s.SetAlorProcessingTime}}
		parsed := make([]time.Duration, len(durs))
		for i, a := range durs {
			if a.v == nil {
				continue
			}
			d, err := time.ParseDuration(*a.v)
			if err != nil {
				http.Error(w, "bad duration: "+err.Error(), http.StatusBadRequest)
				return
			}
			parsed[i] = d
		}
		for i, a := range durs {
			if a.v != nil {
				a.set(parsed[i])
			}
		}
		if req.ConcurrencyLimit != nil {
			s.SetAlorConcurrencyLimit(*req.ConcurrencyLimit)
		}
		if req.IgnoreNarrowing != nil {
			s.SetAlorIgnoreNarrowing(*req.IgnoreNarrowing)
		}
		if req.OmitPortfolios != nil {
			s.SetAlorOmitPortfolios(*req.OmitPortfolios)
		}
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/alor/tokens", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RefreshToken string `json:"refresh_token"`
		}
		if !decode(w, r, &req) {
			return
		}
		if req.RefreshToken == "" {
			http.Error(w, "bad request: refresh_token is required", http.StatusBadRequest)
			return
		}
		s.AddAlorRefreshToken(req.RefreshToken)
		w.WriteHeader(http.StatusNoContent)
	})
}

// AlorValid reports whether an access JWT would be accepted by ALOR now:
// signed by this sandbox, not expired, and its refresh token not revoked.
func (s *Server) AlorValid(jwt string) bool {
	f := s.alor
	if _, err := verifyES256(&f.key.PublicKey, jwt); err != nil {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	rec, ok := f.issued[jwt]
	if !ok || !s.now().Before(rec.expires) {
		return false
	}
	u, ok := f.users[rec.refresh]
	return ok && !u.revoked
}

// RevokeAlorRefreshToken revokes a refresh token on the "portal": it mints
// no more, and every JWT made from it dies.
func (s *Server) RevokeAlorRefreshToken(token string) {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	if u, ok := s.alor.users[token]; ok {
		u.revoked = true
	}
}

// SetAlorTokenLifetime changes the lifetime of JWTs minted from now on
// (default 30 minutes).
func (s *Server) SetAlorTokenLifetime(d time.Duration) {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	s.alor.lifetime = d
}

// SetAlorConcurrencyLimit sets how many refresh requests may be in flight
// before ALOR answers 429; n <= 0 restores the default (10).
func (s *Server) SetAlorConcurrencyLimit(n int) {
	if n <= 0 {
		n = alorDefaultConcurrency
	}
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	s.alor.limit = n
}

// SetAlorProcessingTime keeps each refresh request in flight for d, so that
// concurrent requests can reach the concurrency limit. Unlike SetLatency,
// which delays a request before it reaches the broker, this time counts
// against the limit.
func (s *Server) SetAlorProcessingTime(d time.Duration) {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	s.alor.processing = d
}

// SetAlorIgnoreNarrowing makes the fake ignore allowedPortfolios, so tests
// can check that the plugin refuses a JWT reaching other portfolios.
func (s *Server) SetAlorIgnoreNarrowing(ignore bool) {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	s.alor.ignoreNarrowing = ignore
}

// SetAlorOmitPortfolios makes minted JWTs carry no portfolios claim, the
// strict variant of an undocumented fact: the plugin must then refuse
// allowed_accounts, since it cannot verify the narrowing.
func (s *Server) SetAlorOmitPortfolios(omit bool) {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	s.alor.omitPortfolios = omit
}

// AddAlorRefreshToken creates another production refresh token of login
// P012345, as the portal's "create token" does: full rights, the same
// portfolios, revoked independently of the others.
func (s *Server) AddAlorRefreshToken(token string) {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	s.alor.users[token] = alorMainUser()
}

// AlorLastAllowedPortfolios returns the allowedPortfolios of the last
// refresh request (nil when it sent none).
func (s *Server) AlorLastAllowedPortfolios() []string {
	s.alor.mu.Lock()
	defer s.alor.mu.Unlock()
	return append([]string(nil), s.alor.lastAllowed...)
}
