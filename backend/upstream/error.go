package upstream

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Failure classifies an upstream failure so the backend can answer with the
// right status and decide whether to retry.
type Failure int

const (
	// Unavailable: the broker could not be reached or answered 5xx.
	Unavailable Failure = iota + 1
	// Unauthorized: the broker rejected the secret or token (401/403).
	Unauthorized
	// RateLimited: the broker answered 429.
	RateLimited
	// BadResponse: the broker answered something we cannot read.
	BadResponse
	// Rejected: the broker refused the request for another reason (4xx).
	Rejected
)

func (f Failure) String() string {
	switch f {
	case Unavailable:
		return "unavailable"
	case Unauthorized:
		return "authentication failed"
	case RateLimited:
		return "rate limited"
	case BadResponse:
		return "bad response"
	case Rejected:
		return "request rejected"
	}
	return "error"
}

// metric is the Failure's label value in metrics.
func (f Failure) metric() string {
	switch f {
	case Unavailable:
		return "unavailable"
	case Unauthorized:
		return "auth"
	case RateLimited:
		return "rate_limited"
	case BadResponse:
		return "bad_response"
	case Rejected:
		return "rejected"
	}
	return "error"
}

// Error is a failure talking to a broker. Its text names the broker, the
// operation, the HTTP status and what the broker said, and never contains a
// secret: messages are scrubbed before they are stored here.
type Error struct {
	Broker  string // display name, e.g. "Finam"
	Op      string // e.g. "POST /v1/sessions"
	Failure Failure
	Status  int    // HTTP status, 0 when none was received
	Code    string // the broker's own error code, if any
	Message string // what the broker said (scrubbed)
	// Hint tells the user what to do next.
	Hint string
	// RetryAfter is how long the broker asked us to wait, if it said.
	RetryAfter time.Duration
}

func (e *Error) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: %s", e.Broker, e.Op, e.Failure)
	if e.Status != 0 {
		fmt.Fprintf(&b, " (HTTP %d", e.Status)
		if e.Code != "" {
			fmt.Fprintf(&b, ", code %s", e.Code)
		}
		b.WriteString(")")
	}
	if e.Message != "" {
		fmt.Fprintf(&b, ": %s", e.Message)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, "; retry after %s", e.RetryAfter.Round(time.Second))
	}
	if e.Hint != "" {
		fmt.Fprintf(&b, "; %s", e.Hint)
	}
	return b.String()
}

// Retryable reports whether repeating the same call may succeed.
func (e *Error) Retryable() bool {
	return e.Failure == Unavailable || e.Failure == RateLimited
}

// AsError returns the *Error in err's chain, if any.
func AsError(err error) (*Error, bool) {
	var ue *Error
	ok := errors.As(err, &ue)
	return ue, ok
}

// Quote is what may be repeated of anything a broker said: secrets scrubbed
// first (an excerpt could cut one past recognition), then cut to a short
// excerpt without control characters.
func Quote(said string, secrets ...string) string {
	return Excerpt([]byte(Scrub(said, secrets...)))
}

// Scrub replaces every occurrence of each secret in s, so a broker that echoes
// a secret back in an error cannot leak it through us.
func Scrub(s string, secrets ...string) string {
	for _, sec := range secrets {
		if len(sec) >= 4 {
			s = strings.ReplaceAll(s, sec, "[redacted]")
		}
	}
	return s
}
