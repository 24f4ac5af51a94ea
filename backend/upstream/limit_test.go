package upstream

import (
	"context"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream/clocktest"
)

// The limiter lets calls through at its rate once the burst is spent, each
// after one wait of its share, on the clock it is given. A wait rounded
// down to nothing (a refill a hair short of a whole call, in floating
// point) would spin without moving a hand-moved clock, and burn a core for
// a moment on the real one.
func TestLimiterWaitsOneShareACallAfterTheBurst(t *testing.T) {
	for _, perMinute := range []int{180, 200, 300, 7} {
		clk := clocktest.New(time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC))
		l := newLimiter(perMinute, 0, clk)
		burst := max(1, perMinute/10)
		share := time.Duration(float64(time.Minute) / float64(perMinute))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		calls := burst + 20
		for i := range calls {
			if err := l.acquire(ctx); err != nil {
				t.Fatalf("%d a minute: call %d: %v after %d waits", perMinute, i, err, len(clk.Slept()))
			}
			l.release()
		}
		cancel()
		slept := clk.Slept()
		if len(slept) < calls-burst || len(slept) > 2*(calls-burst) {
			t.Fatalf("%d a minute: %d waits for %d calls over the burst", perMinute, len(slept), calls-burst)
		}
		var total time.Duration
		for _, d := range slept {
			total += d
		}
		want := time.Duration(calls-burst) * share
		if total < want-time.Millisecond || total > want+time.Millisecond {
			t.Fatalf("%d a minute: waited %v in all, want %v (%d calls of %v)", perMinute, total, want, calls-burst, share)
		}
	}
}
