// Package alor is the ALOR OpenAPI provider: it mints a short-lived access
// JWT from the long-lived refresh token (POST /refresh on ALOR's OAuth host)
// and reads what the JWT grants from its own claims. ALOR offers no API to
// revoke either token; a refresh token is revoked on the developer portal.
package alor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

const (
	// Name is the provider's value of the config field `provider`.
	Name = "alor"
	// ProductionURL and SandboxURL are ALOR's OAuth hosts; the mint path
	// hangs off them.
	ProductionURL = "https://oauth.alor.ru"
	SandboxURL    = "https://oauthdev.alor.ru"

	display     = "ALOR"
	fieldToken  = "refresh_token"
	pathRefresh = "/refresh"
	opRefresh   = "POST " + pathRefresh

	authHint = "the refresh token is wrong, expired or revoked on the ALOR developer portal (API Access Tokens page): " +
		"create a new one and write it to this config; a refresh token of the test environment is refused by " +
		"production and vice versa: check environment"
)

// ErrNarrowing is returned when allowed_accounts is set and the JWT ALOR
// issued reaches a portfolio outside it (or does not say which it reaches).
var ErrNarrowing = fmt.Errorf("%w: ALOR access token is not narrowed to allowed_accounts", provider.ErrGuard)

// Provider implements provider.Provider for ALOR.
type Provider struct{}

// New returns the ALOR provider.
func New() provider.Provider { return Provider{} }

// Spec describes ALOR: one refresh token, production and test hosts, minted
// JWTs.
func (Provider) Spec() provider.Spec {
	return provider.Spec{
		Name:     Name,
		Display:  display,
		Issuance: provider.Minted,
		Fields: []provider.Field{{
			Name: fieldToken, Secret: true, Required: true,
			Description: "the refresh token created on the ALOR developer portal (API Access Tokens page).",
		}},
		// The portal shows when a refresh token expires; the API does not.
		DeclaredExpiry: true,
		// allowedPortfolios narrows a JWT at issue.
		NarrowsAccounts: true,
		OptionNotes: map[string]string{
			"refresh_token_expires_at": "ALOR's is on the developer portal's API Access Tokens page.",
		},
		DetailsHelp: "login, scope, portfolios, agreements (account_ids are the JWT's\n" +
			"portfolios)",
		RetireNote:   "ALOR access JWTs cannot be revoked; revoke the refresh token on the ALOR developer portal (API Access Tokens) to kill every JWT made from it, then write a new refresh token here",
		Environments: map[string]string{"production": ProductionURL, "sandbox": SandboxURL},
		// ALOR answers 429 to too many concurrent requests; its limit is
		// not published, so stay well under any plausible one.
		MaxConcurrent: 4,
	}
}

// refreshRequest is the JSON body of POST /refresh. The token travels in the
// body, not in ?token=, so that no URL that might be logged carries it.
type refreshRequest struct {
	Token             string   `json:"token"`
	AllowedPortfolios []string `json:"allowedPortfolios,omitempty"`
}

// Issue mints an access JWT, narrowed to req.AllowedAccounts when set, and
// checks that ALOR did narrow it.
func (Provider) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	refresh := req.Secrets[fieldToken]
	if refresh == "" {
		return nil, errors.New("alor: refresh_token is empty")
	}
	if req.Client == nil {
		return nil, errors.New("alor: no upstream client")
	}
	call := upstream.Call{
		Method: http.MethodPost,
		URL:    strings.TrimRight(req.BaseURL, "/") + pathRefresh,
		// No Authorization header: the refresh token is the credential.
		JSON: refreshRequest{Token: refresh, AllowedPortfolios: req.AllowedAccounts},
		// Not retried: each call mints a token, and a failure is cheaper to
		// report than to repeat against a concurrency limit.
		Idempotent: false,
		Op:         opRefresh,
		Secrets:    []string{refresh},
	}
	env := environment(req)
	resp, err := req.Client.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classify(call, r, env, len(req.AllowedAccounts) > 0)
	})
	if err != nil {
		return nil, err
	}
	received := req.Time()
	jwt, err := accessToken(resp, refresh)
	if err != nil {
		return nil, err
	}
	tok, err := tokenFrom(jwt, received, req.AllowedAccounts)
	if err != nil {
		return nil, err
	}
	if req.RequireReadOnly && !tok.ReadOnly {
		return nil, notReadOnly(tok)
	}
	return tok, nil
}

