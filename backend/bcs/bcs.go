// Package bcs is the BCS Trade API provider (БКС Мир инвестиций). Its
// long-lived secret is the refresh token the user issues in the BCS web
// terminal: a Keycloak JWT bound to one brokerage account, read-only or
// trade-and-read (its azp claim), living 90 days from issue (its exp claim),
// never extended. Issue exchanges it at the Keycloak token endpoint for a
// 24-hour access token (a form-encoded OAuth refresh_token grant whose
// client_id is the token's own azp), then asks the portfolio service which
// account the access token reaches. No API revokes anything: a token is
// deleted in the web terminal.
//
// Every answer carries a new refresh token with the same session and the
// same absolute expiry (CONFIRMED). Whether the one sent keeps working is
// SINGLE-SOURCE (one SDK says it does; others fall back to the original),
// so both variants are handled: the new one is returned as Token.Rotated
// (the backend stores it, crash-safe, before the access token is handed
// out) and the next exchange presents it, so a broker that retires used
// tokens never sees one twice; when BCS refuses the newest, the token the
// operator wrote is presented once instead (see Issue).
package bcs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

const (
	// Name is the provider's value of the config field `provider`.
	Name = "bcs"
	// ProductionURL is BCS's only host (there is no sandbox); the token
	// endpoint and the REST services hang off it.
	ProductionURL = "https://be.broker.ru"

	// PathToken is the Keycloak token endpoint; PathPortfolio the portfolio
	// service's one call, which takes no account: the token implies it.
	PathToken     = "/trade-api-keycloak/realms/tradeapi/protocol/openid-connect/token"
	PathPortfolio = "/trade-api-bff-portfolio/api/v1/portfolio"

	opToken     = "POST " + PathToken
	opPortfolio = "GET " + PathPortfolio

	// ClientRead and ClientWrite are the two Keycloak clients, and the two
	// values of a refresh token's azp: read only, and trade and read.
	ClientRead  = "trade-api-read"
	ClientWrite = "trade-api-write"

	display    = "BCS"
	fieldToken = "refresh_token"

	// RenewSecret is what the operator does once a token's 90 days end.
	RenewSecret = "issue a new token in the BCS web terminal (Профиль → «Управление счетами» → the account → «Токены API» → «Выпустить токен») and write it to this config"
)

// ErrNotReadOnly is returned under require_readonly for a token whose azp
// is not trade-api-read; no call is made for it.
var ErrNotReadOnly = fmt.Errorf("%w: require_readonly is set", provider.ErrGuard)

// Provider implements provider.Provider for BCS.
type Provider struct{}

// New returns the BCS provider.
func New() provider.Provider { return Provider{} }

// Spec describes BCS: one refresh token, production only, minted access
// tokens, a rotating secret with a fixed expiry.
func (Provider) Spec() provider.Spec {
	return provider.Spec{
		Name:     Name,
		Display:  display,
		Issuance: provider.Minted,
		Fields: []provider.Field{{
			Name: fieldToken, Secret: true, Required: true,
			Description: "the refresh token issued in the web terminal («Токены API» → «Выпустить токен»); its rights, account binding and 90-day expiry are read from it.",
		}},
		// BCS has no sandbox or test environment: every call is production.
		Environments: map[string]string{"production": ProductionURL},
		// Every exchange returns a new refresh token: stored with a
		// write-ahead record, and presented next.
		RotatesSecret: true,
		SecretExpiry:  SecretExpiry,
		RenewSecret:   RenewSecret,
		DetailsHelp: "client_id (the token's azp: trade-api-read or trade-api-write),\n" +
			"trading_accounts (account_ids are the portfolio's agreementId)",
		RetireNote: "BCS access tokens cannot be revoked: delete the token in the BCS web terminal («Токены API», the bin icon); " +
			"access tokens already issued from a trade token die within minutes, from a read-only token they keep working up to 24 hours",
		// 10 requests a second per service prefix, per account: stay at
		// half of it on each (the token endpoint publishes no limit, and
		// one exchange per 24-hour access token is all a config needs).
		RatePerMinute: 300,
		RatePerOp:     true,
		MaxConcurrent: 4,
	}
}

