package tinvest

import (
	"encoding/json"
	"net/http"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// T-Invest's own error codes (the REST body's `description`).
const (
	codeUnauthenticated = "40003" // token missing or invalid
	codeNoPrivileges    = "40002" // insufficient privileges
	codeRateLimited     = "80002" // request limit exceeded
)

// classify maps a non-2xx answer to an error. The broker's own code wins over
// the HTTP status: a proxy may change the status, not the body.
func classify(call upstream.Call, env string, r *upstream.Response) *upstream.Error {
	e := &upstream.Error{Broker: display, Op: call.Op, Status: r.Status, Failure: upstream.FailureForStatus(r.Status)}
	var body errorBody
	parsed := json.Unmarshal(r.Body, &body) == nil && (body.Message != "" || body.Code != "" || body.Description != "")
	// Scrub before cutting: an excerpt could split a secret past recognition.
	msg := string(r.Body)
	if parsed {
		msg = body.Message
		e.Code = upstream.Quote(string(body.Description), call.Secrets...)
	}
	e.Message = withTracking(upstream.Quote(msg, call.Secrets...), trackingID(r.Header, call.Secrets))

	reason := e.Code
	if reason != codeUnauthenticated && reason != codeNoPrivileges && reason != codeRateLimited {
		// No code we know: fall back to the status.
		switch r.Status {
		case http.StatusUnauthorized:
			reason = codeUnauthenticated
		case http.StatusForbidden:
			reason = codeNoPrivileges
		case http.StatusTooManyRequests:
			reason = codeRateLimited
		}
	}
	switch {
	case reason == codeUnauthenticated:
		e.Failure = upstream.Unauthorized
		e.Hint = authHint(env)
	case reason == codeNoPrivileges:
		// The token is valid but may not do this: not an auth failure, and
		// the same token will not start working on a retry.
		e.Failure = upstream.Rejected
		e.Hint = "the token has insufficient privileges for this call: issue a token with the access this config needs in the T-Invest settings (" + SettingsURL + ")"
	case reason == codeRateLimited:
		// RetryAfter is filled from x-ratelimit-reset by upstream.Client.Do.
		e.Failure = upstream.RateLimited
		e.Hint = "T-Invest allows 100 UsersService requests a minute per user, across all that user's tokens (configs holding tokens of one user share that budget)"
	}
	return e
}

// authHint says what to do about a refused token. The environment matters:
// a token of the other environment is refused with the same 40003 as a
// revoked one, and that mix-up is the likeliest cause on a fresh config.
func authHint(env string) string {
	h := "the token is missing, invalid, expired (unused for three months) or revoked: issue a new token in the T-Invest settings (" + SettingsURL + ") and write it to this config"
	if env == EnvSandbox {
		return h + "; note that a production token is refused by the sandbox endpoints and vice versa: if this is a production token, set environment=production"
	}
	return h + "; note that a sandbox token is refused by production endpoints and vice versa: if this is a sandbox token, set environment=sandbox"
}

// trackingID is the x-tracking-id T-Invest puts on every answer; support
// asks for it. It is scrubbed and capped like anything else the broker says.
func trackingID(h http.Header, secrets []string) string {
	v := h.Get("x-tracking-id")
	if v == "" {
		return ""
	}
	return upstream.Quote(v, secrets...)
}

func withTracking(msg, tracking string) string {
	switch {
	case tracking == "":
		return msg
	case msg == "":
		return "x-tracking-id " + tracking
	}
	return msg + " (x-tracking-id " + tracking + ")"
}
