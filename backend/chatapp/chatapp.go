// Package chatapp is the ChatApp provider. Its long-lived secret is the
// cabinet login (email, password, appId) and the refresh token it produces.
// Issue refreshes the stored pair (tokens.refresh, which rotates the refresh
// token) and falls back to tokens.make only when ChatApp refuses the refresh
// token: make is limited to 100 a day per email and appId. No API revokes a
// token.
package chatapp

import (
	"bytes"
	"context"
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

const (
	// Name is the provider's value of the config field `provider`.
	Name = "chatapp"
	// ProductionURL is the root of the ChatApp API.
	ProductionURL = "https://api.chatapp.online"

	display = "ChatApp"

	pathMake    = "/v1/tokens"
	pathRefresh = "/v1/tokens/refresh"
	pathCheck   = "/v1/tokens/check"

	opMake    = "POST " + pathMake
	opRefresh = "POST " + pathRefresh
	opCheck   = "GET " + pathCheck

	// CodeInvalidToken is ChatApp's documented code for an invalid or
	// expired access token.
	CodeInvalidToken = "ApiInvalidTokenError"

	hintCredentials = "the email, password or appId is wrong: check them in the ChatApp cabinet"
	hintQuota       = "tokens.make is limited to 100 a day per email and appId"
	hintRefresh     = "the refresh token is no longer valid; the plugin falls back to tokens.make"
	hintAccess      = "the access token is invalid or expired: refresh the pair"
	hintKept        = "the answer carries a new refresh token, which is kept: the next refresh uses it, with no tokens.make"
	hintNotChatApp  = "not taken as a refusal by ChatApp: the stored refresh token and login are kept and tried again later; if this lasts, check base_url and any proxy or firewall between Vault and ChatApp"
)

// ErrMakeNotAllowed is returned when a new pair needs tokens.make but the
// request carries no ReserveQuota, which forbids spending the daily quota.
var ErrMakeNotAllowed = errors.New("chatapp: tokens.make is not allowed here")

// Provider implements provider.Provider for ChatApp.
type Provider struct{}

// New returns the ChatApp provider.
func New() provider.Provider { return Provider{} }

// Spec describes ChatApp: a cabinet login plus an optional refresh token,
// production only, minted access tokens.
func (Provider) Spec() provider.Spec {
	return provider.Spec{
		Name:     Name,
		Display:  display,
		Issuance: provider.Minted,
		// Every refresh replaces the refresh token.
		RotatesSecret: true,
		// ChatApp is not a broker: no accounts, no read-only flag.
		ReportsNoAccess: true,
		Fields: []provider.Field{
			{Name: "email", Secret: true, Required: true, Description: "the cabinet login's email, used by tokens.make."},
			{Name: "password", Secret: true, Required: true, Description: "the cabinet login's password, used by tokens.make."},
			{Name: "app_id", Secret: true, Required: true, Description: "the appId from the cabinet, used by tokens.make."},
			{Name: "refresh_token", Secret: true, Description: "optional seed of the refresh token; the plugin rotates it from then on."},
		},
		Environments: map[string]string{"production": ProductionURL},
		// A new pair from tokens.make costs one of 100 a day per login.
		Quota: &provider.Quota{
			Call:  "tokens.make",
			Limit: 100,
			// Leaves 10 a day for a human.
			DefaultBudget: 90,
			Key:           makeQuotaKey,
		},
		OptionNotes: map[string]string{
			"make_budget": "ChatApp counts tokens.make per email and appId.",
		},
		DetailsHelp: "cabinet_user_id, made (whether this pair came from tokens.make)",
		RetireNote:  "ChatApp access tokens cannot be revoked and live up to 24 hours; change the cabinet password to stop new pairs being made",
	}
}

// makeQuotaKey is the login tokens.make is counted against: email (any
// case) and appId. Counts are stored under a hash of it: keep it stable.
func makeQuotaKey(secrets map[string]string) string {
	return strings.ToLower(secrets["email"]) + "\x00" + secrets["app_id"]
}

// Issue returns an access token from the stored pair: tokens.refresh when a
// refresh token is held, tokens.make only when there is none or ChatApp
// refused it. The new refresh token is in Token.Rotated and must be stored:
// the old one no longer works. Details["made"] says whether make was spent.
//
// An answer that carries a new refresh token but cannot be accepted (a
// field missing or unreadable) fails with a *provider.RotatedError, never
// wrapped, holding the new refresh token for the backend to store: ChatApp
// has rotated the pair, so the stored refresh token is dead and dropping the
// new one would cost a make.
func (Provider) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	secrets := secretList(req.Secrets)
	if rt := req.Secrets["refresh_token"]; rt != "" {
		tok, err := refresh(ctx, req, rt, secrets)
		if err == nil {
			return tok, nil
		}
		// Only a refusal of the refresh token justifies spending the make
		// quota; anything transient is returned for a later retry with the
		// same refresh token.
		if !refused(err) {
			return nil, err
		}
		tok, merr := makePair(ctx, req, secrets)
		if merr != nil {
			// The make error stays first in the chain (its Failure is what the
			// backend acts on); the refusal is kept as text for the operator.
			var re *provider.RotatedError
			if errors.As(merr, &re) {
				re.Err = fmt.Errorf("%w (tokens.make was needed because %v)", re.Err, err)
				return nil, re
			}
			return nil, fmt.Errorf("%w (tokens.make was needed because %v)", merr, err)
		}
		return tok, nil
	}
	return makePair(ctx, req, secrets)
}

