package upstream

import (
	"context"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream/clocktest"
)

func newTestClock() *clocktest.Clock {
	return clocktest.New(time.Date(2025, 6, 2, 10, 0, 0, 0, time.UTC))
}

// A wait the broker asks for is honoured in full, up to the cap of the kind
// of work (a reader's, or background's); past the cap the call gives up
// rather than retry sooner than asked.
func TestDoHonoursAskedWait(t *testing.T) {
	cases := []struct {
		name       string
		header     string
		value      string
		background bool
		wantSleeps []time.Duration
		wantCalls  int32
		wantErr    bool
	}{
		{"Retry-After within the read cap", "Retry-After", "2", false, []time.Duration{2 * time.Second}, 2, false},
		{"Retry-After past the read cap", "Retry-After", "3", false, nil, 1, true},
		{"Retry-After in the background", "Retry-After", "7", true, []time.Duration{7 * time.Second}, 2, false},
		{"x-ratelimit-reset within the read cap", "x-ratelimit-reset", "1", false, []time.Duration{time.Second}, 2, false},
		{"x-ratelimit-reset past the read cap", "x-ratelimit-reset", "45", false, nil, 1, true},
		{"x-ratelimit-reset in the background", "x-ratelimit-reset", "45", true, []time.Duration{45 * time.Second}, 2, false},
		{"x-ratelimit-reset at the background cap", "x-ratelimit-reset", "60", true, []time.Duration{time.Minute}, 2, false},
		{"x-ratelimit-reset past the background cap", "x-ratelimit-reset", "61", true, nil, 1, true},
		{"Retry-After past the background cap", "Retry-After", "3600", true, nil, 1, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if calls.Add(1) == 1 {
					w.Header().Set(tc.header, tc.value)
					w.WriteHeader(http.StatusTooManyRequests)
					return
				}
				_, _ = w.Write([]byte(`{}`))
			}))
			defer srv.Close()
			clock := newTestClock()
			c, _ := New(Options{Broker: "Test", Clock: clock})
			ctx := context.Background()
			if tc.background {
				ctx = WithBackground(ctx)
			}
			_, err := c.Do(ctx, Call{Method: "POST", URL: srv.URL, Idempotent: true, Op: "POST /x"}, nil)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if ue, ok := AsError(err); tc.wantErr && (!ok || ue.Failure != RateLimited || ue.RetryAfter == 0) {
				t.Errorf("err = %v, want rate limited with the asked wait", err)
			}
			if got := clock.Slept(); !slices.Equal(got, tc.wantSleeps) {
				t.Errorf("waited %v, want %v", got, tc.wantSleeps)
			}
			if calls.Load() != tc.wantCalls {
				t.Errorf("calls = %d, want %d", calls.Load(), tc.wantCalls)
			}
		})
	}
}