// Issue exchanges the newest refresh token for an access token and reads
// the account it reaches from the portfolio. When BCS refuses the newest
// (a rotated one) for a reason that does not also condemn the token the
// operator wrote, that token is presented once instead.
func (Provider) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	if req.Client == nil {
		return nil, errors.New("bcs: no upstream client")
	}
	newest := req.Secrets[fieldToken]
	if newest == "" {
		return nil, errors.New("bcs: refresh_token is empty")
	}
	written := req.Written[fieldToken]
	secrets := secretList(newest, written)
	tok, err := exchange(ctx, req, newest, secrets)
	if err == nil || written == "" || written == newest || !worthFallingBack(err) {
		return tok, err
	}
	// The written token was presented once already (it was exchanged for
	// the first rotated one); BCS keeps it valid per [BACSY], and the
	// refusal of the newest did not say it retires used tokens.
	tok, ferr := exchange(ctx, req, written, secrets)
	if ferr != nil {
		// The written token's failure is first in the chain (it decides
		// what the backend does); the newest's is kept as text.
		return nil, fmt.Errorf("%w (the token written to the config was tried once because BCS refused the newest one it had returned: %v)", ferr, err)
	}
	tok.Details["fell_back"] = true
	return tok, nil
}

// worthFallingBack reports whether presenting the written token could help
// after BCS refused the newest with err. The two share their session and
// their expiry (CONFIRMED), so "Token is not active" and "Session not
// active" condemn both; an answer that says BCS retires used tokens means
// the written token, used once, is retired too and must not be presented
// again. Anything else (a malformed or unreadable newest token, a client
// mismatch, an unknown refusal) is worth one try.
func worthFallingBack(err error) bool {
	var le *localError
	if errors.As(err, &le) {
		return le.fallback
	}
	ue, ok := upstream.AsError(err)
	if !ok || ue.Op != opToken || ue.Failure != upstream.Unauthorized {
		return false
	}
	switch reasonOf(ue.Message) {
	case reasonExpired, reasonSession, reasonReused:
		return false
	}
	return true
}

// exchange presents one refresh token, then reads the account.
func exchange(ctx context.Context, req provider.Request, refresh string, secrets []string) (*provider.Token, error) {
	rc, err := ParseRefreshToken(refresh)
	if err != nil {
		// Never sent: without its azp there is no client_id to send.
		return nil, &localError{msg: "bcs: the stored refresh_token " + err.Error(), fallback: true}
	}
	if req.RequireReadOnly && rc.Azp != ClientRead {
		// Known before any call: the token says what it can do.
		return nil, fmt.Errorf("%w but this BCS token is a trade-and-read token (its azp is %q, not %q): issue a «Только для чтения» (read-only) token in the BCS web terminal, or unset require_readonly", ErrNotReadOnly, rc.Azp, ClientRead)
	}
	call := upstream.Call{
		Method: http.MethodPost,
		URL:    strings.TrimRight(req.BaseURL, "/") + PathToken,
		// The client_id is the token's own azp, never asked of the operator:
		// BCS refuses any other ("Token client and authorized client don't
		// match"). Public clients: no secret, no Authorization header.
		Form: url.Values{
			"grant_type":    {"refresh_token"},
			"client_id":     {rc.Azp},
			"refresh_token": {refresh},
		},
		// Never retried: each exchange may retire the token it presents.
		Idempotent: false,
		Op:         opToken,
		Secrets:    secrets,
	}
	resp, err := req.Client.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classify(call, r, rc)
	})
	if err != nil {
		return nil, err
	}
	received := req.Time()
	ans, err := ParseTokenResponse(resp.Body)
	if err != nil {
		return nil, keepRotation(resp.Body, refresh, badResponse(opToken, err.Error()))
	}
	tok, err := tokenFrom(ans, rc, received)
	if err != nil {
		return nil, keepRotation(resp.Body, refresh, err)
	}
	accounts, trading, perr := portfolio(ctx, req, tok.AccessToken, append(secrets, tok.AccessToken, ans.RefreshToken))
	if perr != nil {
		// The exchange succeeded and may have retired the token sent: the
		// new one must reach storage, so the token is returned with no
		// account. allowed_accounts then refuses it (no evidence), and the
		// creds say why.
		tok.Details["portfolio_error"] = perr.Error()
		return tok, nil
	}
	tok.AccountIDs = accounts
	if len(trading) > 0 {
		tok.Details["trading_accounts"] = trading
	}
	return tok, nil
}