// refused reports whether err is ChatApp refusing the refresh token itself,
// as opposed to failing for a while.
func refused(err error) bool {
	// An answer that rotated the pair is no refusal, whatever else is
	// wrong with it: its refresh token is the one to use next.
	var re *provider.RotatedError
	if errors.As(err, &re) {
		return false
	}
	ue, ok := upstream.AsError(err)
	return ok && ue.Op == opRefresh && ue.Failure == upstream.Unauthorized
}

func refresh(ctx context.Context, req provider.Request, rt string, secrets []string) (*provider.Token, error) {
	call := upstream.Call{
		Method: http.MethodPost,
		URL:    req.BaseURL + pathRefresh,
		Header: http.Header{"Refresh": {rt}},
		// A refresh rotates the pair: a blind retry after a lost answer would
		// present a refresh token that is already dead.
		Idempotent: false,
		Op:         opRefresh,
		Secrets:    secrets,
	}
	data, odd, err := do(ctx, req.Client, call)
	if err != nil {
		return nil, err
	}
	return tokenFrom(opRefresh, data, req.Time(), false, odd...)
}

// makePair spends one tokens.make, after ReserveQuota agreed.
func makePair(ctx context.Context, req provider.Request, secrets []string) (*provider.Token, error) {
	email, password, appID := req.Secrets["email"], req.Secrets["password"], req.Secrets["app_id"]
	if email == "" || password == "" || appID == "" {
		return nil, errors.New("chatapp: email, password and app_id are required for tokens.make")
	}
	if req.ReserveQuota == nil {
		return nil, ErrMakeNotAllowed
	}
	if err := req.ReserveQuota(ctx); err != nil {
		return nil, fmt.Errorf("chatapp: tokens.make not reserved: %w", err)
	}
	call := upstream.Call{
		Method: http.MethodPost,
		URL:    req.BaseURL + pathMake,
		JSON:   map[string]string{"email": email, "password": password, "appId": appID},
		// Each make spends one of the 100 a day: never retried.
		Idempotent: false,
		Op:         opMake,
		Secrets:    secrets,
	}
	data, odd, err := do(ctx, req.Client, call)
	if err != nil {
		return nil, err
	}
	return tokenFrom(opMake, data, req.Time(), true, odd...)
}

// Check calls tokens.check: nil when ChatApp accepts the access token, a
// Unauthorized *upstream.Error when it answers ApiInvalidTokenError.
func Check(ctx context.Context, c *upstream.Client, baseURL, accessToken string) error {
	call := upstream.Call{
		Method: http.MethodGet,
		URL:    baseURL + pathCheck,
		// ChatApp wants the bare token, no "Bearer".
		Header:     http.Header{"Authorization": {accessToken}},
		Idempotent: true,
		Op:         opCheck,
		Secrets:    []string{accessToken},
	}
	_, odd, err := do(ctx, c, call)
	if err == nil && len(odd) > 0 {
		return badResponse(opCheck, "response "+strings.Join(odd, "; "))
	}
	return err
}

