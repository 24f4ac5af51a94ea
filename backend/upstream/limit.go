package upstream

import (
	"context"
	"math"
	"sync"
	"time"
)

// limiter keeps a client under a broker's published request rate: a token
// bucket refilled at rate per second holding at most burst tokens, and an
// optional cap on requests in flight. A caller waits for a slot (bounded by
// its context) rather than earn a 429 from the broker. It refills and waits
// on the client's clock.
type limiter struct {
	clock  Clock
	mu     sync.Mutex
	rate   float64 // tokens a second; 0: no rate limit
	burst  float64
	tokens float64
	last   time.Time
	slots  chan struct{} // nil: no concurrency cap
}

func newLimiter(perMinute, maxConcurrent int, clock Clock) *limiter {
	l := &limiter{clock: clock}
	if perMinute > 0 {
		l.rate = float64(perMinute) / 60
		// A burst of a tenth of a minute's budget smooths spikes without
		// letting one spike spend the broker's whole window.
		l.burst = max(1, float64(perMinute)/10)
		l.tokens = l.burst
		l.last = clock.Now()
	}
	if maxConcurrent > 0 {
		l.slots = make(chan struct{}, maxConcurrent)
	}
	return l
}

// acquire waits for permission to send one request; release must follow.
func (l *limiter) acquire(ctx context.Context) error {
	if l.slots != nil {
		select {
		case l.slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for l.rate > 0 {
		l.mu.Lock()
		now := l.clock.Now()
		// A clock moved back (a test's, or a corrected host clock) refills
		// nothing and does not drain the bucket.
		if now.After(l.last) {
			l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
			l.last = now
		}
		if l.tokens >= 1 {
			l.tokens--
			l.mu.Unlock()
			break
		}
		// Rounded up: a refill a hair short of a whole call (floating
		// point) must still wait a nanosecond, not zero and spin.
		wait := time.Duration(math.Ceil((1 - l.tokens) / l.rate * float64(time.Second)))
		l.mu.Unlock()
		if err := l.clock.Sleep(ctx, wait); err != nil {
			l.release()
			return err
		}
	}
	return nil
}

func (l *limiter) release() {
	if l.slots != nil {
		<-l.slots
	}
}
