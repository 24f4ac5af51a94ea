package sandbox

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"net/http"
	"strings"
	"sync"
	"time"
)

// The BCS fake follows the spec for a faithful fake in bcs-facts.md §8
// (docs/bcs.md, docs/sandbox.md): the Keycloak token endpoint exchanges a
// refresh token (form body: grant_type=refresh_token, client_id, and the
// token) for an access token, checking in BCS's order (unknown client_id,
// then a bad token, expiry, client mismatch, a deleted session), and every
// answer carries a new refresh token with the same session, expiry and
// azp. By default the token sent stays valid (SINGLE-SOURCE [BACSY]);
// SetBCSRevokeOnUse retires a token once it is used, as Keycloak's "Revoke
// Refresh Token" realm setting would. The portfolio service answers the
// positions of the token's account.
//
// Refresh and access tokens are HS512 JWTs signed with the fake's own key.
// The key is fixed (it protects nothing: the fake is loopback only), so a
// token made by BCSToken is valid on every sandbox; sessions deleted and
// tokens used are per Server.
const (
	bcsTokenPath     = "/trade-api-keycloak/realms/tradeapi/protocol/openid-connect/token"
	bcsPortfolioPath = "/trade-api-bff-portfolio/api/v1/portfolio"
	bcsOrdersPath    = "/trade-api-bff-operations/api/v1/orders"

	// Endpoint names for Calls and InjectFault.
	BCSTokenEP     = "POST " + bcsTokenPath
	BCSPortfolioEP = "GET " + bcsPortfolioPath
	BCSOrdersEP    = "POST " + bcsOrdersPath

	// BCSAgreement is the account of the default tokens; BCSOtherAgreement
	// another client's account.
	BCSAgreement      = "400123"
	BCSOtherAgreement = "400999"

	// The two clients, as BCS names them.
	BCSClientRead  = "trade-api-read"
	BCSClientWrite = "trade-api-write"

	// The error_description strings of the token endpoint.
	BCSInvalidToken   = "Invalid refresh token"
	BCSNotActive      = "Token is not active"
	BCSSessionGone    = "Session not active"
	BCSClientMismatch = "Invalid refresh token. Token client and authorized client don't match"
	// BCSReused is Keycloak's refusal of a used token under "Revoke
	// Refresh Token" (no BCS source reports it: UNCONFIRMED).
	BCSReused = "Maximum allowed refresh token reuse exceeded"

	bcsIssuer          = "https://int.mybroker.global.bcs/trade-api-keycloak/realms/tradeapi"
	bcsRefreshLife     = 7776000 * time.Second // 90 days
	bcsDefaultAccess   = 24 * time.Hour
	bcsRatePerSecond   = 10
	bcsWWWAuthenticate = `Bearer error="invalid_token", error_description="An error occurred while attempting to decode the Jwt: Malformed token", error_uri="https://tools.ietf.org/html/rfc6750#section-3.1"`
)

// bcsKey signs the fake's JWTs (HS512).
var bcsKey = []byte("broker-sandbox: the BCS fake's realm key; it guards nothing")

// BCSTokenOptions describe a refresh token as the web terminal would issue
// it.
type BCSTokenOptions struct {
	// ReadOnly issues a «Только для чтения» token (azp trade-api-read);
	// otherwise a trade-and-read one (trade-api-write).
	ReadOnly bool
	// Agreement is the account the token is bound to (BCSAgreement when
	// empty).
	Agreement string
	// IssuedAt is when it was issued (now when zero); it expires 90 days
	// later unless Expires says otherwise.
	IssuedAt time.Time
	Expires  time.Time
}

// BCSToken issues a refresh token at the real clock, valid on every
// sandbox (the key is fixed).
func BCSToken(o BCSTokenOptions) string { return bcsIssue(o, time.Now()) }

// IssueBCSToken issues a refresh token at this sandbox's clock.
func (s *Server) IssueBCSToken(o BCSTokenOptions) string {
	tok := bcsIssue(o, s.now())
	s.bcs.record(tok)
	return tok
}

// BCSIssuedRefreshTokens returns every refresh token this sandbox issued
// (IssueBCSToken, the admin API) or returned from an exchange, oldest first.
func (s *Server) BCSIssuedRefreshTokens() []string {
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	return append([]string(nil), s.bcs.issued...)
}