// ErrNotReadOnly is returned under require_readonly for a JWT that does
// not show it cannot trade.
var ErrNotReadOnly = fmt.Errorf("%w: require_readonly is set", provider.ErrGuard)

// notReadOnly says why tok is not shown read-only, from its scope.
func notReadOnly(tok *provider.Token) error {
	scope, present := tok.Details["scope"].(string)
	switch {
	case !present:
		return fmt.Errorf("%w but the ALOR access token has no scope claim, so it cannot be shown read-only", ErrNotReadOnly)
	case strings.TrimSpace(scope) == "":
		return fmt.Errorf("%w but the ALOR access token's scope claim is empty, so it cannot be shown read-only", ErrNotReadOnly)
	}
	var trading []string
	for _, w := range strings.Fields(scope) {
		if !readOnly([]string{w}) {
			trading = append(trading, w)
		}
	}
	return fmt.Errorf("%w but ALOR reports this token can trade (its scope grants %s); every refresh token created on the ALOR portal carries full rights and ALOR offers no read-only one: unset require_readonly for ALOR", ErrNotReadOnly, strings.Join(trading, ", "))
}

// accessToken reads the JWT from the response {"AccessToken": ...} (that
// casing, as ALOR's docs and its .NET SDK show).
func accessToken(resp *upstream.Response, refresh string) (string, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(resp.Body, &m); err != nil {
		// Never quoted: a 2xx body may carry part of a fresh token.
		return "", badResponse(upstream.NotExpectedJSON(resp, ""))
	}
	raw, ok := m["AccessToken"]
	if !ok {
		return "", badResponse("no AccessToken in response")
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil || s == "" {
		return "", badResponse("AccessToken is not a non-empty string")
	}
	return s, nil
}

// tokenFrom reads what ALOR granted from the JWT's claims and checks it
// reaches no portfolio outside allowed. The signature is not verified: the
// plugin is not the audience, the broker verifies it.
func tokenFrom(jwt string, received time.Time, allowed []string) (*provider.Token, error) {
	claims, err := provider.JWTClaims(jwt)
	if err != nil {
		// The error text quotes no part of the token.
		return nil, badResponse("AccessToken is not a readable JWT: " + err.Error())
	}
	expires, ok := provider.NumericDate(claims, "exp")
	if !ok {
		return nil, badResponse("the access token has no exp claim")
	}
	issued, _ := provider.NumericDate(claims, "iat") // zero: Lifetime uses the receipt time
	issued, expires = provider.Lifetime(received, issued, expires)
	if !expires.After(received) {
		return nil, badResponse("the access token is already expired (exp " + expires.Format(time.RFC3339) + ")")
	}
	portfolios, present, ok := words(claims, "portfolios")
	if !ok {
		return nil, badResponse("the portfolios claim is neither a string nor a list of strings")
	}
	if err := checkNarrowed(portfolios, present, allowed); err != nil {
		return nil, err
	}
	if !present {
		portfolios = []string{}
	}
	agreements, agreementsPresent, ok := words(claims, "agreements")
	if !ok {
		return nil, badResponse("the agreements claim is neither a string nor a list of strings")
	}
	// The creds show the portfolios and the agreements they belong to as
	// the JWT states them (account_ids are the portfolios too); a claim the
	// JWT lacks is left out rather than shown as an empty list.
	details := map[string]any{}
	if present {
		details["portfolios"] = portfolios
	}
	if agreementsPresent {
		details["agreements"] = provider.NonNil(agreements)
	}
	if sub, ok := claims["sub"].(string); ok && sub != "" {
		details["login"] = sub
	}
	scope, scopePresent, ok := words(claims, "scope")
	if !ok {
		return nil, badResponse("the scope claim is neither a string nor a list of strings")
	}
	if s, isString := claims["scope"].(string); isString {
		details["scope"] = s
	} else if scopePresent {
		details["scope"] = strings.Join(scope, " ")
	}
	return &provider.Token{
		AccessToken: jwt,
		IssuedAt:    issued,
		ExpiresAt:   expires,
		AccountIDs:  portfolios,
		// Read-only needs positive evidence: a scope that lists rights and
		// none of them an order right. No scope claim, or an empty one,
		// proves nothing, and require_readonly must then fail closed.
		ReadOnly: scopePresent && len(scope) > 0 && readOnly(scope),
		Details:  details,
	}, nil
}

// words reads a claim ALOR sends as a space-separated string. A JSON list of
// strings is read too: it costs nothing and says the same. present is false
// when the claim is absent; ok is false when it has another type.
func words(claims map[string]any, name string) (list []string, present, ok bool) {
	v, present := claims[name]
	if !present || v == nil {
		return nil, false, true
	}
	switch v := v.(type) {
	case string:
		return strings.Fields(v), true, true
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			s, isString := e.(string)
			if !isString {
				return nil, true, false
			}
			out = append(out, strings.Fields(s)...)
		}
		return out, true, true
	}
	return nil, true, false
}

