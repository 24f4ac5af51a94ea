package upstream

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
)

func TestRetryAfter(t *testing.T) {
	cases := []struct {
		name   string
		header map[string]string
		want   time.Duration
	}{
		{"none", nil, 0},
		{"seconds", map[string]string{"Retry-After": "7"}, 7 * time.Second},
		{"ratelimit reset", map[string]string{"x-ratelimit-reset": "12"}, 12 * time.Second},
		{"retry-after wins", map[string]string{"Retry-After": "3", "x-ratelimit-reset": "12"}, 3 * time.Second},
		{"garbage", map[string]string{"Retry-After": "soon"}, 0},
		{"negative", map[string]string{"x-ratelimit-reset": "-5"}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			for k, v := range tc.header {
				h.Set(k, v)
			}
			if got := RetryAfter(h, time.Now()); got != tc.want {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestDoRetriesIdempotentCallsOnly(t *testing.T) {
	cases := []struct {
		name        string
		status      int
		idempotent  bool
		wantCalls   int32
		wantFailure Failure
	}{
		{"503 idempotent retried", 503, true, 3, Unavailable},
		{"429 idempotent retried", 429, true, 3, RateLimited},
		{"503 non-idempotent once", 503, false, 1, Unavailable},
		{"401 never retried", 401, true, 1, Unauthorized},
		{"400 never retried", 400, true, 1, Rejected},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				w.WriteHeader(tc.status)
				w.Write([]byte(`{"message":"nope"}`))
			}))
			defer srv.Close()
			c, _ := New(Options{Broker: "Test"})
			_, err := c.Do(context.Background(), Call{Method: "POST", URL: srv.URL, Idempotent: tc.idempotent, Op: "POST /x"}, nil)
			ue, ok := AsError(err)
			if !ok || ue.Failure != tc.wantFailure || ue.Status != tc.status {
				t.Fatalf("err = %v", err)
			}
			if calls.Load() != tc.wantCalls {
				t.Fatalf("calls = %d, want %d", calls.Load(), tc.wantCalls)
			}
		})
	}
}

func TestDoSucceedsAfterTransientFailure(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			w.Header().Set("Retry-After", "0")
			w.WriteHeader(502)
			return
		}
		w.Write([]byte(`{"ok":true}`))
	}))
	defer srv.Close()
	c, _ := New(Options{Broker: "Test"})
	resp, err := c.Do(context.Background(), Call{Method: "GET", URL: srv.URL, Idempotent: true, Op: "GET /"}, nil)
	if err != nil || string(resp.Body) != "{\"ok\":true}" {
		t.Fatalf("resp=%v err=%v", resp, err)
	}
}

func TestDoCapsResponseSize(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(strings.Repeat("x", 4096)))
	}))
	defer srv.Close()
	c, _ := New(Options{Broker: "Test", MaxBody: 1024})
	_, err := c.Do(context.Background(), Call{Method: "GET", URL: srv.URL, Op: "GET /"}, nil)
	if ue, ok := AsError(err); !ok || ue.Failure != BadResponse || !strings.Contains(ue.Error(), "larger than 1024") {
		t.Fatalf("err = %v", err)
	}
}

func TestDoNeverFollowsRedirects(t *testing.T) {
	var other atomic.Int32
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { other.Add(1) }))
	defer target.Close()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target.URL, http.StatusTemporaryRedirect)
	}))
	defer srv.Close()
	c, _ := New(Options{Broker: "Test"})
	_, err := c.Do(context.Background(), Call{Method: "POST", URL: srv.URL, JSON: map[string]string{"secret": "s3cr3t"}, Op: "POST /"}, nil)
	if err == nil || other.Load() != 0 {
		t.Fatalf("redirect followed (err=%v, target hits=%d)", err, other.Load())
	}
}

func TestTransportErrorsHideURLAndSecrets(t *testing.T) {
	c, _ := New(Options{Broker: "Test", Timeout: time.Second})
	// Nothing listens on port 1; the URL carries a secret in its query.
	_, err := c.Do(context.Background(), Call{Method: "GET", URL: "http://127.0.0.1:1/refresh?token=hunter2-secret", Op: "GET /refresh", Secrets: []string{"hunter2-secret"}}, nil)
	ue, ok := AsError(err)
	if !ok || ue.Failure != Unavailable {
		t.Fatalf("err = %v", err)
	}
	if strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "127.0.0.1:1/refresh") {
		t.Fatalf("error leaks the URL or secret: %v", err)
	}
}

func TestDoStopsOnContextCancel(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Retry-After", "5")
		w.WriteHeader(503)
	}))
	defer srv.Close()
	c, _ := New(Options{Broker: "Test"})
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := c.Do(ctx, Call{Method: "GET", URL: srv.URL, Idempotent: true, Op: "GET /"}, nil)
	if err == nil || time.Since(start) > 2*time.Second {
		t.Fatalf("err=%v after %v", err, time.Since(start))
	}
}

