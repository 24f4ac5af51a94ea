package tinvest_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/tinvest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream/clocktest"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func clockedClient(t *testing.T, clock upstream.Clock, attempts int) *upstream.Client {
	t.Helper()
	c, err := upstream.New(upstream.Options{Broker: "T-Invest", MaxAttempts: attempts, Timeout: 5 * time.Second, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

func issueWith(ctx context.Context, p provider.Provider, c *upstream.Client, base, token string) (*provider.Token, error) {
	return p.Issue(ctx, provider.Request{BaseURL: base, Environment: "production", Client: c, Secrets: map[string]string{"token": token}})
}

// Configs holding tokens of one T-Invest user share one client-side budget
// (each with its own client, as each config has); another user's token
// draws on its own.
func TestBudgetIsPerUser(t *testing.T) {
	clock := clocktest.New(time.Date(2025, 6, 2, 10, 0, 0, 0, time.UTC))
	e := newSandbox(t, sandbox.Options{Now: clock.Now})
	e.sb.SetTInvestRateLimit(1 << 20) // the broker's own limit is not under test
	e.sb.AddTInvestToken("t.other-user", false, sandbox.TInvestAccount{ID: "1", AccessLevel: sandbox.TInvestReadOnly})
	p := tinvest.NewWithClock(clock)
	ctx := context.Background()
	// Two configs of one user, one of another; each its own client.
	a, b, other := clockedClient(t, clock, 1), clockedClient(t, clock, 1), clockedClient(t, clock, 1)
	// Learn both tokens' user, then let the budget refill.
	for _, tc := range []struct {
		c     *upstream.Client
		token string
	}{{a, sandbox.TInvestFullToken}, {b, sandbox.TInvestReadOnlyToken}, {other, "t.other-user"}} {
		if _, err := issueWith(ctx, p, tc.c, e.prod, tc.token); err != nil {
			t.Fatal(err)
		}
	}
	clock.Advance(time.Hour)
	clock.Slept()
	// The burst is a third of 90: 30 calls, 15 Issues, spread over the
	// user's two tokens; none of them waits.
	for i := range 15 {
		c, tok := a, sandbox.TInvestFullToken
		if i%2 == 1 {
			c, tok = b, sandbox.TInvestReadOnlyToken
		}
		if _, err := issueWith(ctx, p, c, e.prod, tok); err != nil {
			t.Fatalf("issue %d: %v", i, err)
		}
	}
	if s := clock.Slept(); len(s) != 0 {
		t.Fatalf("waited %v within the burst", s)
	}
	// The user's budget is spent: the next call of either token waits
	// (one call a second after the burst), another user's does not.
	if _, err := issueWith(ctx, p, other, e.prod, "t.other-user"); err != nil {
		t.Fatal(err)
	}
	if s := clock.Slept(); len(s) != 0 {
		t.Errorf("another user's token waited %v", s)
	}
	if _, err := issueWith(ctx, p, b, e.prod, sandbox.TInvestReadOnlyToken); err != nil {
		t.Fatal(err)
	}
	if s := clock.Slept(); len(s) != 2 || s[0] != time.Second || s[1] != time.Second {
		t.Errorf("a token of the spent user waited %v, want 1s before each of its two calls", s)
	}
}

// A read that would have to wait past MaxForegroundWait for the user's
// budget fails at once, without a request, and says when to come back.
func TestSpentBudgetFailsReadsFast(t *testing.T) {
	clock := clocktest.New(time.Date(2025, 6, 2, 10, 0, 0, 0, time.UTC))
	e := newSandbox(t, sandbox.Options{Now: clock.Now})
	p := tinvest.NewWithClock(clock)
	c := clockedClient(t, clock, 3)
	// The plugin learns whose tokens these are.
	for _, tok := range []string{sandbox.TInvestFullToken, sandbox.TInvestReadOnlyToken} {
		if _, err := issueWith(context.Background(), p, c, e.prod, tok); err != nil {
			t.Fatal(err)
		}
	}
	e.sb.SetTInvestRateLimit(2)
	if _, err := issueWith(context.Background(), p, c, e.prod, sandbox.TInvestFullToken); err != nil {
		t.Fatal(err)
	}
	e.sb.ResetCalls()
	clock.Slept()
	// The broker's window is spent (x-ratelimit-remaining 0, reset 60):
	// another token of the same user is held back too.
	_, err := issueWith(context.Background(), p, c, e.prod, sandbox.TInvestReadOnlyToken)
	ue := upstreamErr(t, err, sandbox.TInvestReadOnlyToken)
	if ue.Failure != upstream.RateLimited || ue.RetryAfter != time.Minute {
		t.Fatalf("got %v, want rate limited, retry after 1m", err)
	}
	if n := len(e.sb.AllCalls()); n != 0 {
		t.Errorf("a read reached the broker with the user's window spent: %v", e.sb.AllCalls())
	}
	if s := clock.Slept(); len(s) != 0 {
		t.Errorf("a read waited %v", s)
	}
}

// Background work honours x-ratelimit-reset (up to a minute) rather than
// retrying sooner; a read fails fast on the same answer.
func TestRateLimitResetHonoured(t *testing.T) {
	cases := []struct {
		name       string
		background bool
		elapsed    time.Duration // into the broker's window when refused
		wantErr    bool
		wantSleeps []time.Duration
		calls      int // GetInfo calls
	}{
		{"background waits the full reset", true, 0, false, []time.Duration{time.Minute}, 2},
		{"background waits what is left", true, 45 * time.Second, false, []time.Duration{15 * time.Second}, 2},
		{"read fails fast", false, 0, true, nil, 1},
		{"read fails fast past the foreground cap", false, 57 * time.Second, true, nil, 1},
		{"read retries within the foreground cap", false, 59 * time.Second, false, []time.Duration{time.Second}, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			clock := clocktest.New(time.Date(2025, 6, 2, 10, 0, 0, 0, time.UTC))
			e := newSandbox(t, sandbox.Options{Now: clock.Now})
			e.sb.SetTInvestRateLimit(2) // room for a whole Issue once the window resets
			// Spend the user's window from outside this provider (another
			// Vault, another program of the same user).
			spender := clockedClient(t, clock, 1)
			if _, err := issueWith(context.Background(), tinvest.New(), spender, e.prod, sandbox.TInvestFullToken); err != nil {
				t.Fatal(err)
			}
			clock.Advance(tc.elapsed)
			e.sb.ResetCalls()
			clock.Slept()
			ctx := context.Background()
			if tc.background {
				ctx = upstream.WithBackground(ctx)
			}
			_, err := issueWith(ctx, tinvest.NewWithClock(clock), clockedClient(t, clock, 3), e.prod, sandbox.TInvestReadOnlyToken)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if got := clock.Slept(); !slices.Equal(got, tc.wantSleeps) {
				t.Errorf("waited %v, want %v", got, tc.wantSleeps)
			}
			if n := e.sb.Calls(sandbox.TInvestGetInfoEP); n != tc.calls {
				t.Errorf("GetInfo called %d times, want %d", n, tc.calls)
			}
		})
	}
}