// pair is the data of a make or refresh answer, each field as sent: one
// field ChatApp sent oddly must not hide the others (above all the new
// refresh token). The tags match keys as encoding/json does.
type pair struct {
	CabinetUserID       json.RawMessage `json:"cabinetUserId"`
	AccessToken         json.RawMessage `json:"accessToken"`
	AccessTokenEndTime  json.RawMessage `json:"accessTokenEndTime"`
	RefreshToken        json.RawMessage `json:"refreshToken"`
	RefreshTokenEndTime json.RawMessage `json:"refreshTokenEndTime"`
}

type apiError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// envelope is a successful answer as sent: {"success": true, "data": ...}.
type envelope struct {
	Success json.RawMessage `json:"success"`
	Data    json.RawMessage `json:"data"`
}

// unixOrInt reads an integer sent as a JSON number or a numeric string.
type unixOrInt int64

func (u *unixOrInt) UnmarshalJSON(b []byte) error {
	s := string(bytes.Trim(b, `"`))
	if s == "null" || s == "" {
		return nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*u = unixOrInt(n)
		return nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(f) || math.Abs(f) > 1e15 {
		return fmt.Errorf("not an integer: %q", s)
	}
	*u = unixOrInt(f)
	return nil
}

// do sends call and returns the "data" of a successful answer, and what is
// odd about the answer around it (a "success" that is not a boolean): the
// data may still hold a new pair, which the caller must not lose. A 2xx
// answer with success:false is an error like any other.
func do(ctx context.Context, c *upstream.Client, call upstream.Call) (json.RawMessage, []string, error) {
	resp, err := c.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classify(call, r)
	})
	if err != nil {
		return nil, nil, err
	}
	var env envelope
	if err := json.Unmarshal(resp.Body, &env); err != nil {
		// The body of a successful answer holds fresh tokens the scrubber
		// does not know: describe it, never quote it.
		return nil, nil, badResponse(call.Op, upstream.NotExpectedJSON(resp, ""))
	}
	var odd []string
	switch string(bytes.TrimSpace(env.Success)) {
	case "", "null", "true":
	case "false":
		return nil, nil, classify(call, resp)
	default:
		odd = append(odd, "success is not a boolean")
	}
	return env.Data, odd, nil
}

// classify turns a ChatApp error into an *upstream.Error with a hint.
// Whether ChatApp refused a secret is decided on ChatApp's own answer, its
// error envelope and code: a 401 or 403 without the envelope comes from
// whatever sits in front of ChatApp (a proxy, a WAF, a gateway) and says
// nothing of the refresh token or the login, so it is Unavailable, to be
// retried, never Unauthorized (which drops the refresh token and spends a
// tokens.make).
func classify(call upstream.Call, r *upstream.Response) *upstream.Error {
	e := &upstream.Error{Broker: display, Op: call.Op, Status: r.Status}
	ae, own := ownError(r.Body)
	ok := r.Status >= 200 && r.Status < 300
	auth := r.Status == http.StatusUnauthorized || r.Status == http.StatusForbidden
	switch {
	case own:
		e.Code = upstream.Quote(ae.Code, call.Secrets...)
		e.Message = upstream.Quote(ae.Message, call.Secrets...)
	case ok:
		e.Message = "success is false and no error was given"
	case auth:
		e.Message = "the answer was not ChatApp's: " + upstream.DescribeBody(r) + " without ChatApp's error envelope"
		if len(r.Body) > 0 {
			e.Message += ": " + upstream.Quote(string(r.Body), call.Secrets...)
		}
	default:
		e.Message = upstream.Quote(string(r.Body), call.Secrets...)
	}
	switch {
	case r.Status == http.StatusTooManyRequests || (own && isQuotaCode(e.Code)):
		e.Failure = upstream.RateLimited
	case r.Status >= 500:
		// Transient whatever the code says: a refresh is not given up on.
		e.Failure = upstream.Unavailable
	case own && (auth || isTokenCode(e.Code) || isCredentialsCode(e.Code)):
		e.Failure = upstream.Unauthorized
	case auth:
		// A bare status: ChatApp did not say it refused anything.
		e.Failure = upstream.Unavailable
		e.Hint = hintNotChatApp
		return e
	case ok:
		e.Failure = upstream.BadResponse
	default:
		e.Failure = upstream.FailureForStatus(r.Status)
	}
	switch {
	case e.Failure == upstream.RateLimited && call.Op == opMake:
		e.Hint = hintQuota
	case e.Failure != upstream.Unauthorized:
	case call.Op == opMake:
		e.Hint = hintCredentials
	case call.Op == opRefresh:
		e.Hint = hintRefresh
	case call.Op == opCheck:
		e.Hint = hintAccess
	}
	return e
}