func bcsIssue(o BCSTokenOptions, now time.Time) string {
	iat := o.IssuedAt
	if iat.IsZero() {
		iat = now
	}
	exp := o.Expires
	if exp.IsZero() {
		exp = iat.Add(bcsRefreshLife)
	}
	agreement := o.Agreement
	if agreement == "" {
		agreement = BCSAgreement
	}
	azp := BCSClientWrite
	if o.ReadOnly {
		azp = BCSClientRead
	}
	return bcsSign(map[string]any{
		"exp": exp.Unix(), "iat": iat.Unix(), "jti": bcsUUID(),
		"iss": bcsIssuer, "aud": bcsIssuer,
		"sub": "f:" + bcsUUID() + ":" + agreement, "typ": "Refresh", "azp": azp, "sid": bcsUUID(),
		"scope":        "openid roles acr web-origins basic",
		"extra_claims": map[string]any{"external": map[string]any{"jtiTradeApi": "0000" + bcsUUID()[:4]}},
	})
}

func bcsSign(claims map[string]any) string {
	kid := "5f1c2b7e-bcs0-4sbx-8000-000000000000"
	tok, _ := encodeJWS(`{"alg":"HS512","typ":"JWT","kid":"`+kid+`"}`, claims, func(input []byte) ([]byte, error) {
		mac := hmac.New(sha512.New, bcsKey)
		mac.Write(input)
		return mac.Sum(nil), nil
	})
	return tok
}

func bcsVerify(token string) (map[string]any, error) {
	input, sig, claims, err := parseJWS(token, "HS512")
	if err != nil {
		return nil, err
	}
	mac := hmac.New(sha512.New, bcsKey)
	mac.Write([]byte(input))
	if !hmac.Equal(sig, mac.Sum(nil)) {
		return nil, errors.New("bad signature")
	}
	return claims, nil
}

func bcsUUID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic("sandbox: no randomness: " + err.Error())
	}
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

type bcsFake struct {
	s *Server

	mu             sync.Mutex
	revokeOnUse    bool
	accessLife     time.Duration
	emptyPortfolio bool
	wrapPortfolio  bool
	deleted        map[string]bool // sessions deleted in the web terminal, by sid
	refused        map[string]bool // tokens made invalid, by jti
	used           map[string]bool // tokens exchanged successfully, by jti
	presented      map[string]int  // exchanges tried with each token, by jti
	reuses         int             // presentations of a used token under revoke-on-use
	mismatches     int             // exchanges whose client_id was not the token's azp
	window         map[string]bcsWindow
	// issued are the refresh tokens this fake issued or returned, for leak
	// searches (bounded).
	issued []string
}

// bcsKeepIssued bounds the record of issued refresh tokens.
const bcsKeepIssued = 4096

func (f *bcsFake) record(tok string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.issued) < bcsKeepIssued {
		f.issued = append(f.issued, tok)
	}
}

type bcsWindow struct {
	start time.Time
	n     int
}

func registerBCS(s *Server) *bcsFake {
	f := &bcsFake{s: s, accessLife: bcsDefaultAccess,
		deleted: map[string]bool{}, refused: map[string]bool{}, used: map[string]bool{},
		presented: map[string]int{}, window: map[string]bcsWindow{}}
	s.handle(http.MethodPost, bcsTokenPath, bcsOAuthFault, f.token)
	apiFault := func(status int) any { return bcsAPIFault(status, s.now()) }
	s.handle(http.MethodGet, bcsPortfolioPath, apiFault, f.portfolio)
	s.handle(http.MethodPost, bcsOrdersPath, apiFault, f.orders)
	f.registerAdmin(s)
	return f
}

func (f *bcsFake) endpoints() []string { return []string{BCSTokenEP, BCSPortfolioEP, BCSOrdersEP} }

// bcsOAuthFault renders an injected token endpoint failure (no BCS body is
// known for 429 or 5xx: Keycloak's JSON error shape, UNCONFIRMED).
func bcsOAuthFault(status int) any {
	return map[string]string{"error": "server_error", "error_description": http.StatusText(status)}
}

// bcsAPIFault renders an injected REST failure in the services' error body,
// stamped on the sandbox's clock.
func bcsAPIFault(status int, now time.Time) any {
	t := "INTERNAL_SERVER_ERROR"
	if status == http.StatusTooManyRequests {
		t = "RESOURCE_EXHAUSTED"
	}
	return map[string]any{"timestamp": now.UnixMilli(), "traceId": bcsUUID(), "type": t}
}

func bcsOAuthError(w http.ResponseWriter, status int, code, desc string) {
	writeJSON(w, status, map[string]string{"error": code, "error_description": desc})
}

