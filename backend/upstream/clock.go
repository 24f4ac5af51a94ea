package upstream

import (
	"context"
	"time"
)

// Clock is the time source of the waits this package makes (retry backoff,
// broker-asked waits, shared rate budgets), injectable so tests can assert a
// wait without sleeping.
type Clock interface {
	Now() time.Time
	// Sleep waits d or until ctx is done, whichever comes first, and
	// returns ctx.Err() in the latter case.
	Sleep(ctx context.Context, d time.Duration) error
}

// SystemClock is the real clock.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// Sleep waits on a timer, bounded by ctx.
func (SystemClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// NowClock is a clock read through a function (real time moved on by a
// test, say) whose waits are real: Sleep waits on a timer as SystemClock's.
type NowClock func() time.Time

// Now calls the function.
func (f NowClock) Now() time.Time { return f() }

// Sleep waits on a timer, bounded by ctx.
func (NowClock) Sleep(ctx context.Context, d time.Duration) error {
	return SystemClock{}.Sleep(ctx, d)
}

type backgroundKey struct{}

// WithBackground marks ctx as background work (refresh-ahead, periodic
// keep-alive): nobody waits on it, so it honours a broker's asked wait (up
// to MaxBackgroundWait) instead of failing, and never retries sooner than
// asked. Work without the mark is a reader's request and fails fast.
func WithBackground(ctx context.Context) context.Context {
	return context.WithValue(ctx, backgroundKey{}, true)
}

// IsBackground reports whether ctx was marked by WithBackground.
func IsBackground(ctx context.Context) bool {
	b, _ := ctx.Value(backgroundKey{}).(bool)
	return b
}

// How long a call may wait for a broker's budget: a broker may ask for up to
// a minute (T-Invest's x-ratelimit-reset), which background work can afford;
// a reader gets an answer instead, and the next reader is told when to come
// back without another call spending the budget.
const (
	MaxBackgroundWait = 60 * time.Second
	MaxForegroundWait = 2 * time.Second
)

// maxWait is how long a call under ctx may wait before an attempt.
func maxWait(ctx context.Context) time.Duration {
	if IsBackground(ctx) {
		return MaxBackgroundWait
	}
	return MaxForegroundWait
}