// readOnly reports whether a scope grants no order rights (the caller
// refuses an empty scope as no evidence). Any word starting
// with "Orders" other than "OrdersRead..." counts as trading: OrdersCreate
// places orders, and OrdersCancel is trading too (cancelling a stop-loss
// leaves a position unprotected, cancelling a closing order keeps it open).
// An order right this code does not know is treated as trading, so that
// require_readonly fails closed. Case is ignored.
func readOnly(scope []string) bool {
	for _, w := range scope {
		lw := strings.ToLower(w)
		if strings.HasPrefix(lw, "orders") && !strings.HasPrefix(lw, "ordersread") {
			return false
		}
	}
	return true
}

// checkNarrowed refuses a JWT that reaches a portfolio outside allowed:
// ALOR narrows on request, but the plugin does not take that on trust. The
// guard holds only on positive evidence: ALOR does not document that the
// narrowed JWT's portfolios claim shows the narrowing, so a JWT whose claim
// is missing or empty is refused, never passed.
func checkNarrowed(got []string, present bool, allowed []string) error {
	if len(allowed) == 0 {
		return nil
	}
	if !present {
		return fmt.Errorf("%w: the token does not say which portfolios it reaches (no portfolios claim), so the narrowing cannot be verified", ErrNarrowing)
	}
	if len(got) == 0 {
		return fmt.Errorf("%w: the token's portfolios claim is empty, so the narrowing cannot be verified", ErrNarrowing)
	}
	ok := make(map[string]bool, len(allowed))
	for _, a := range allowed {
		ok[strings.TrimSpace(a)] = true
	}
	var extra []string
	for _, p := range got {
		if !ok[p] {
			extra = append(extra, p)
		}
	}
	if len(extra) > 0 {
		return fmt.Errorf("%w: it also reaches %s (allowed: %s)", ErrNarrowing, strings.Join(extra, ", "), strings.Join(allowed, ", "))
	}
	return nil
}

// environment names the environment the call went to, for the hint: the
// config's own name, else the one whose default host the base URL is.
func environment(req provider.Request) string {
	if req.Environment != "" {
		return req.Environment
	}
	base := strings.TrimRight(req.BaseURL, "/")
	for name, u := range (Provider{}).Spec().Environments {
		if base == u {
			return name
		}
	}
	return ""
}

func classify(call upstream.Call, r *upstream.Response, env string, narrowing bool) *upstream.Error {
	e := &upstream.Error{Broker: display, Op: call.Op, Status: r.Status, Failure: upstream.FailureForStatus(r.Status)}
	e.Message = upstream.Quote(message(r.Body), call.Secrets...)
	switch {
	case r.Status == http.StatusForbidden || r.Status == http.StatusUnauthorized:
		// 403 means the refresh token is wrong, expired or revoked
		// (docs/alor.md); 401 is not documented for /refresh, but an auth
		// failure all the same.
		e.Failure = upstream.Unauthorized
		e.Hint = authHint
		if env != "" {
			e.Hint += " (this config uses the " + env + " environment)"
		}
	case r.Status == http.StatusTooManyRequests:
		e.Failure = upstream.RateLimited
		e.Hint = "ALOR allows a limited number of concurrent requests"
	case r.Status == http.StatusBadRequest && narrowing:
		e.Hint = "check allowed_accounts: ALOR refuses to narrow a token to a portfolio this refresh token does not reach"
	}
	return e
}

// message extracts what ALOR said. Its error bodies are not documented
// (empty, short text, or a JSON object are all seen or plausible), so a
// JSON object's message/title/error is used when present, else the body.
// The caller quotes it (scrub, then excerpt).
func message(body []byte) string {
	var m map[string]any
	if json.Unmarshal(body, &m) == nil {
		for _, k := range []string{"message", "Message", "title", "error_description", "error"} {
			if s, ok := m[k].(string); ok && s != "" {
				return s
			}
		}
	}
	return string(body)
}

func badResponse(msg string) *upstream.Error {
	return upstream.BadResponseError(display, opRefresh, msg)
}

// Ensure Provider satisfies the interface.
var _ provider.Provider = Provider{}
