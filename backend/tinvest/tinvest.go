// Package tinvest is the T-Invest API provider (formerly Tinkoff Invest API).
//
// T-Invest has no API to mint, exchange or revoke tokens: the plugin keeps the
// long-lived token, validates it (UsersService/GetInfo and GetAccounts on the
// REST gateway) and hands out the token itself. The access levels GetAccounts
// reports are the only way the kind of token shows itself.
package tinvest

import (
	"context"
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
	Name = "tinvest"
	// ProductionURL and SandboxURL are the REST gateway roots, /rest included.
	ProductionURL = "https://invest-public-api.tbank.ru/rest"
	SandboxURL    = "https://sandbox-invest-public-api.tbank.ru/rest"

	// EnvProduction and EnvSandbox are the environments T-Invest has.
	EnvProduction = "production"
	EnvSandbox    = "sandbox"

	// DefaultTTL is the lease TTL: the token has no expiry we could read, so
	// a lease is bounded by policy and renewed by validating again.
	DefaultTTL = time.Hour

	// SettingsURL is where a user issues (and sees) T-Invest tokens.
	SettingsURL = "https://www.tbank.ru/invest/settings/"

	broker       = "T-Invest"
	usersService = "/tinkoff.public.invest.api.contract.v1.UsersService/"
	opGetInfo    = "POST UsersService/GetInfo"
	opGetAccts   = "POST UsersService/GetAccounts"
)

// Token kinds reported as Details["token_kind"].
const (
	KindFullAccess     = "full-access"
	KindReadOnly       = "read-only"
	KindAccountLimited = "account-limited"
	KindSandbox        = "sandbox"
)

// Provider implements provider.Provider for T-Invest.
type Provider struct{}

// New returns the T-Invest provider.
func New() provider.Provider { return Provider{} }

// Spec describes T-Invest: one token, production and sandbox, passed through.
func (Provider) Spec() provider.Spec {
	return provider.Spec{
		Name:    Name,
		Display: broker,
		Kind:    provider.Passthrough,
		Fields: []provider.Field{{
			Name: "token", Secret: true, Required: true,
			Description: "tinvest: the T-Invest API token issued in the T-Invest settings (" + SettingsURL + "). A sandbox token needs environment=sandbox.",
		}},
		Environments: map[string]string{EnvProduction: ProductionURL, EnvSandbox: SandboxURL},
		// UsersService allows 100 unary requests a minute per token.
		RatePerMinute: 90,
		DefaultTTL:    DefaultTTL,
	}
}

// Issue validates the token upstream and reports what it can reach.
func (Provider) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	token := req.Secrets["token"]
	if token == "" {
		return nil, errors.New("tinvest: token is empty")
	}
	if req.Client == nil {
		return nil, errors.New("tinvest: no upstream client")
	}
	env, err := environment(req.Environment)
	if err != nil {
		return nil, err
	}
	c := caller{base: strings.TrimRight(req.BaseURL, "/"), client: req.Client, env: env, token: token}
	var info getInfoResponse
	if err := c.post(ctx, "GetInfo", opGetInfo, &info); err != nil {
		return nil, err
	}
	var accts getAccountsResponse
	if err := c.post(ctx, "GetAccounts", opGetAccts, &accts); err != nil {
		return nil, err
	}
	return tokenFrom(token, env, info, accts, time.Now())
}

// environment normalises the request's environment. Empty means production,
// the config's default, so a caller that does not set it gets the hosts it
// most likely meant.
func environment(env string) (string, error) {
	switch env {
	case "", EnvProduction:
		return EnvProduction, nil
	case EnvSandbox:
		return EnvSandbox, nil
	}
	return "", fmt.Errorf("tinvest: unknown environment %q (want %s or %s)", env, EnvProduction, EnvSandbox)
}

// tokenFrom derives the token's reach and kind from GetInfo and GetAccounts.
func tokenFrom(token, env string, info getInfoResponse, accts getAccountsResponse, now time.Time) (*provider.Token, error) {
	ids := []string{}
	details := make([]map[string]any, 0, len(accts.Accounts))
	noAccess, trading := 0, 0
	for _, a := range accts.Accounts {
		if a.ID == "" {
			// allowed_accounts could not be checked against a nameless account.
			return nil, badResponse(opGetAccts, "an account has no id", "")
		}
		level := a.AccessLevel.enum(accessLevels)
		d := map[string]any{
			"id":           a.ID,
			"type":         a.Type.enum(accountTypes),
			"name":         a.Name,
			"status":       a.Status.enum(accountStatuses),
			"access_level": level,
		}
		if t, ok := date(a.OpenedDate); ok {
			d["opened_date"] = t
		}
		if t, ok := date(a.ClosedDate); ok {
			d["closed_date"] = t
		}
		details = append(details, d)
		switch level {
		case AccessNone:
			noAccess++
			continue
		case AccessFull:
			trading++
		case AccessReadOnly:
		default:
			// An unspecified or unknown level cannot prove the account is
			// read-only; require_readonly must not pass on a guess.
			trading++
		}
		ids = append(ids, a.ID)
	}
	readOnly := trading == 0
	var kind string
	switch {
	case env == EnvSandbox:
		kind = KindSandbox
	case noAccess > 0 && len(ids) > 0:
		// UNCONFIRMED: the docs do not say how a token limited to one account
		// shows itself. We take the other accounts reported as NO_ACCESS to
		// mean "limited"; if the broker instead omits them, such a token is
		// indistinguishable from a user with one account and is reported as
		// read-only or full-access by its access level, which is still true.
		kind = KindAccountLimited
	case readOnly:
		kind = KindReadOnly
	default:
		kind = KindFullAccess
	}
	return &provider.Token{
		AccessToken: token,
		IssuedAt:    now,
		// T-Invest tokens die three months after their last use, or when
		// revoked; no expiry can be read, so none is claimed.
		ExpiresAt:  time.Time{},
		AccountIDs: ids,
		ReadOnly:   readOnly,
		Details: map[string]any{
			"accounts":   details,
			"user_id":    info.UserID,
			"tariff":     info.Tariff,
			"token_kind": kind,
		},
	}, nil
}

// date renders a proto Timestamp for the details. An open account's
// closedDate is sent as the Unix epoch rather than omitted, so the epoch
// counts as unset.
func date(s string) (string, bool) {
	if s == "" {
		return "", false
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		// Shown as sent: a date we cannot parse is no reason to refuse a token.
		return s, true
	}
	if t.Unix() <= 0 {
		return "", false
	}
	return t.UTC().Format(time.RFC3339), true
}

// caller makes the UsersService calls for one Issue.
type caller struct {
	base   string
	client *upstream.Client
	env    string
	token  string
}

func (c caller) post(ctx context.Context, method, op string, out any) error {
	call := upstream.Call{
		Method:     http.MethodPost,
		URL:        c.base + usersService + method,
		Header:     http.Header{"Authorization": {"Bearer " + c.token}},
		JSON:       struct{}{},
		Idempotent: true, // reads only
		Op:         op,
		Secrets:    []string{c.token},
	}
	resp, err := c.client.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classify(call, c.env, r)
	})
	if err != nil {
		return err
	}
	if err := decodeJSON(resp.Body, out); err != nil {
		msg := "response is not the expected JSON (" + upstream.Quote(string(resp.Body), call.Secrets...) + ")"
		return badResponse(op, msg, trackingID(resp.Header, call.Secrets))
	}
	return nil
}

func badResponse(op, msg, tracking string) *upstream.Error {
	return &upstream.Error{Broker: broker, Op: op, Kind: upstream.KindBadResponse, Message: withTracking(msg, tracking)}
}
