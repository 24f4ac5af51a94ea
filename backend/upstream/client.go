// Package upstream is the one HTTP layer every provider talks to its broker
// through: timeouts bound to the request context, a cap on response size, no
// redirects, retries with backoff for idempotent calls, and errors that name
// the broker and never carry a secret.
package upstream

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"
)

// Defaults chosen so a stuck broker cannot hold a Vault request for long and
// a hostile one cannot exhaust memory.
const (
	DefaultTimeout     = 15 * time.Second
	DefaultMaxBody     = 1 << 20
	DefaultMaxAttempts = 3
)

// Options configure a Client.
type Options struct {
	// Broker is the display name used in errors.
	Broker string
	// CACertPEM, if set, replaces the system roots for this broker.
	CACertPEM string
	// Transport, if set, is a shared pool (from NewTransport) used instead
	// of building one from CACertPEM; Close leaves it open.
	Transport *http.Transport
	Timeout   time.Duration
	MaxBody   int64
	// MaxAttempts bounds tries of idempotent calls on retryable failures.
	MaxAttempts int
	// RatePerMinute keeps calls under the broker's published rate; with
	// RatePerOp the budget applies to each operation separately (Finam
	// limits each method). Zero: no client-side rate limit.
	RatePerMinute int
	RatePerOp     bool
	// MaxConcurrent caps calls in flight (ALOR answers 429 to too many
	// concurrent requests). Zero: no cap.
	MaxConcurrent int
	// Observe, if set, is told the outcome and duration of every attempt,
	// for metrics. outcome is "ok" or a Failure's metric name.
	Observe func(op, outcome string, d time.Duration)
	// Clock times the waits between attempts, the client-side rate limit
	// and the durations Observe is told; nil is the system clock.
	Clock Clock
	// OnClose, if set, is called once by Close (the owner of a shared
	// Transport counts its users by it).
	OnClose func()
}

// Client talks to one broker endpoint.
type Client struct {
	shared      bool
	broker      string
	http        *http.Client
	maxBody     int64
	maxAttempts int
	observe     func(op, outcome string, d time.Duration)
	clock       Clock

	ratePerMinute, maxConcurrent int
	ratePerOp                    bool
	limMu                        sync.Mutex
	// limiters: one per operation (or one for all): a handful, so a
	// slice, found by a scan, costs a fraction of a map's memory, which
	// thousands of warm configs' clients each hold.
	limiters  []keyedLimiter
	closeOnce sync.Once
	onClose   func()
}

