package bcs

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// RefreshClaims are what a BCS refresh token says of itself. The signature
// is HMAC with a BCS secret: a client can decode the claims, never verify
// them (UNCONFIRMED, Keycloak's default), and BCS checks them at exchange.
type RefreshClaims struct {
	Raw string
	// Azp is the client the token was issued to: trade-api-read (read
	// only) or trade-api-write (trade and read).
	Azp string
	// Expires is exp (zero if absent): 90 days from issue, fixed.
	Expires time.Time
	// Typ is "Refresh" for web-issued tokens (an online session).
	Typ string
}

// ParseRefreshToken reads a refresh token's claims. The error says what is
// wrong without quoting any part of the token.
func ParseRefreshToken(token string) (*RefreshClaims, error) {
	claims, err := provider.JWTClaims(token)
	if err != nil {
		return nil, fmt.Errorf("is not a BCS refresh token (a JWT of about 600-900 characters starting with eyJ): %w", err)
	}
	azp, _ := claims["azp"].(string)
	if strings.TrimSpace(azp) == "" {
		return nil, errors.New("has no azp claim, so the client_id to send is unknown: it is not a BCS Trade API refresh token")
	}
	rc := &RefreshClaims{Raw: token, Azp: azp}
	rc.Typ, _ = claims["typ"].(string)
	if _, present := claims["exp"]; present {
		exp, ok := provider.NumericDate(claims, "exp")
		if !ok {
			return nil, errors.New("has an exp claim that is not a date")
		}
		rc.Expires = exp
	}
	return rc, nil
}

// SecretExpiry is Spec.SecretExpiry: the refresh token's exp. A value that
// is not a BCS refresh token is refused at the config write, naming the
// field; the claims are never shown.
func SecretExpiry(secrets map[string]string) (time.Time, error) {
	rc, err := ParseRefreshToken(secrets[fieldToken])
	if err != nil {
		return time.Time{}, fmt.Errorf("refresh_token: the value %w; copy the whole token shown once in the BCS web terminal, or issue a new one", err)
	}
	return rc.Expires, nil
}

// TokenResponse is the 200 answer of the token endpoint.
type TokenResponse struct {
	AccessToken string
	// ExpiresIn and RefreshExpiresIn are the access token's life and the
	// refresh token's remaining life, counted from receipt.
	ExpiresIn        time.Duration
	RefreshExpiresIn time.Duration
	// RefreshToken is the new refresh token ("" if the answer had none).
	RefreshToken string
}

// ParseTokenResponse reads the token endpoint's 200 answer leniently where
// the sources disagree: expires_in as a number or a numeric string (the
// PDF calls it "Строка"), token_type in either case, not-before-policy and
// scope of any type (ignored; scope says nothing of the rights), id_token
// ignored. The error never quotes the body: it holds fresh tokens.
func ParseTokenResponse(body []byte) (*TokenResponse, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(body, &m); err != nil || m == nil {
		return nil, fmt.Errorf("response is not a JSON object (%d bytes)", len(body))
	}
	var out TokenResponse
	var ok bool
	if out.AccessToken, ok = stringField(m, "access_token"); !ok || out.AccessToken == "" {
		return nil, errors.New("response has no access_token string")
	}
	if tt, present := m["token_type"]; present {
		var s string
		if json.Unmarshal(tt, &s) != nil || !strings.EqualFold(s, "bearer") {
			return nil, errors.New("token_type is not Bearer")
		}
	}
	secs, present, ok := seconds(m, "expires_in")
	if !present || !ok || secs <= 0 {
		return nil, errors.New("expires_in is missing or not a positive number of seconds")
	}
	out.ExpiresIn = secs
	if secs, present, ok := seconds(m, "refresh_expires_in"); present && ok && secs > 0 {
		out.RefreshExpiresIn = secs
	}
	if raw, present := m["refresh_token"]; present && string(raw) != "null" {
		if out.RefreshToken, ok = stringField(m, "refresh_token"); !ok {
			return nil, errors.New("refresh_token is not a string")
		}
	}
	return &out, nil
}

func stringField(m map[string]json.RawMessage, name string) (string, bool) {
	var s string
	if err := json.Unmarshal(m[name], &s); err != nil {
		return "", false
	}
	return s, true
}

// maxSeconds bounds a lifetime a broker can claim: ten years.
const maxSeconds = 10 * 365 * 24 * 3600

// seconds reads a count of seconds sent as a JSON number or a numeric
// string.
func seconds(m map[string]json.RawMessage, name string) (d time.Duration, present, ok bool) {
	raw, present := m[name]
	if !present || string(raw) == "null" {
		return 0, false, true
	}
	s := strings.TrimSpace(string(bytes.Trim(raw, `"`)))
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) || f > maxSeconds || f < -maxSeconds {
		return 0, true, false
	}
	return time.Duration(f * float64(time.Second)), true, true
}

