package backend

import (
	"container/heap"
	"context"
	"errors"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// Periodic work is scheduled per config in a min-heap keyed by due time, so
// a tick costs time in proportion to what is due, not to the number of
// configs. The heap is built from storage once, on the first tick after the
// backend starts, and kept current by config writes and deletes.

const (
	// retryFailedValidation is how soon a failed keep-alive is retried.
	retryFailedValidation = time.Hour
	// maxDuePerTick bounds one tick; the rest stays due for the next.
	maxDuePerTick = 256
)

type dueItem struct {
	name  string
	at    time.Time
	index int
}

type dueHeap []*dueItem

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].index = i; h[j].index = j }
func (h *dueHeap) Push(x any)        { it := x.(*dueItem); it.index = len(*h); *h = append(*h, it) }
func (h *dueHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	it.index = -1
	return it
}

// schedule is the set of configs with periodic work and when it is due.
type schedule struct {
	mu     sync.Mutex
	loaded bool
	h      dueHeap
	items  map[string]*dueItem
	// pending are the index's hours not read yet, in order.
	pending []int64
	// idxMu serialises writes of the persisted index; persisted is the
	// hour each config's index entry is under, where known.
	idxMu     sync.Mutex
	persisted map[string]int64
}

func newSchedule() *schedule {
	return &schedule{items: map[string]*dueItem{}, persisted: map[string]int64{}}
}

// set schedules name at at (zero time: no periodic work).
func (s *schedule) set(name string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	it, ok := s.items[name]
	switch {
	case at.IsZero() && ok:
		heap.Remove(&s.h, it.index)
		delete(s.items, name)
	case at.IsZero():
	case ok:
		it.at = at
		heap.Fix(&s.h, it.index)
	default:
		it = &dueItem{name: name, at: at}
		heap.Push(&s.h, it)
		s.items[name] = it
	}
}

// setIfAbsent schedules name at at unless it is already scheduled (a
// write or a refresh since knows better).
func (s *schedule) setIfAbsent(name string, at time.Time) {
	s.mu.Lock()
	_, ok := s.items[name]
	s.mu.Unlock()
	if !ok {
		s.set(name, at)
	}
}

// popDue removes and returns up to max names due at now.
func (s *schedule) popDue(now time.Time, max int) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for len(s.h) > 0 && !s.h[0].at.After(now) && len(out) < max {
		it := heap.Pop(&s.h).(*dueItem)
		delete(s.items, it.name)
		out = append(out, it.name)
	}
	return out
}

func (s *schedule) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.h)
}

// nextDue is when a config next needs periodic work (zero: never).
func (b *backend) nextDue(cfg *brokerConfig, rec tokenRecord) time.Time {
	if cfg == nil {
		return time.Time{}
	}
	spec, ok := b.specs[cfg.Provider]
	if !ok {
		return time.Time{}
	}
	if spec.RotatesSecret {
		return b.nextRotation(cfg, rec)
	}
	if spec.Issuance != provider.Passthrough {
		// Minted tokens are refreshed ahead on the read path; nothing to keep alive.
		return time.Time{}
	}
	if cfg.NoKeepAlive {
		return time.Time{} // the operator chose the broker's own inactivity expiry
	}
	interval := cfg.validationInterval()
	last := rec.LastRefresh
	if rec.LastErrorAt.After(last) {
		return rec.LastErrorAt.Add(min(interval, retryFailedValidation))
	}
	if last.IsZero() {
		return b.now()
	}
	// last is when the previous validation finished, a moment after the
	// tick that started it; without the slack the next tick (about a minute
	// later) would find it not yet due and a 1m interval would become 2m.
	return last.Add(interval - min(interval/20, 10*time.Second))
}

// nextRotation is when a rotating pair is refreshed proactively: once
// rotation_fraction (cfg.rotationFraction) of the refresh token's life has passed,
// so it never dies unused. After a failure it is retried within the hour.
func (b *backend) nextRotation(cfg *brokerConfig, rec tokenRecord) time.Time {
	if rec.SecretExpiresAt.IsZero() || rec.LastRefresh.IsZero() {
		return time.Time{} // nothing rotated yet: the first creds read makes the pair
	}
	if rec.LastErrorAt.After(rec.LastRefresh) {
		// Retry sooner as the refresh token's end nears, never in a loop.
		left := rec.SecretExpiresAt.Sub(rec.LastErrorAt)
		return rec.LastErrorAt.Add(min(retryFailedValidation, max(time.Minute, left/4)))
	}
	return rec.LastRefresh.Add(time.Duration(float64(rec.SecretExpiresAt.Sub(rec.LastRefresh)) * cfg.rotationFraction()))
}

// periodicFunc runs due keep-alive work. Vault calls it about once a minute;
// it does nothing on a performance standby or secondary, whose writes would
// not be theirs to make.
func (b *backend) periodicFunc(ctx context.Context, req *logical.Request) error {
	if !b.canWrite() {
		return nil
	}
	if err := b.loadSchedule(ctx, req.Storage); err != nil {
		return err
	}
	due := b.sched.popDue(b.now(), maxDuePerTick)
	for i, name := range due {
		if ctx.Err() != nil {
			// Cut short: what this tick did not reach stays due.
			for _, rest := range due[i:] {
				b.sched.setIfAbsent(rest, b.now())
			}
			return ctx.Err()
		}
		b.keepAlive(ctx, req.Storage, name)
	}
	return nil
}

// keepAlive revalidates one config's token if it is due, and reschedules
// it. An entry from the persisted index carries only its hour: the config's
// own record says whether it is due yet.
func (b *backend) keepAlive(ctx context.Context, s logical.Storage, name string) {
	cfg, rec, err := b.status(ctx, s, name)
	if err != nil {
		b.sched.setIfAbsent(name, b.now().Add(retryFailedValidation))
		return
	}
	due := b.nextDue(cfg, rec)
	if due.IsZero() || due.After(b.now()) {
		// Deleted, changed to a provider with no periodic work, or not due
		// yet.
		b.reschedule(ctx, name, due)
		return
	}
	_, _, err = b.refreshInBackground(ctx, s, name)
	if ctx.Err() != nil {
		// The tick was cut short mid-call: due again at the next one.
		b.sched.setIfAbsent(name, b.now())
		return
	}
	if err != nil && !errors.Is(err, errConfigNotFound) {
		b.Logger().Warn("keep-alive validation failed", "config", name, "error", err)
	}
	cfg, rec, err = b.status(ctx, s, name)
	if err != nil {
		b.sched.setIfAbsent(name, b.now().Add(retryFailedValidation))
		return
	}
	b.reschedule(ctx, name, b.nextDue(cfg, rec))
}