func (f *bcsFake) token(w http.ResponseWriter, r *http.Request) {
	if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/x-www-form-urlencoded") {
		// Keycloak reads form parameters only: a JSON body has none.
		bcsOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing form parameter: grant_type")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		bcsOAuthError(w, http.StatusBadRequest, "invalid_request", "Invalid form body")
		return
	}
	form := r.PostForm
	for _, p := range []string{"grant_type", "client_id", "refresh_token"} {
		if len(form[p]) > 1 {
			bcsOAuthError(w, http.StatusBadRequest, "invalid_request", "duplicated parameter: "+p)
			return
		}
	}
	switch form.Get("grant_type") {
	case "":
		bcsOAuthError(w, http.StatusBadRequest, "invalid_request", "Missing form parameter: grant_type")
		return
	case "refresh_token":
	default:
		bcsOAuthError(w, http.StatusBadRequest, "unsupported_grant_type", "Unsupported grant_type")
		return
	}
	client := form.Get("client_id")
	if client != BCSClientRead && client != BCSClientWrite {
		writeJSON(w, http.StatusUnauthorized, map[string]string{"error": "invalid_client", "error_description": "Invalid client or Invalid client credentials"})
		return
	}
	now := f.s.now()
	claims, err := bcsVerify(form.Get("refresh_token"))
	if err != nil || claims["typ"] != "Refresh" {
		bcsOAuthError(w, http.StatusBadRequest, "invalid_grant", BCSInvalidToken)
		return
	}
	jti, _ := claims["jti"].(string)
	sid, _ := claims["sid"].(string)
	azp, _ := claims["azp"].(string)
	exp, _ := claims["exp"].(float64)

	f.mu.Lock()
	defer f.mu.Unlock()
	f.presented[jti]++
	if client != azp {
		f.mismatches++
	}
	switch {
	case float64(now.Unix()) >= exp:
		bcsOAuthError(w, http.StatusBadRequest, "invalid_grant", BCSNotActive)
		return
	case client != azp:
		bcsOAuthError(w, http.StatusBadRequest, "invalid_grant", BCSClientMismatch)
		return
	case f.deleted[sid]:
		bcsOAuthError(w, http.StatusBadRequest, "invalid_grant", BCSSessionGone)
		return
	case f.refused[jti]:
		bcsOAuthError(w, http.StatusBadRequest, "invalid_grant", BCSInvalidToken)
		return
	case f.revokeOnUse && f.used[jti]:
		f.reuses++
		bcsOAuthError(w, http.StatusBadRequest, "invalid_grant", BCSReused)
		return
	}
	f.used[jti] = true
	refreshExp := time.Unix(int64(exp), 0)
	accessExp := now.Add(f.accessLife)
	if refreshExp.Before(accessExp) {
		accessExp = refreshExp // capped at the session's end
	}
	access := bcsSign(map[string]any{
		"exp": accessExp.Unix(), "iat": now.Unix(), "jti": bcsUUID(), "iss": bcsIssuer,
		"sub": claims["sub"], "typ": "Bearer", "azp": azp, "sid": sid, "scope": "openid",
	})
	next := map[string]any{}
	for k, v := range claims {
		next[k] = v
	}
	next["jti"], next["iat"] = bcsUUID(), now.Unix()
	rotated := bcsSign(next)
	if len(f.issued) < bcsKeepIssued {
		f.issued = append(f.issued, rotated)
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, map[string]any{
		"access_token":       access,
		"expires_in":         int64(accessExp.Sub(now) / time.Second),
		"refresh_expires_in": int64(refreshExp.Sub(now) / time.Second),
		"refresh_token":      rotated,
		"token_type":         "Bearer",
		"not-before-policy":  0,
		"session_state":      sid,
		"scope":              "openid",
	})
}

// bearer checks an API call's access token: 401 with an empty body and
// WWW-Authenticate when it is missing, forged, not an access token or
// expired. A deleted trade token's access tokens die at once (BCS: within
// minutes); a read-only one's keep working to their end (up to 24 h).
func (f *bcsFake) bearer(w http.ResponseWriter, r *http.Request) (map[string]any, bool) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	claims, err := bcsVerify(tok)
	exp, _ := claims["exp"].(float64)
	sid, _ := claims["sid"].(string)
	f.mu.Lock()
	deleted := f.deleted[sid]
	f.mu.Unlock()
	if !ok || err != nil || claims["typ"] != "Bearer" || float64(f.s.now().Unix()) >= exp ||
		(deleted && claims["azp"] != BCSClientRead) {
		w.Header().Set("WWW-Authenticate", bcsWWWAuthenticate)
		w.WriteHeader(http.StatusUnauthorized)
		return nil, false
	}
	return claims, true
}