func TestBadCACert(t *testing.T) {
	if _, err := New(Options{CACertPEM: "not pem"}); err == nil {
		t.Fatal("accepted a CA bundle with no certificate")
	}
}

func TestScrubAndExcerpt(t *testing.T) {
	if got := Scrub("echo: my-secret-value!", "my-secret-value"); got != "echo: [redacted]!" {
		t.Fatalf("Scrub = %q", got)
	}
	long := strings.Repeat("a", 500) + "\n"
	if got := Excerpt([]byte(long)); len([]rune(got)) != 201 {
		t.Fatalf("Excerpt length = %d", len([]rune(got)))
	}
	var e *Error
	if !errors.As(error(&Error{Broker: "B", Op: "X", Failure: Unauthorized}), &e) {
		t.Fatal("errors.As")
	}
}

func TestRateLimiterHoldsTheRate(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { calls.Add(1) }))
	defer srv.Close()
	// 600 a minute = 10 a second, burst 60: 80 calls wait 2 s on the
	// client's clock (a test clock: nothing sleeps).
	clock := newTestClock()
	c, _ := New(Options{Broker: "Test", RatePerMinute: 600, Clock: clock})
	for range 80 {
		if _, err := c.Do(context.Background(), Call{Method: "GET", URL: srv.URL, Op: "GET /"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	var waited time.Duration
	for _, d := range clock.Slept() {
		waited += d
	}
	if waited < 1990*time.Millisecond || waited > 2010*time.Millisecond || calls.Load() != 80 {
		t.Fatalf("80 calls at 10/s after a burst of 60 waited %v (%d calls)", waited, calls.Load())
	}
}

func TestConcurrencyCap(t *testing.T) {
	// Handlers hold their calls until released. With the cap's calls held,
	// the client's limiter must refuse one more slot to a caller that will
	// not wait (a done context); then calls are let through one release at
	// a time.
	const calls, limit = 20, 3
	var inFlight, peak atomic.Int32
	entered := make(chan struct{}, calls)
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inFlight.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		entered <- struct{}{} // buffered for every call
		brokertest.Held(release)
		inFlight.Add(-1)
	}))
	defer srv.Close()
	var unblock sync.Once
	defer unblock.Do(func() { close(release) }) // before srv.Close, also when the test fails
	c, _ := New(Options{Broker: "Test", MaxConcurrent: limit})
	done := make(chan struct{})
	for range calls {
		go func() {
			c.Do(context.Background(), Call{Method: "GET", URL: srv.URL, Op: "GET /"}, nil)
			done <- struct{}{}
		}()
	}
	for range limit {
		brokertest.Wait(t, entered, "a call under the cap never reached the server")
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.limiter("GET /").acquire(gone); err == nil {
		t.Fatalf("a slot was free with %d calls in flight, cap %d", inFlight.Load(), limit)
	}
	for range calls - limit {
		brokertest.Send(t, release, struct{}{}, "no held call took the release")
		brokertest.Wait(t, entered, "a call queued behind the cap never reached the server once a slot was free")
	}
	unblock.Do(func() { close(release) })
	for range calls {
		brokertest.Wait(t, done, "a call never returned")
	}
	if peak.Load() > limit {
		t.Fatalf("%d calls in flight, cap %d", peak.Load(), limit)
	}
}

func TestServerErrorIsNotRetried(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.WriteHeader(500)
	}))
	defer srv.Close()
	var outcomes []string
	c, _ := New(Options{Broker: "Test", Observe: func(op, outcome string, d time.Duration) { outcomes = append(outcomes, outcome) }})
	_, err := c.Do(context.Background(), Call{Method: "GET", URL: srv.URL, Idempotent: true, Op: "GET /"}, nil)
	if err == nil || calls.Load() != 1 {
		t.Fatalf("500 retried: %d calls", calls.Load())
	}
	if len(outcomes) != 1 || outcomes[0] != "unavailable" {
		t.Fatalf("observed %v", outcomes)
	}
}

func TestDoSendsAFormBody(t *testing.T) {
	var ctype, body string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctype = r.Header.Get("Content-Type")
		b, _ := io.ReadAll(r.Body)
		body = string(b)
		w.Write([]byte(`{}`))
	}))
	defer srv.Close()
	c, _ := New(Options{Broker: "Test"})
	form := url.Values{"grant_type": {"refresh_token"}, "client_id": {"a b"}, "refresh_token": {"x&y"}}
	if _, err := c.Do(context.Background(), Call{Method: "POST", URL: srv.URL, Form: form, Op: "POST /"}, nil); err != nil {
		t.Fatal(err)
	}
	if ctype != "application/x-www-form-urlencoded" || body != "client_id=a+b&grant_type=refresh_token&refresh_token=x%26y" {
		t.Fatalf("Content-Type %q, body %q", ctype, body)
	}
}
