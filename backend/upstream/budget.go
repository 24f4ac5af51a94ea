package upstream

import (
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// RateLimit is what a broker's x-ratelimit-* headers said. A field is
// meaningful only when its Has flag is set: brokers send these on some
// answers only, and T-Invest documents them for gRPC, not REST.
type RateLimit struct {
	// Limit requests per Window: the most restrictive policy stated.
	Limit    int
	Window   time.Duration
	HasLimit bool
	// Remaining requests in the current window.
	Remaining    int
	HasRemaining bool
	// Reset is the time until the window resets.
	Reset    time.Duration
	HasReset bool
}

// defaultWindow is the window of a limit stated without one: T-Invest's
// limits are per minute.
const defaultWindow = time.Minute

// ParseRateLimit reads x-ratelimit-limit, -remaining and -reset. The limit's
// real form is a list, the current quota first then policies with their
// window in seconds ("100, 100;w=60"); a bare integer is read as per minute.
// Values it cannot read are left unset rather than guessed.
func ParseRateLimit(h http.Header) RateLimit {
	var rl RateLimit
	if v := h.Get("x-ratelimit-limit"); v != "" {
		rl.Limit, rl.Window, rl.HasLimit = parseLimit(v)
	}
	if n, ok := leadingCount(h.Get("x-ratelimit-remaining")); ok {
		rl.Remaining, rl.HasRemaining = int(min(n, 1<<31-1)), true
	}
	if n, ok := leadingCount(h.Get("x-ratelimit-reset")); ok {
		rl.Reset, rl.HasReset = seconds(n), true
	}
	return rl
}

// parseLimit picks the most restrictive rate among the list's items.
func parseLimit(v string) (int, time.Duration, bool) {
	best, bestWin, found := 0, time.Duration(0), false
	for _, item := range strings.Split(v, ",") {
		parts := strings.Split(item, ";")
		n, ok := leadingCount(parts[0])
		if !ok || n <= 0 || n > 1<<31-1 {
			continue
		}
		win := defaultWindow
		for _, p := range parts[1:] {
			k, val, _ := strings.Cut(strings.TrimSpace(p), "=")
			if strings.EqualFold(strings.TrimSpace(k), "w") {
				if s, ok := leadingCount(val); ok && s > 0 {
					win = seconds(s)
				}
			}
		}
		// n/win < best/bestWin, compared without division.
		if !found || float64(n)*bestWin.Seconds() < float64(best)*win.Seconds() {
			best, bestWin, found = int(n), win, true
		}
	}
	return best, bestWin, found
}

// leadingCount reads a non-negative integer, surrounding blanks allowed.
func leadingCount(v string) (int64, bool) {
	v = strings.TrimSpace(v)
	if v == "" || v[0] == '+' || v[0] == '-' {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil && n >= 0
}

// Budget is a client-side request budget shared by calls of several Clients:
// T-Invest counts its limit per user across all that user's tokens, so every
// config holding a token of one user must draw on one Budget. It is a token
// bucket that never lets more than perWindow calls through in any window, and
// it holds every call back until a time the broker named (a 429's reset, or
// a window whose remaining count reached zero).
type Budget struct {
	clock Clock
	scope string

	mu        sync.Mutex
	perWindow int
	window    time.Duration
	rate      float64 // tokens a second
	burst     float64
	tokens    float64 // may go negative: calls reserved ahead
	last      time.Time
	holdUntil time.Time
}

// NewBudget allows perWindow calls per window: a burst of a third of it and
// the rest spread over the window, so that no window ever sees more than
// perWindow. scope names whose budget it is in messages ("this T-Invest
// user"). A nil clock is the system clock.
func NewBudget(perWindow int, window time.Duration, scope string, clock Clock) *Budget {
	if clock == nil {
		clock = SystemClock{}
	}
	b := &Budget{clock: clock, scope: scope, last: clock.Now()}
	b.setRate(max(perWindow, 1), max(window, time.Second))
	b.tokens = b.burst
	return b
}

func (b *Budget) setRate(perWindow int, window time.Duration) {
	b.perWindow, b.window = perWindow, window
	b.burst = max(1, float64(perWindow/3))
	b.rate = max(float64(perWindow)-b.burst, 1) / window.Seconds()
	b.tokens = min(b.tokens, b.burst)
}

// refill brings the bucket up to now; b.mu must be held.
func (b *Budget) refill(now time.Time) {
	if now.After(b.last) {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
		b.last = now
	}
}

// reserve takes one call's slot if it can be had within maxWait and says
// how long to wait before using it. When it cannot, nothing is taken and the
// wait that would be needed is returned with ok false.
func (b *Budget) reserve(maxWait time.Duration) (wait time.Duration, ok bool) {
	now := b.clock.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	hold := max(b.holdUntil.Sub(now), 0)
	// The bucket's own wait, counted from the end of the hold: a hold
	// does not refill the bucket faster.
	need := time.Duration(0)
	if b.tokens < 1 {
		need = time.Duration((1 - b.tokens) / b.rate * float64(time.Second))
	}
	wait = max(hold, need)
	if wait > maxWait {
		return wait, false
	}
	b.tokens--
	return wait, true
}

// Charge spends one slot for a call already made outside the budget (the
// first call of a token whose user was not known yet).
func (b *Budget) Charge() {
	now := b.clock.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	b.tokens--
}

// HoldUntil keeps every call back until t: the broker said a retry sooner
// fails again and only burns what is left.
func (b *Budget) HoldUntil(t time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if t.After(b.holdUntil) {
		b.holdUntil = t
	}
}

// Observe applies what a broker's headers said: a window whose remaining
// count is spent holds calls until it resets, and a stated limit lower than
// the budget's lowers the budget (to nine tenths of it); a higher one is
// ignored, so a header cannot make the plugin flood the broker.
func (b *Budget) Observe(rl RateLimit) {
	now := b.clock.Now()
	if rl.HasRemaining && rl.Remaining == 0 && rl.HasReset && rl.Reset > 0 {
		b.HoldUntil(now.Add(min(rl.Reset, MaxBackgroundWait)))
	}
	if !rl.HasLimit {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	want := max(1, rl.Limit*9/10)
	// Compare rates: want/rl.Window against perWindow/window.
	if float64(want)*b.window.Seconds() < float64(b.perWindow)*rl.Window.Seconds() {
		b.refill(now)
		b.setRate(want, rl.Window)
	}
}

// Idle reports whether the budget is back to its resting state (full, not
// held), so dropping it and starting afresh later loses nothing.
func (b *Budget) Idle() bool {
	now := b.clock.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refill(now)
	return b.tokens >= b.burst && !b.holdUntil.After(now)
}

// Limit reports the budget's current calls per window.
func (b *Budget) Limit() (int, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.perWindow, b.window
}