// limited applies 10 requests a second per service prefix per account.
func (f *bcsFake) limited(w http.ResponseWriter, service, agreement string) bool {
	now := f.s.now()
	f.mu.Lock()
	key := service + "\x00" + agreement
	win := f.window[key]
	if now.Sub(win.start) >= time.Second {
		win = bcsWindow{start: now}
	}
	win.n++
	f.window[key] = win
	over := win.n > bcsRatePerSecond
	f.mu.Unlock()
	if over {
		writeJSON(w, http.StatusTooManyRequests, map[string]any{"timestamp": now.UnixMilli(), "traceId": bcsUUID(), "type": "RESOURCE_EXHAUSTED"})
	}
	return over
}

func bcsAgreementOf(claims map[string]any) string {
	sub, _ := claims["sub"].(string)
	return sub[strings.LastIndex(sub, ":")+1:]
}

func (f *bcsFake) portfolio(w http.ResponseWriter, r *http.Request) {
	claims, ok := f.bearer(w, r)
	if !ok {
		return
	}
	agreement := bcsAgreementOf(claims)
	if f.limited(w, "portfolio", agreement) {
		return
	}
	f.mu.Lock()
	empty, wrap := f.emptyPortfolio, f.wrapPortfolio
	f.mu.Unlock()
	positions := []map[string]any{}
	if !empty {
		// One position per holding and settlement term, cash included.
		for _, p := range []struct {
			ticker, term string
			qty          float64
		}{{"RUB", "T0", 15000.5}, {"SBER", "T0", 10}, {"SBER", "T1", 10}} {
			positions = append(positions, map[string]any{
				"agreementId": agreement, "account": agreement + "-MS", "ticker": p.ticker,
				"term": p.term, "quantity": p.qty, "currency": "RUB",
			})
		}
	}
	if wrap {
		writeJSON(w, http.StatusOK, map[string]any{"positions": positions})
		return
	}
	writeJSON(w, http.StatusOK, positions)
}

// orders stands for every order operation: a read-only token is refused
// (403 FORBIDDEN, UNCONFIRMED shape), a trade token accepted.
func (f *bcsFake) orders(w http.ResponseWriter, r *http.Request) {
	claims, ok := f.bearer(w, r)
	if !ok {
		return
	}
	if f.limited(w, "operations", bcsAgreementOf(claims)) {
		return
	}
	if claims["azp"] != BCSClientWrite {
		writeJSON(w, http.StatusForbidden, map[string]any{"timestamp": f.s.now().UnixMilli(), "traceId": bcsUUID(), "type": "FORBIDDEN"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "accepted", "originalClientOrderId": bcsUUID()})
}

func (f *bcsFake) registerAdmin(s *Server) {
	s.mux.HandleFunc("POST /_sandbox/bcs/tokens", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			ReadOnly  bool   `json:"readonly"`
			Agreement string `json:"agreement"`
			Expires   string `json:"expires_at"`
		}
		if !decode(w, r, &req) {
			return
		}
		o := BCSTokenOptions{ReadOnly: req.ReadOnly, Agreement: req.Agreement}
		if req.Expires != "" {
			t, err := time.Parse(time.RFC3339, req.Expires)
			if err != nil {
				http.Error(w, "bad request: expires_at: "+err.Error(), http.StatusBadRequest)
				return
			}
			o.Expires, o.IssuedAt = t, t.Add(-bcsRefreshLife)
		}
		writeJSON(w, http.StatusOK, map[string]string{"refresh_token": s.IssueBCSToken(o)})
	})
	s.mux.HandleFunc("POST /_sandbox/bcs/revoke", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RefreshToken string `json:"refresh_token"`
		}
		if !decode(w, r, &req) {
			return
		}
		if !s.DeleteBCSToken(req.RefreshToken) {
			http.Error(w, "bad request: not a token of this sandbox", http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/bcs/settings", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			RevokeOnUse    *bool   `json:"revoke_on_use"`
			AccessLifetime *string `json:"access_lifetime"`
			EmptyPortfolio *bool   `json:"empty_portfolio"`
			WrapPortfolio  *bool   `json:"wrap_portfolio"`
		}
		if !decode(w, r, &req) {
			return
		}
		if req.AccessLifetime != nil {
			d, err := time.ParseDuration(*req.AccessLifetime)
			if err != nil {
				http.Error(w, "bad duration: "+err.Error(), http.StatusBadRequest)
				return
			}
			s.SetBCSAccessLifetime(d)
		}
		if req.RevokeOnUse != nil {
			s.SetBCSRevokeOnUse(*req.RevokeOnUse)
		}
		if req.EmptyPortfolio != nil || req.WrapPortfolio != nil {
			f.mu.Lock()
			if req.EmptyPortfolio != nil {
				f.emptyPortfolio = *req.EmptyPortfolio
			}
			if req.WrapPortfolio != nil {
				f.wrapPortfolio = *req.WrapPortfolio
			}
			f.mu.Unlock()
		}
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("GET /_sandbox/bcs/stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.BCSStats())
	})
}

