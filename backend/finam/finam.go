// Package finam is the Finam Trade API provider: it mints a JWT from the
// long-lived API secret (POST /v1/sessions) and asks the broker what the JWT
// can do (POST /v1/sessions/details). Finam offers no way to revoke either.
package finam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

const (
	// Name is the provider's value of the config field `provider`.
	Name = "finam"
	// ProductionURL is the REST root of the Finam Trade API.
	ProductionURL = "https://api.finam.ru"

	display = "Finam"

	pathSessions = "/v1/sessions"
	pathDetails  = "/v1/sessions/details"
)

// Provider implements provider.Provider for Finam.
type Provider struct{}

// New returns the Finam provider.
func New() provider.Provider { return Provider{} }

// Spec describes Finam: one secret, production only, minted JWTs.
func (Provider) Spec() provider.Spec {
	return provider.Spec{
		Name:     Name,
		Display:  display,
		Issuance: provider.Minted,
		Fields: []provider.Field{{
			Name: "secret", Secret: true, Required: true,
			Description: "the API secret issued on the Finam portal (Tokens page).",
		}},
		Environments: map[string]string{"production": ProductionURL},
		DetailsHelp:  "md_permissions",
		RetireNote:   "Finam JWTs cannot be revoked; revoke the API secret on the Finam portal (Tokens page) to kill every JWT minted from it, then write a new secret here",
		// Finam allows 200 requests a minute per method.
		RatePerMinute: 180,
		RatePerOp:     true,
	}
}

// MDPermission is one market-data permission reported by TokenDetails.
type MDPermission struct {
	QuoteLevel   QuoteLevel `json:"quote_level"`
	DelayMinutes int        `json:"delay_minutes"`
	MIC          string     `json:"mic,omitempty"`
	Country      string     `json:"country,omitempty"`
	Continent    string     `json:"continent,omitempty"`
	Worldwide    bool       `json:"worldwide,omitempty"`
}

// quoteLevels are the names of the QuoteLevel enum by number
// (grpc.tradeapi.v1.auth.MDPermission.QuoteLevel).
var quoteLevels = []string{
	"QUOTE_LEVEL_UNSPECIFIED",
	"QUOTE_LEVEL_LAST_PRICE",
	"QUOTE_LEVEL_BEST_BID_OFFER",
	"QUOTE_LEVEL_DEPTH_OF_MARKET",
	"QUOTE_LEVEL_DEPTH_OF_BOOK",
	"QUOTE_LEVEL_ACCESS_FORBIDDEN",
}

// QuoteLevel is the quote_level enum, held by name. REST sends the name,
// but a gateway may send the number (docs/finam.md): both are read, so that
// one permission's encoding never fails the whole mint. A number the enum
// does not know is kept as its decimal text.
type QuoteLevel string

// UnmarshalJSON reads a name or a number; null leaves it empty.
func (q *QuoteLevel) UnmarshalJSON(b []byte) error {
	var name string
	if err := json.Unmarshal(b, &name); err == nil {
		*q = QuoteLevel(name)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("quote_level is neither an enum name nor a number: %w", err)
	}
	i, err := n.Int64()
	if err != nil {
		return fmt.Errorf("quote_level is not an enum number: %w", err)
	}
	if i >= 0 && i < int64(len(quoteLevels)) {
		*q = QuoteLevel(quoteLevels[i])
	} else {
		*q = QuoteLevel(strconv.FormatInt(i, 10))
	}
	return nil
}

// Details is the TokenDetails response (REST JSON is snake_case).
type Details struct {
	CreatedAt     string         `json:"created_at"`
	ExpiresAt     string         `json:"expires_at"`
	MDPermissions []MDPermission `json:"md_permissions"`
	AccountIDs    []string       `json:"account_ids"`
	ReadOnly      bool           `json:"readonly"`
}

// Issue mints a JWT and reads its details.
func (Provider) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	secret := req.Secrets["secret"]
	if secret == "" {
		return nil, errors.New("finam: secret is empty")
	}
	var auth struct {
		Token string `json:"token"`
	}
	// Mint is not retried: each call creates a session upstream, and a
	// failure is cheaper to report than to repeat against a 200/min limit.
	if err := post(ctx, req, pathSessions, map[string]string{"secret": secret}, false, []string{secret}, &auth); err != nil {
		return nil, err
	}
	if auth.Token == "" {
		return nil, badResponse(pathSessions, "no token in response")
	}
	received := req.Time()
	var det Details
	if err := post(ctx, req, pathDetails, map[string]string{"token": auth.Token}, true, []string{secret, auth.Token}, &det); err != nil {
		return nil, err
	}
	if err := accountsKnown(det, req.AllowedAccounts); err != nil {
		return nil, err
	}
	if req.RequireReadOnly && !det.ReadOnly {
		// proto3 JSON leaves a false flag out: absent means false.
		return nil, fmt.Errorf("%w: require_readonly is set but Finam reports this token can trade (TokenDetails readonly is false or absent); issue a read-only secret on the Finam portal, or unset require_readonly", provider.ErrGuard)
	}
	return tokenFrom(auth.Token, det, received)
}

// ErrNoAccounts refuses allowed_accounts for a token whose TokenDetails
// lists no account: a guard holds only on positive evidence, and proto3
// JSON drops an empty list, so "none" and "not reported" look the same.
var ErrNoAccounts = fmt.Errorf("%w: Finam lists no account for this token (TokenDetails account_ids is empty or absent), so allowed_accounts cannot be checked", provider.ErrGuard)

