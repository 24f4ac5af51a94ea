package backend

import "time"

// Freshness rules. Lifetimes come from the broker; these are fractions of
// them, so they hold for a 15-minute JWT and a 24-hour token alike.
const (
	// A token is refreshed in the background once a third of its life is left.
	refreshAtFraction = 3
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

// dueForRefresh reports whether a third or less of tok's life is left.
func dueForRefresh(tok *storedToken, now time.Time) bool {
	if tok.ExpiresAt.IsZero() {
		return now.Sub(tok.IssuedAt) >= passthroughRevalidate
	}
	life := tok.ExpiresAt.Sub(tok.IssuedAt)
	return tok.ExpiresAt.Sub(now) <= life/refreshAtFraction
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