// ownError returns the error of ChatApp's own error envelope,
// {"success": false, "error": {"code": "...", "message": "..."}}, and
// whether body is one.
func ownError(body []byte) (*apiError, bool) {
	var env struct {
		Success *bool     `json:"success"`
		Error   *apiError `json:"error"`
	}
	if json.Unmarshal(body, &env) != nil || env.Success == nil || *env.Success || env.Error == nil {
		return nil, false
	}
	if env.Error.Code == "" && env.Error.Message == "" {
		return nil, false
	}
	return env.Error, true
}

// isTokenCode matches ChatApp's invalid-token code and, leniently, any code
// that names a token as invalid, expired or unknown. UNCONFIRMED: ChatApp
// documents only ApiInvalidTokenError (for the access token); what it answers
// for a dead refresh token is not documented, so a refresh-specific code
// (e.g. "ApiRefreshTokenExpiredError") is taken as a refusal too.
func isTokenCode(code string) bool {
	c := strings.ToLower(code)
	if c == strings.ToLower(CodeInvalidToken) {
		return true
	}
	if !strings.Contains(c, "token") {
		return false
	}
	for _, w := range []string{"invalid", "expired", "refresh", "notfound", "wrong", "revoked"} {
		if strings.Contains(c, w) {
			return true
		}
	}
	return false
}

// isCredentialsCode matches a refusal of the login. UNCONFIRMED: the code
// ChatApp uses for a wrong email, password or appId is not documented.
func isCredentialsCode(code string) bool {
	c := strings.ToLower(code)
	for _, w := range []string{"credential", "password", "unauthori", "authenticat"} {
		if strings.Contains(c, w) {
			return true
		}
	}
	return false
}

// isQuotaCode matches the make limit. UNCONFIRMED: ChatApp documents the
// limit (100 a day) but not the error it answers past it.
func isQuotaCode(code string) bool {
	c := strings.ToLower(code)
	for _, w := range []string{"toomany", "limit", "quota"} {
		if strings.Contains(c, w) {
			return true
		}
	}
	return false
}

// tokenFrom builds the token from a make or refresh answer. The end times
// are read from the answer, never assumed (24 h and 14 d today). odd are
// problems do found around the data.
//
// When the answer carries a usable new refresh token but anything else is
// wrong, ChatApp has rotated the pair all the same: the error is a
// *provider.RotatedError holding the new refresh token (and its end time,
// when that was readable) around the BadResponse, so that the backend stores
// it. The error names fields and never holds a token.
func tokenFrom(op string, data json.RawMessage, received time.Time, made bool, odd ...string) (*provider.Token, error) {
	var raw pair
	if d := bytes.TrimSpace(data); len(d) == 0 || d[0] != '{' || json.Unmarshal(d, &raw) != nil {
		return nil, badResponse(op, strings.Join(append([]string{"response has no readable data object"}, odd...), "; "))
	}
	a := &answerCheck{bad: odd}
	accessToken := a.token("accessToken", raw.AccessToken)
	accessEnd := a.endTime("accessTokenEndTime", raw.AccessTokenEndTime)
	refreshToken := a.token("refreshToken", raw.RefreshToken)
	refreshEnd := a.endTime("refreshTokenEndTime", raw.RefreshTokenEndTime)
	details := map[string]any{"made": made}
	if present(raw.CabinetUserID) {
		var id unixOrInt
		if id.UnmarshalJSON(raw.CabinetUserID) != nil {
			a.bad = append(a.bad, "cabinetUserId is not an integer")
		} else {
			details["cabinet_user_id"] = int64(id)
		}
	}
	if msg := a.message(); msg != "" {
		e := badResponse(op, upstream.Scrub(msg, a.said...))
		if refreshToken == "" {
			return nil, e
		}
		e.Hint = hintKept
		return nil, &provider.RotatedError{
			Rotated:         map[string]string{"refresh_token": refreshToken},
			SecretExpiresAt: refreshEnd,
			Err:             e,
		}
	}
	return &provider.Token{
		AccessToken:     accessToken,
		IssuedAt:        received,
		ExpiresAt:       accessEnd,
		AccountIDs:      []string{},
		ReadOnly:        false,
		Details:         details,
		Rotated:         map[string]string{"refresh_token": refreshToken},
		SecretExpiresAt: refreshEnd,
	}, nil
}