func TestParseRateLimit(t *testing.T) {
	cases := []struct {
		name          string
		limit, remain string
		reset         string
		want          RateLimit
	}{
		{"real form", "100, 100;w=60", "42", "17", RateLimit{Limit: 100, Window: time.Minute, HasLimit: true, Remaining: 42, HasRemaining: true, Reset: 17 * time.Second, HasReset: true}},
		{"bare integer is per minute", "100", "", "", RateLimit{Limit: 100, Window: time.Minute, HasLimit: true}},
		{"policy only", "50;w=1", "", "", RateLimit{Limit: 50, Window: time.Second, HasLimit: true}},
		{"most restrictive policy", "1000, 1000;w=3600, 100;w=60", "", "", RateLimit{Limit: 1000, Window: time.Hour, HasLimit: true}},
		{"most restrictive policy first", "100, 100;w=60, 200;w=60", "", "", RateLimit{Limit: 100, Window: time.Minute, HasLimit: true}},
		{"blanks", " 100 ,  100 ; w = 60 ", " 0 ", " 60 ", RateLimit{Limit: 100, Window: time.Minute, HasLimit: true, HasRemaining: true, Reset: time.Minute, HasReset: true}},
		{"garbage", "lots", "-1", "soon", RateLimit{}},
		{"zero limit ignored", "0, 0;w=60", "", "", RateLimit{}},
		{"bad window falls back to a minute", "100;w=x", "", "", RateLimit{Limit: 100, Window: time.Minute, HasLimit: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := http.Header{}
			for k, v := range map[string]string{"x-ratelimit-limit": tc.limit, "x-ratelimit-remaining": tc.remain, "x-ratelimit-reset": tc.reset} {
				if v != "" {
					h.Set(k, v)
				}
			}
			if got := ParseRateLimit(h); got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestBudget(t *testing.T) {
	clock := newTestClock()
	b := NewBudget(90, time.Minute, "this user", clock)
	// A burst of a third, then one a second: never more than 90 a minute.
	for i := range 30 {
		if wait, ok := b.reserve(0); !ok || wait != 0 {
			t.Fatalf("call %d of the burst: wait %v ok %v", i, wait, ok)
		}
	}
	if wait, ok := b.reserve(0); ok || wait != time.Second {
		t.Fatalf("past the burst: wait %v ok %v, want refused, 1s", wait, ok)
	}
	if wait, ok := b.reserve(2 * time.Second); !ok || wait != time.Second {
		t.Fatalf("past the burst, may wait: wait %v ok %v", wait, ok)
	}
	if b.Idle() {
		t.Error("a spent budget is idle")
	}
	clock.Sleep(context.Background(), time.Minute)
	if !b.Idle() {
		t.Error("a refilled budget is not idle")
	}
	// A hold keeps every call back until its end.
	b.HoldUntil(clock.Now().Add(40 * time.Second))
	if wait, ok := b.reserve(MaxForegroundWait); ok || wait != 40*time.Second {
		t.Errorf("held: wait %v ok %v, want refused, 40s", wait, ok)
	}
	if wait, ok := b.reserve(MaxBackgroundWait); !ok || wait != 40*time.Second {
		t.Errorf("held, background: wait %v ok %v, want 40s", wait, ok)
	}
	// A spent window (remaining 0) holds until its reset.
	clock.Sleep(context.Background(), time.Hour)
	b.Observe(RateLimit{Remaining: 0, HasRemaining: true, Reset: 25 * time.Second, HasReset: true})
	if wait, _ := b.reserve(MaxBackgroundWait); wait != 25*time.Second {
		t.Errorf("after remaining 0, reset 25: wait %v", wait)
	}
	// A lower stated limit lowers the budget; a higher one does not raise it.
	b.Observe(RateLimit{Limit: 1000, Window: time.Minute, HasLimit: true})
	if n, w := b.Limit(); n != 90 || w != time.Minute {
		t.Errorf("after a higher limit: %d per %v", n, w)
	}
	b.Observe(RateLimit{Limit: 50, Window: time.Minute, HasLimit: true})
	if n, w := b.Limit(); n != 45 || w != time.Minute {
		t.Errorf("after limit 50: %d per %v, want 45 per 1m", n, w)
	}
	// Charge spends a slot for a call made outside the budget.
	c := NewBudget(3, time.Minute, "u", clock)
	c.Charge()
	if _, ok := c.reserve(0); ok {
		t.Error("a charged budget of one slot still has one")
	}
}

// A 429 on a call with a budget holds the budget's later calls, so the next
// reader is answered without a request.
func TestDoHoldsBudgetOn429(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("x-ratelimit-reset", "30")
		w.WriteHeader(http.StatusTooManyRequests)
	}))
	defer srv.Close()
	clock := newTestClock()
	c, _ := New(Options{Broker: "Test", Clock: clock})
	b := NewBudget(90, time.Minute, "this user", clock)
	call := Call{Method: "POST", URL: srv.URL, Idempotent: true, Op: "POST /x", Budget: b}
	if _, err := c.Do(context.Background(), call, nil); err == nil {
		t.Fatal("want the 429")
	}
	_, err := c.Do(context.Background(), call, nil)
	ue, ok := AsError(err)
	if !ok || ue.Failure != RateLimited || ue.RetryAfter != 30*time.Second || ue.Status != 0 {
		t.Fatalf("second read: %v, want a client-side refusal, retry after 30s", err)
	}
	if calls.Load() != 1 {
		t.Errorf("broker called %d times, want 1", calls.Load())
	}
}

func TestDescribeBody(t *testing.T) {
	cases := []struct {
		ctype, body, want string
	}{
		{"text/html; charset=utf-8", "<html>t.secret</html>", "a 21-byte text/html body"},
		{"application/json", `{"token":"x`, "a 11-byte application/json body"},
		{"", "abc", "a 3-byte untyped body"},
		{"text/t.secret-looking", "abc", "a 3-byte unrecognised-type body"},
		{"application/json", "", "an empty body"},
	}
	for _, tc := range cases {
		h := http.Header{}
		if tc.ctype != "" {
			h.Set("Content-Type", tc.ctype)
		}
		if got := DescribeBody(&Response{Status: 200, Header: h, Body: []byte(tc.body)}); got != tc.want {
			t.Errorf("DescribeBody(%q, %q) = %q, want %q", tc.ctype, tc.body, got, tc.want)
		}
	}
}