// New builds a Client. It fails only on an unusable CA bundle.
func New(opts Options) (*Client, error) {
	tr := opts.Transport
	shared := tr != nil
	if !shared {
		var err error
		if tr, err = NewTransport(opts.CACertPEM); err != nil {
			return nil, err
		}
	}
	c := &Client{
		shared:        shared,
		broker:        opts.Broker,
		maxBody:       opts.MaxBody,
		maxAttempts:   opts.MaxAttempts,
		observe:       opts.Observe,
		clock:         opts.Clock,
		ratePerMinute: opts.RatePerMinute,
		maxConcurrent: opts.MaxConcurrent,
		ratePerOp:     opts.RatePerOp,
		onClose:       opts.OnClose,
		http: &http.Client{
			Transport: tr,
			Timeout:   opts.Timeout,
			// A redirect could carry a secret to another host: never follow.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
	if c.http.Timeout <= 0 {
		c.http.Timeout = DefaultTimeout
	}
	if c.maxBody <= 0 {
		c.maxBody = DefaultMaxBody
	}
	if c.maxAttempts <= 0 {
		c.maxAttempts = DefaultMaxAttempts
	}
	if c.clock == nil {
		c.clock = SystemClock{}
	}
	return c, nil
}

// Close releases idle connections of a pool the client owns.
// It may be called more than once.
func (c *Client) Close() {
	c.closeOnce.Do(func() {
		if !c.shared {
			c.http.CloseIdleConnections()
		}
		if c.onClose != nil {
			c.onClose()
		}
	})
}

// Call is one HTTP request to a broker.
type Call struct {
	Method string
	URL    string
	Header http.Header
	// JSON, if non-nil, is marshalled as the request body.
	JSON any
	// Form, if non-nil (and JSON is nil), is sent as an
	// application/x-www-form-urlencoded body (OAuth token endpoints).
	Form url.Values
	// Idempotent calls are retried on 429/5xx/connection errors. A call that
	// may spend a quota must leave this false.
	Idempotent bool
	// Op names the call in errors ("POST /v1/sessions"); never a full URL,
	// which may carry a secret in its query.
	Op string
	// Secrets are scrubbed from anything the broker says back.
	Secrets []string
	// Budget, if set, is a request budget shared beyond this client (a
	// broker that limits per user): every attempt draws on it, and the
	// broker's rate-limit headers and 429s update it.
	Budget *Budget
}

// Response is a broker's answer, its body already read (and capped).
type Response struct {
	Status int
	Header http.Header
	Body   []byte
}

// Do sends the call, retrying idempotent calls on transient failures with
// exponential backoff and jitter. A wait the broker asked for (Retry-After,
// x-ratelimit-reset) is honoured, never cut short: when it is longer than
// the call may wait (MaxForegroundWait for a reader, MaxBackgroundWait for
// work marked WithBackground), Do gives up with the broker's answer rather
// than retry sooner and spend what is left of the budget.
// Any HTTP status is returned as a Response; only transport failures and
// exhausted retries of 429/5xx are errors. classify maps a non-2xx response to
// an error; it may be nil.
func (c *Client) Do(ctx context.Context, call Call, classify func(*Response) *Error) (*Response, error) {
	var body []byte
	if call.JSON != nil {
		var err error
		if body, err = json.Marshal(call.JSON); err != nil {
			return nil, fmt.Errorf("%s %s: encoding request: %w", c.broker, call.Op, err)
		}
	} else if call.Form != nil {
		body = []byte(call.Form.Encode())
	}
	attempts := 1
	if call.Idempotent {
		attempts = c.maxAttempts
	}
	limit := maxWait(ctx)
	var lastErr *Error
	for i := 0; i < attempts; i++ {
		if i > 0 {
			if lastErr.RetryAfter > limit {
				return nil, lastErr
			}
			if err := c.clock.Sleep(ctx, backoff(i, lastErr.RetryAfter, limit)); err != nil {
				return nil, lastErr
			}
		}
		if err := c.drawBudget(ctx, call, limit); err != nil {
			if lastErr != nil && err.Failure != RateLimited {
				return nil, lastErr // cancelled while waiting: the broker's answer says more
			}
			return nil, err
		}
		resp, err := c.limited(ctx, call, body)
		if err != nil {
			lastErr = err
			if ctx.Err() != nil || !err.Retryable() {
				return nil, err
			}
			continue
		}
		if call.Budget != nil {
			call.Budget.Observe(ParseRateLimit(resp.Header))
		}
		if resp.Status >= 200 && resp.Status < 300 {
			return resp, nil
		}
		var ue *Error
		if classify != nil {
			ue = classify(resp)
		}
		if ue == nil {
			ue = c.GenericError(call, resp)
		}
		if ue.Hint == "" {
			ue.Hint = DefaultHint(c.broker, ue.Failure)
		}
		// A broker may send rate-limit headers on every answer; "retry
		// after" only means something on an answer that asks for a retry.
		if ue.RetryAfter == 0 && retryableStatus(resp.Status) {
			ue.RetryAfter = RetryAfter(resp.Header, c.clock.Now())
		}
		if call.Budget != nil && ue.Failure == RateLimited && ue.RetryAfter > 0 {
			call.Budget.HoldUntil(c.clock.Now().Add(min(ue.RetryAfter, MaxBackgroundWait)))
		}
		lastErr = ue
		if !retryableStatus(resp.Status) {
			return resp, ue
		}
	}
	return nil, lastErr
}

// drawBudget waits for the call's slot in its shared budget, if it has one.
// A slot further off than the call may wait is refused at once, with when to
// come back, and without a request to the broker.
func (c *Client) drawBudget(ctx context.Context, call Call, limit time.Duration) *Error {
	if call.Budget == nil {
		return nil
	}
	wait, ok := call.Budget.reserve(limit)
	if !ok {
		return &Error{
			Broker: c.broker, Op: call.Op, Failure: RateLimited,
			Message:    "the client-side request budget of " + call.Budget.scope + " is spent (it is shared by every config holding a token of " + call.Budget.scope + "); the request was not sent",
			RetryAfter: wait,
		}
	}
	if err := c.clock.Sleep(ctx, wait); err != nil {
		return &Error{Broker: c.broker, Op: call.Op, Failure: Unavailable, Message: "gave up waiting for the shared request budget: " + err.Error()}
	}
	return nil
}

// retryableStatus: only statuses that say "try again" are retried; a 500
// may be a bug the same request will hit again.
func retryableStatus(status int) bool {
	switch status {
	case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// limited sends one attempt within the client-side limits and reports it.
func (c *Client) limited(ctx context.Context, call Call, body []byte) (*Response, *Error) {
	l := c.limiter(call.Op)
	if err := l.acquire(ctx); err != nil {
		return nil, &Error{Broker: c.broker, Op: call.Op, Failure: Unavailable, Message: "gave up waiting for the client-side rate limit: " + err.Error()}
	}
	start := c.clock.Now()
	resp, err := c.once(ctx, call, body)
	l.release()
	if c.observe != nil {
		outcome := "ok"
		switch {
		case err != nil:
			outcome = err.Failure.metric()
		case resp.Status < 200 || resp.Status >= 300:
			outcome = FailureForStatus(resp.Status).metric()
		}
		c.observe(call.Op, outcome, c.clock.Now().Sub(start))
	}
	return resp, err
}

func (c *Client) limiter(op string) *limiter {
	key := ""
	if c.ratePerOp {
		key = op
	}
	c.limMu.Lock()
	defer c.limMu.Unlock()
	for _, kl := range c.limiters {
		if kl.key == key {
			return kl.l
		}
	}
	l := newLimiter(c.ratePerMinute, c.maxConcurrent, c.clock)
	c.limiters = append(c.limiters, keyedLimiter{key, l})
	return l
}

type keyedLimiter struct {
	key string
	l   *limiter
}

func (c *Client) once(ctx context.Context, call Call, body []byte) (*Response, *Error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, call.Method, call.URL, rd)
	if err != nil {
		return nil, &Error{Broker: c.broker, Op: call.Op, Failure: Rejected, Message: "invalid request URL"}
	}
	for k, vs := range call.Header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	switch {
	case call.JSON != nil:
		req.Header.Set("Content-Type", "application/json")
	case call.Form != nil:
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, &Error{Broker: c.broker, Op: call.Op, Failure: Unavailable, Message: Quote(transportMessage(err), call.Secrets...), Hint: tlsHint(err)}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, c.maxBody+1))
	if err != nil {
		return nil, &Error{Broker: c.broker, Op: call.Op, Failure: Unavailable, Status: resp.StatusCode, Message: "reading response: " + Quote(transportMessage(err), call.Secrets...)}
	}
	if int64(len(data)) > c.maxBody {
		return nil, &Error{Broker: c.broker, Op: call.Op, Failure: BadResponse, Status: resp.StatusCode, Message: fmt.Sprintf("response larger than %d bytes", c.maxBody)}
	}
	return &Response{Status: resp.StatusCode, Header: resp.Header, Body: data}, nil
}

// GenericError classifies a non-2xx response by status alone, quoting a short
// scrubbed excerpt of the body.
func (c *Client) GenericError(call Call, resp *Response) *Error {
	e := &Error{Broker: c.broker, Op: call.Op, Status: resp.Status, Message: Quote(string(resp.Body), call.Secrets...)}
	e.Failure = FailureForStatus(resp.Status)
	return e
}

// FailureForStatus maps an HTTP status to the Failure it means.
func FailureForStatus(status int) Failure {
	switch {
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return Unauthorized
	case status == http.StatusTooManyRequests:
		return RateLimited
	case status >= 500:
		return Unavailable
	case status >= 300 && status < 400:
		return BadResponse
	default:
		return Rejected
	}
}

// Excerpt returns at most 200 bytes of a body for an error message, with
// control characters removed.
func Excerpt(b []byte) string {
	const max = 200
	s := []rune(string(b))
	out := make([]rune, 0, min(len(s), max))
	for _, r := range s {
		if len(out) >= max {
			out = append(out, '…')
			break
		}
		if r < 0x20 {
			r = ' '
		}
		out = append(out, r)
	}
	return string(bytes.TrimSpace([]byte(string(out))))
}

// RetryAfter reads how long a broker asked us to wait: Retry-After (seconds
// or an HTTP date, counted from now) or x-ratelimit-reset (seconds until the
// window resets).
func RetryAfter(h http.Header, now time.Time) time.Duration {
	if v := h.Get("Retry-After"); v != "" {
		if s, err := strconv.ParseInt(v, 10, 64); err == nil && s >= 0 {
			return seconds(s)
		}
		if t, err := http.ParseTime(v); err == nil {
			return min(max(t.Sub(now), 0), maxRetryAfter)
		}
	}
	if v := h.Get("x-ratelimit-reset"); v != "" {
		if s, err := strconv.ParseInt(v, 10, 64); err == nil && s >= 0 {
			return seconds(s)
		}
	}
	return 0
}

// maxRetryAfter caps what a broker can ask for: a day, and no overflow.
const maxRetryAfter = 24 * time.Hour

func seconds(s int64) time.Duration {
	if s > int64(maxRetryAfter/time.Second) {
		return maxRetryAfter
	}
	return time.Duration(s) * time.Second
}

// backoff is exponential with full jitter, but never shorter than what the
// broker asked for and never longer than limit. Do does not call it with an
// asked wait above limit: it gives up instead of retrying sooner.
func backoff(attempt int, asked, limit time.Duration) time.Duration {
	base := 200 * time.Millisecond << min(attempt-1, 16)
	d := base/2 + rand.N(base/2+1)
	if asked > d {
		d = asked
	}
	return min(d, limit)
}

// transportMessage describes a transport error without the URL, which may
// hold a secret in its query string.
func transportMessage(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timed out"
	}
	return err.Error()
}

// tlsHint says what to do about a transport failure.
func tlsHint(err error) string {
	var ua x509.UnknownAuthorityError
	if errors.As(err, &ua) {
		return "the broker's certificate is signed by an authority this Vault does not trust: set ca_cert to the PEM bundle of that authority"
	}
	var cv *tls.CertificateVerificationError
	if errors.As(err, &cv) {
		return "the broker's certificate could not be verified: check base_url, or set ca_cert to the PEM bundle of its authority"
	}
	return "check that this Vault host can reach the broker (base_url, DNS, firewall, proxy); the plugin retries on the next read"
}
