package backend

import "time"

// Freshness rules. Lifetimes come from the broker; these are fractions of
// them, so they hold for a 15-minute JWT and a 24-hour token alike.
const (
	// A token's refresh point is where two fifths of its life are left
	// (refreshLeft): its leases end there (shapedTTL), and a read from a
	// moment before it (earlyRefresh) starts the background refresh. Clients
	// move to the next token a little past the point (a short lease, their
	// own re-read delay), so at 2/5 the worst swap an Agent makes on a busy
	// machine still leaves over a quarter of the old token's life; at a
	// third it left 24-27% (issue 24). Mints stay at most one per half life
	// (2/5 + at most 1/10 early).
	refreshLeftNum, refreshLeftDen = 2, 5
	// A token with less than min(60 s, a sixth of its life) left is never
	// handed out: the reader would get a token that dies in its hands.
	minRemainingCap      = 60 * time.Second
	minRemainingFraction = 6
	// After a failed refresh with no usable token, reads fail fast with the
	// broker's error for this long instead of piling up on a failing broker.
	failFastFor = 5 * time.Second
	// Background refresh retries back off from this to maxRefreshBackoff.
	refreshBackoff    = 5 * time.Second
	maxRefreshBackoff = 2 * time.Minute

	// Passthrough tokens carry no expiry. A validation is reused
	// for reads up to passthroughMaxAge and revalidated in the background
	// once older than passthroughRevalidate. A renew always asks the broker.
	passthroughMaxAge     = 15 * time.Minute
	passthroughRevalidate = time.Minute
)

// usable reports whether tok may be handed out at now.
func usable(tok *storedToken, now time.Time) bool {
	if tok == nil {
		return false
	}
	if tok.ExpiresAt.IsZero() {
		return now.Sub(tok.IssuedAt) < passthroughMaxAge
	}
	return tok.ExpiresAt.Sub(now) >= minRemaining(tok)
}

func minRemaining(tok *storedToken) time.Duration {
	return min(minRemainingCap, tok.ExpiresAt.Sub(tok.IssuedAt)/minRemainingFraction)
}

// refreshLeft is how much of a token's life is left at its refresh point,
// where its leases end.
func refreshLeft(life time.Duration) time.Duration {
	return life * refreshLeftNum / refreshLeftDen
}

// earlyRefresh is how long before the refresh point a read starts the
// refresh: a read that close gets a short lease (shapedTTL cannot end one
// within minLease), and without the early start its holder would come back
// once more for the old token, a short lease lost before the swap. At most
// a tenth of the life, so mints stay at most one per half life.
func earlyRefresh(life time.Duration) time.Duration {
	return min(minLease, life/10)
}

// dueForRefresh reports whether tok is at its refresh point, or a moment
// before it (earlyRefresh).
func dueForRefresh(tok *storedToken, now time.Time) bool {
	if tok.ExpiresAt.IsZero() {
		return now.Sub(tok.IssuedAt) >= passthroughRevalidate
	}
	life := tok.ExpiresAt.Sub(tok.IssuedAt)
	return tok.ExpiresAt.Sub(now) <= refreshLeft(life)+earlyRefresh(life)
}

// servable reports whether tok may be handed out at now: usable, and not
// obtained before an incident retirement of the config's tokens. The epoch
// is the authority (it needs no clock agreement between HA nodes); the
// time check only covers a retire recorded before epochs existed.
func (r tokenRecord) servable(tok *storedToken, now time.Time) bool {
	if !usable(tok, now) || tok.Epoch < r.RetireEpoch {
		return false
	}
	return r.RetireEpoch > 0 || !tok.RefreshStarted.Before(r.RetiredBefore)
}