// maxTokenLen bounds a token the plugin keeps: ChatApp's are 60 bytes, and
// one a server would refuse as a header value could never be sent back.
const maxTokenLen = 4096

// answerCheck collects what is wrong with the fields of an answer.
type answerCheck struct {
	missing, bad []string
	// said are the tokens the answer held, scrubbed from the message.
	said []string
}

// present reports whether a field was sent with a value.
func present(raw json.RawMessage) bool {
	s := string(bytes.TrimSpace(raw))
	return s != "" && s != "null" && s != `""`
}

// token reads a token field: a non-empty string that can travel back as a
// header value (no control characters, not huge). "" when it cannot.
func (a *answerCheck) token(name string, raw json.RawMessage) string {
	if !present(raw) {
		a.missing = append(a.missing, name)
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		a.bad = append(a.bad, name+" is not a string")
		return ""
	}
	a.said = append(a.said, s)
	if len(s) > maxTokenLen || strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }) {
		a.bad = append(a.bad, fmt.Sprintf("%s is not a usable token (control characters, or over %d bytes)", name, maxTokenLen))
		return ""
	}
	return s
}

// endTime reads an end time in unix seconds, bounded as JWT dates are
// (provider.NumericDate: after 1970, before year 10000). Zero when it
// cannot.
func (a *answerCheck) endTime(name string, raw json.RawMessage) time.Time {
	if !present(raw) {
		a.missing = append(a.missing, name)
		return time.Time{}
	}
	var u unixOrInt
	if err := u.UnmarshalJSON(raw); err != nil {
		// unixOrInt refuses a number past 1e15, far past year 9999.
		f, ferr := strconv.ParseFloat(string(bytes.Trim(bytes.TrimSpace(raw), `"`)), 64)
		switch {
		case ferr != nil || math.IsNaN(f) || math.IsInf(f, 0):
			a.bad = append(a.bad, name+" is not a number")
		case f > 0:
			a.bad = append(a.bad, name+" is past year 9999: unix seconds expected (milliseconds?)")
		default:
			a.bad = append(a.bad, name+" is not after 1970")
		}
		return time.Time{}
	}
	t, ok := provider.NumericDate(map[string]any{name: float64(u)}, name)
	switch {
	case ok:
		return t
	case u <= 0:
		a.bad = append(a.bad, name+" is not after 1970")
	default:
		a.bad = append(a.bad, name+" is past year 9999: unix seconds expected (milliseconds?)")
	}
	return time.Time{}
}

// message says what is wrong, naming fields only, or "" when nothing is.
func (a *answerCheck) message() string {
	var parts []string
	if len(a.missing) > 0 {
		parts = append(parts, "response lacks "+strings.Join(a.missing, ", "))
	}
	return strings.Join(append(parts, a.bad...), "; ")
}

// secretList is everything ChatApp must never echo back to us.
func secretList(s map[string]string) []string {
	var out []string
	for _, k := range []string{"password", "refresh_token", "email", "app_id"} {
		if v := s[k]; v != "" {
			out = append(out, v)
		}
	}
	return out
}

func badResponse(op, msg string) *upstream.Error {
	return upstream.BadResponseError(display, op, msg)
}

// Ensure Provider satisfies the interface.
var _ provider.Provider = Provider{}