// DeleteBCSToken deletes a token in the "web terminal": its session ends,
// so it and every refresh token of its session are refused ("Session not
// active"). It reports whether the token was one of the fake's.
func (s *Server) DeleteBCSToken(refresh string) bool {
	claims, err := bcsVerify(refresh)
	sid, _ := claims["sid"].(string)
	if err != nil || sid == "" {
		return false
	}
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	s.bcs.deleted[sid] = true
	return true
}

// RefuseBCSToken makes BCS refuse this one refresh token as invalid
// ("Invalid refresh token") while the rest of its session still works: a
// rotated token the broker does not accept, for the plugin's fallback.
func (s *Server) RefuseBCSToken(refresh string) {
	claims, _ := bcsVerify(refresh)
	jti, _ := claims["jti"].(string)
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	s.bcs.refused[jti] = true
}

// SetBCSRevokeOnUse makes a refresh token invalid once it has been
// exchanged (Keycloak's "Revoke Refresh Token"); by default the token sent
// stays valid.
func (s *Server) SetBCSRevokeOnUse(on bool) {
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	s.bcs.revokeOnUse = on
}

// SetBCSAccessLifetime changes the life of access tokens issued from now on
// (default 24 h; never past the refresh token's exp).
func (s *Server) SetBCSAccessLifetime(d time.Duration) {
	if d <= 0 {
		d = bcsDefaultAccess
	}
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	s.bcs.accessLife = d
}

// SetBCSEmptyPortfolio makes the portfolio answer an empty list (an
// account with nothing in it: no evidence of the account).
func (s *Server) SetBCSEmptyPortfolio(on bool) {
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	s.bcs.emptyPortfolio = on
}

// SetBCSWrapPortfolio makes the portfolio answer {"positions": [...]}
// instead of a top-level array (the array is SINGLE-SOURCE).
func (s *Server) SetBCSWrapPortfolio(on bool) {
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	s.bcs.wrapPortfolio = on
}

// BCSStats are the fake's counters beyond Calls.
type BCSStats struct {
	// Reuses counts presentations of an already used refresh token while
	// revoke-on-use was on: a plugin that never presents a token twice
	// keeps it at zero.
	Reuses int `json:"reuses"`
	// MaxPresented is the most exchanges tried with any one refresh token.
	MaxPresented int `json:"max_presented"`
	// ClientMismatches counts exchanges whose client_id was not the
	// token's azp.
	ClientMismatches int `json:"client_mismatches"`
}

// BCSStats returns the counters.
func (s *Server) BCSStats() BCSStats {
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	st := BCSStats{Reuses: s.bcs.reuses, ClientMismatches: s.bcs.mismatches}
	for _, n := range s.bcs.presented {
		st.MaxPresented = max(st.MaxPresented, n)
	}
	return st
}

// BCSPresented returns how many exchanges were tried with one refresh
// token.
func (s *Server) BCSPresented(refresh string) int {
	claims, _ := bcsVerify(refresh)
	jti, _ := claims["jti"].(string)
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	return s.bcs.presented[jti]
}

// BCSAccessValid reports whether an access token would be accepted by the
// BCS services now.
func (s *Server) BCSAccessValid(access string) bool {
	claims, err := bcsVerify(access)
	if err != nil || claims["typ"] != "Bearer" {
		return false
	}
	exp, _ := claims["exp"].(float64)
	sid, _ := claims["sid"].(string)
	s.bcs.mu.Lock()
	defer s.bcs.mu.Unlock()
	return float64(s.now().Unix()) < exp && (!s.bcs.deleted[sid] || claims["azp"] == BCSClientRead)
}