// Portfolio is what the portfolio answer says of the account.
type Portfolio struct {
	// Agreements are the distinct agreementId values: the brokerage
	// account number (official docs).
	Agreements []string
	// Accounts are the distinct `account` values: trading accounts (one
	// SDK).
	Accounts []string
}

// maxAccounts bounds what a hostile answer can make the plugin store.
const maxAccounts = 64

// wrapKeys are where an object wrapping the positions may keep them. The
// top-level array is SINGLE-SOURCE, so a wrapped list is read too.
var wrapKeys = []string{"positions", "portfolio", "items", "data", "content", "result", "records"}

// ParsePortfolio reads the accounts from the portfolio answer: a top-level
// array of positions, or an object wrapping one (under a known key, or its
// only array). agreementId and account may be strings or numbers;
// positions without them are skipped. An empty portfolio tells nothing.
func ParsePortfolio(body []byte) (*Portfolio, error) {
	body = bytes.TrimSpace(body)
	var positions []json.RawMessage
	switch {
	case len(body) > 0 && body[0] == '[':
		if err := json.Unmarshal(body, &positions); err != nil {
			return nil, fmt.Errorf("portfolio is not a JSON array of positions (%d bytes)", len(body))
		}
	case len(body) > 0 && body[0] == '{':
		var m map[string]json.RawMessage
		if err := json.Unmarshal(body, &m); err != nil {
			return nil, fmt.Errorf("portfolio is not a JSON object (%d bytes)", len(body))
		}
		list, ok := wrapped(m)
		if !ok {
			return nil, errors.New("portfolio object holds no list of positions")
		}
		positions = list
	default:
		return nil, fmt.Errorf("portfolio is neither a JSON array nor an object (%d bytes)", len(body))
	}
	p := &Portfolio{Agreements: []string{}}
	seenA, seenT := map[string]bool{}, map[string]bool{}
	for _, raw := range positions {
		var pos map[string]json.RawMessage
		if json.Unmarshal(raw, &pos) != nil {
			continue
		}
		if a, ok := idField(pos, "agreementId"); ok && !seenA[a] && len(p.Agreements) < maxAccounts {
			seenA[a] = true
			p.Agreements = append(p.Agreements, a)
		}
		if a, ok := idField(pos, "account"); ok && !seenT[a] && len(p.Accounts) < maxAccounts {
			seenT[a] = true
			p.Accounts = append(p.Accounts, a)
		}
	}
	return p, nil
}

func wrapped(m map[string]json.RawMessage) ([]json.RawMessage, bool) {
	var list []json.RawMessage
	for _, k := range wrapKeys {
		if raw, ok := m[k]; ok && json.Unmarshal(raw, &list) == nil {
			return list, true
		}
	}
	var only []json.RawMessage
	n := 0
	for _, raw := range m {
		if r := bytes.TrimSpace(raw); len(r) > 0 && r[0] == '[' && json.Unmarshal(r, &list) == nil {
			only, n = list, n+1
		}
	}
	return only, n == 1
}

// idField reads an identifier sent as a string or a number; it must be
// short and printable to count.
func idField(m map[string]json.RawMessage, name string) (string, bool) {
	raw, ok := m[name]
	if !ok {
		return "", false
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		var n json.Number
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		if dec.Decode(&n) != nil {
			return "", false
		}
		s = n.String()
	}
	s = strings.TrimSpace(s)
	if s == "" || len(s) > 64 || strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return "", false
	}
	return s, true
}

// The refusals BCS gives with invalid_grant (HTTP 400), by their
// error_description.
type reason int

const (
	reasonOther reason = iota
	// reasonInvalid: malformed, truncated or tampered (CONFIRMED).
	reasonInvalid
	// reasonExpired: past exp (SINGLE-SOURCE: "Token is not active").
	reasonExpired
	// reasonSession: deleted in the web terminal (SINGLE-SOURCE: "Session
	// not active").
	reasonSession
	// reasonClient: client_id is not the token's azp (CONFIRMED).
	reasonClient
	// reasonReused: the token was used before and the realm retires used
	// tokens. No BCS source reports it; these are Keycloak's words when
	// "Revoke Refresh Token" is on (UNCONFIRMED for BCS).
	reasonReused
)

func reasonOf(desc string) reason {
	d := strings.ToLower(desc)
	switch {
	case strings.Contains(d, "client") && strings.Contains(d, "match"):
		return reasonClient
	case strings.Contains(d, "reuse") || strings.Contains(d, "stale token"):
		return reasonReused
	case strings.Contains(d, "session not active"):
		return reasonSession
	case strings.Contains(d, "not active") || strings.Contains(d, "expired"):
		return reasonExpired
	case strings.Contains(d, "invalid refresh token"):
		return reasonInvalid
	}
	return reasonOther
}