// tokenFrom builds the token from a successful answer to the exchange of
// the refresh token whose claims are sent.
func tokenFrom(ans *TokenResponse, sent *RefreshClaims, received time.Time) (*provider.Token, error) {
	expires := received.Add(ans.ExpiresIn)
	// An access token cannot outlive its session (UNCONFIRMED: Keycloak
	// caps it at the refresh token's end in the last day; expires_in then
	// says so too, but a clock can disagree).
	if !sent.Expires.IsZero() && sent.Expires.Before(expires) {
		expires = sent.Expires
	}
	if !expires.After(received) {
		return nil, badResponse(opToken, "the access token is already expired")
	}
	// Rights: the refresh token's azp. The access token's own azp, where
	// it can be read (UNCONFIRMED claims), must not say otherwise.
	azp := sent.Azp
	if ac, err := provider.JWTClaims(ans.AccessToken); err == nil {
		if a, ok := ac["azp"].(string); ok && a != "" && a != sent.Azp {
			azp = a
		}
	}
	tok := &provider.Token{
		AccessToken: ans.AccessToken,
		IssuedAt:    received,
		ExpiresAt:   expires,
		AccountIDs:  []string{},
		ReadOnly:    azp == ClientRead && sent.Azp == ClientRead,
		Details:     map[string]any{"client_id": sent.Azp},
		// Same session and expiry as the one sent; exp as a fallback.
		SecretExpiresAt: sent.Expires,
	}
	if ans.RefreshToken != "" {
		nc, err := ParseRefreshToken(ans.RefreshToken)
		if err != nil {
			return nil, badResponse(opToken, "the refresh_token returned "+err.Error())
		}
		if ans.RefreshToken != sent.Raw {
			tok.Rotated = map[string]string{fieldToken: ans.RefreshToken}
		}
		if !nc.Expires.IsZero() {
			tok.SecretExpiresAt = nc.Expires
		}
	}
	if tok.SecretExpiresAt.IsZero() && ans.RefreshExpiresIn > 0 {
		tok.SecretExpiresAt = received.Add(ans.RefreshExpiresIn).UTC()
	}
	return tok, nil
}

// keepRotation wraps err, the failure of an answer BCS sent with 200, in a
// provider.RotatedError when the answer still carries a new refresh token
// that can be presented next (a readable BCS refresh token other than the
// one sent): the sent one may be retired now, so the backend must store it.
func keepRotation(body []byte, sent string, err error) error {
	var m map[string]json.RawMessage
	if json.Unmarshal(body, &m) != nil {
		return err
	}
	next, ok := stringField(m, "refresh_token")
	if !ok || next == "" || next == sent {
		return err
	}
	nc, perr := ParseRefreshToken(next)
	if perr != nil {
		return err // could not be sent back: not kept
	}
	return &provider.RotatedError{Rotated: map[string]string{fieldToken: next}, SecretExpiresAt: nc.Expires, Err: err}
}

// portfolio asks which account the access token reaches: the agreementId
// of every position (the brokerage account number, per the official docs)
// and, apart, their trading accounts (`account`, per one SDK).
func portfolio(ctx context.Context, req provider.Request, access string, secrets []string) ([]string, []string, error) {
	call := upstream.Call{
		Method:     http.MethodGet,
		URL:        strings.TrimRight(req.BaseURL, "/") + PathPortfolio,
		Header:     http.Header{"Authorization": {"Bearer " + access}},
		Idempotent: true,
		Op:         opPortfolio,
		Secrets:    secrets,
	}
	resp, err := req.Client.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classifyAPI(call, r)
	})
	if err != nil {
		return nil, nil, err
	}
	p, err := ParsePortfolio(resp.Body)
	if err != nil {
		return nil, nil, badResponse(opPortfolio, err.Error())
	}
	return p.Agreements, p.Accounts, nil
}

// localError is a refusal made before any call.
type localError struct {
	msg string
	// fallback: the written token may still be presented.
	fallback bool
}

func (e *localError) Error() string { return e.msg }

// secretList is every value BCS must never echo back through us.
func secretList(vals ...string) []string {
	var out []string
	for _, v := range vals {
		if v != "" {
			out = append(out, v)
		}
	}
	return out
}

func badResponse(op, msg string) *upstream.Error {
	return &upstream.Error{Broker: display, Op: op, Failure: upstream.BadResponse, Message: msg}
}

// Ensure Provider satisfies the interface.
var _ provider.Provider = Provider{}