// accountsKnown refuses a narrowing guard the broker's answer cannot prove.
// Which accounts outside allowed the token reaches is the backend's check;
// this one only makes sure there is a list to check.
func accountsKnown(det Details, allowed []string) error {
	if len(allowed) > 0 && len(det.AccountIDs) == 0 {
		return fmt.Errorf("%w; unset allowed_accounts or use a secret whose token names its accounts", ErrNoAccounts)
	}
	return nil
}

// tokenFrom builds the token from TokenDetails, falling back to the JWT's
// own iat/exp when the details omit a timestamp.
func tokenFrom(jwt string, det Details, received time.Time) (*provider.Token, error) {
	issued, expires, err := window(jwt, det)
	if err != nil {
		return nil, err
	}
	issued, expires = provider.Lifetime(received, issued, expires)
	if !expires.After(received) {
		return nil, badResponse(pathDetails, "token is already expired (expires_at "+expires.Format(time.RFC3339)+")")
	}
	perms := make([]map[string]any, 0, len(det.MDPermissions))
	for _, p := range det.MDPermissions {
		m := map[string]any{"quote_level": string(p.QuoteLevel), "delay_minutes": p.DelayMinutes}
		switch {
		case p.MIC != "":
			m["mic"] = p.MIC
		case p.Country != "":
			m["country"] = p.Country
		case p.Continent != "":
			m["continent"] = p.Continent
		case p.Worldwide:
			m["worldwide"] = true
		}
		perms = append(perms, m)
	}
	accounts := det.AccountIDs
	if accounts == nil {
		accounts = []string{}
	}
	return &provider.Token{
		AccessToken: jwt,
		IssuedAt:    issued,
		ExpiresAt:   expires,
		AccountIDs:  accounts,
		ReadOnly:    det.ReadOnly,
		Details:     map[string]any{"md_permissions": perms},
	}, nil
}

func window(jwt string, det Details) (time.Time, time.Time, error) {
	var issued, expires time.Time
	if det.ExpiresAt != "" {
		t, err := time.Parse(time.RFC3339Nano, det.ExpiresAt)
		if err != nil {
			return issued, expires, badResponse(pathDetails, "expires_at is not an RFC 3339 time")
		}
		expires = t
	}
	if det.CreatedAt != "" {
		if t, err := time.Parse(time.RFC3339Nano, det.CreatedAt); err == nil {
			issued = t
		}
	}
	if expires.IsZero() || issued.IsZero() {
		claims, err := provider.JWTClaims(jwt)
		if err == nil {
			if t, ok := provider.NumericDate(claims, "exp"); ok && expires.IsZero() {
				expires = t
			}
			if t, ok := provider.NumericDate(claims, "iat"); ok && issued.IsZero() {
				issued = t
			}
		}
	}
	if expires.IsZero() {
		return issued, expires, badResponse(pathDetails, "the broker reported no expiry (neither expires_at nor JWT exp)")
	}
	return issued, expires, nil
}

// rpcStatus is google.rpc.Status, Finam's error body.
type rpcStatus struct {
	Code    json.Number `json:"code"`
	Message string      `json:"message"`
}

func post(ctx context.Context, req provider.Request, path string, body any, idempotent bool, secrets []string, out any) error {
	call := upstream.Call{
		Method: http.MethodPost,
		URL:    req.BaseURL + path,
		// The /v1/sessions* calls must carry no Authorization header.
		JSON:       body,
		Idempotent: idempotent,
		Op:         "POST " + path,
		Secrets:    secrets,
	}
	resp, err := req.Client.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classify(call, r)
	})
	if err != nil {
		return err
	}
	if err := json.Unmarshal(resp.Body, out); err != nil {
		// Never quoted: a 2xx body may carry part of a fresh token.
		return badResponse(path, upstream.NotExpectedJSON(resp, ""))
	}
	return nil
}

func classify(call upstream.Call, r *upstream.Response) *upstream.Error {
	e := &upstream.Error{Broker: display, Op: call.Op, Status: r.Status, Failure: upstream.FailureForStatus(r.Status)}
	var st rpcStatus
	if err := json.Unmarshal(r.Body, &st); err == nil && (st.Message != "" || st.Code != "") {
		e.Code = upstream.Quote(st.Code.String(), call.Secrets...)
		e.Message = upstream.Quote(st.Message, call.Secrets...)
	} else {
		e.Message = upstream.Quote(string(r.Body), call.Secrets...)
	}
	switch {
	case r.Status == http.StatusUnauthorized || r.Status == http.StatusBadRequest:
		// Every AuthService call answers 400/401 for an expired or invalid
		// secret or token (the proto says so for 400 too). A JWT refused
		// right after its mint means the secret behind it no longer works.
		e.Failure = upstream.Unauthorized
		e.Hint = "the API secret is wrong, expired or revoked: issue a new one on the Finam portal (Tokens page) and write it to this config"
	case r.Status == http.StatusTooManyRequests:
		e.Hint = "Finam allows 200 requests a minute per method"
	case r.Status == http.StatusNotFound:
		e.Hint = "the account is not in this token"
	}
	return e
}

func badResponse(path, msg string) *upstream.Error {
	return upstream.BadResponseError(display, "POST "+path, msg)
}

// Ensure Provider satisfies the interface.
var _ provider.Provider = Provider{}