const (
	hintInvalid = "BCS does not accept this refresh token (malformed, truncated or altered): copy the whole token again; it is shown only once, so if it is lost, " + RenewSecret
	hintExpired = "the refresh token's 90 days are over and cannot be extended: " + RenewSecret
	hintSession = "the token was deleted in the BCS web terminal («Токены API») or its session ended: " + RenewSecret
	hintClient  = "the client_id sent is the token's own azp claim, and BCS says the token was issued to another client: the token is damaged or not a BCS Trade API token; " + RenewSecret
	hintReused  = "BCS retires a refresh token once it is used, and this one had been used already (by another program holding the same token, or by an exchange whose answer was lost): " + RenewSecret
	hintRefused = "BCS refused the refresh token: " + RenewSecret
	hintClient2 = "BCS does not know the client_id read from the token's azp claim: it is not a BCS Trade API token; " + RenewSecret
	hintFailing = "BCS is failing; the plugin tries again on the next read"
	hintLimit   = "BCS allows 10 requests a second per service; the plugin tries again on the next read"
	hintAPI     = "BCS refused the access token it had just issued; the plugin tries again on the next read"
)

// oauthError is the token endpoint's error body.
type oauthError struct {
	Error       string `json:"error"`
	Description string `json:"error_description"`
}

// classify turns a token endpoint answer other than 2xx into an
// *upstream.Error carrying BCS's error and error_description (scrubbed of
// the tokens). The invalid_grant answers are the secret refused, final;
// 429 and 5xx are transient, whatever their body (no shape is known).
func classify(call upstream.Call, r *upstream.Response, sent *RefreshClaims) *upstream.Error {
	e := &upstream.Error{Broker: display, Op: call.Op, Status: r.Status, Failure: upstream.FailureForStatus(r.Status)}
	var oe oauthError
	if json.Unmarshal(r.Body, &oe) == nil && (oe.Error != "" || oe.Description != "") {
		e.Code = upstream.Quote(oe.Error, call.Secrets...)
		e.Message = upstream.Quote(oe.Description, call.Secrets...)
	} else {
		e.Message = upstream.Quote(string(r.Body), call.Secrets...)
	}
	switch {
	case r.Status == http.StatusTooManyRequests:
		e.Failure, e.Hint = upstream.RateLimited, hintLimit
	case r.Status >= 500:
		e.Failure, e.Hint = upstream.Unavailable, hintFailing
	case r.Status < 400 || r.Status >= 500:
		// Not an answer BCS refuses with: the status decides.
	case oe.Error == "invalid_grant":
		e.Failure = upstream.Unauthorized
		switch reasonOf(oe.Description) {
		case reasonInvalid:
			e.Hint = hintInvalid
		case reasonExpired:
			e.Hint = hintExpired
			if !sent.Expires.IsZero() {
				e.Hint = "its exp is " + sent.Expires.UTC().Format(time.RFC3339) + "; " + hintExpired
			}
		case reasonSession:
			e.Hint = hintSession
		case reasonClient:
			e.Hint = hintClient
		case reasonReused:
			e.Hint = hintReused
		default:
			e.Hint = hintRefused
		}
	case oe.Error == "invalid_client" || r.Status == http.StatusUnauthorized:
		e.Failure, e.Hint = upstream.Unauthorized, hintClient2
	}
	return e
}

// classifyAPI turns a REST service answer other than 2xx into an error: a
// 401 with an empty body and WWW-Authenticate, or a JSON body with a type
// (RESOURCE_EXHAUSTED for the rate limit).
func classifyAPI(call upstream.Call, r *upstream.Response) *upstream.Error {
	e := &upstream.Error{Broker: display, Op: call.Op, Status: r.Status, Failure: upstream.FailureForStatus(r.Status)}
	var body struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(r.Body, &body) == nil && body.Type != "" {
		e.Code = upstream.Quote(body.Type, call.Secrets...)
	}
	if len(bytes.TrimSpace(r.Body)) > 0 && e.Code == "" {
		e.Message = upstream.Quote(string(r.Body), call.Secrets...)
	}
	if wa := r.Header.Get("WWW-Authenticate"); wa != "" && e.Message == "" {
		e.Message = upstream.Quote(wa, call.Secrets...)
	}
	switch {
	case r.Status == http.StatusTooManyRequests || body.Type == "RESOURCE_EXHAUSTED":
		e.Failure, e.Hint = upstream.RateLimited, hintLimit
	case r.Status >= 500:
		e.Failure, e.Hint = upstream.Unavailable, hintFailing
	case r.Status == http.StatusUnauthorized:
		e.Hint = hintAPI
	}
	return e
}
