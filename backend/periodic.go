package backend

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// The scheduling policy: when each config next needs periodic work
// (nextDue: a passthrough token's keep-alive, a rotating secret's proactive
// refresh, the retry after a failure) and the tick that runs what is due.
// The configs wait in the schedule (schedule.go), built from storage once,
// on the first tick after the backend starts, and kept current by config
// writes and deletes.

const (
	// retryFailedValidation is how soon a failed keep-alive is retried.
	retryFailedValidation = time.Hour
	// maxDuePerTick bounds one tick; the rest stays due for the next.
	maxDuePerTick = 256
)

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
		if !rotatesAhead(spec) {
			// A fixed expiry: refreshing ahead would not extend it. Minted
			// tokens are refreshed ahead on the read path.
			return time.Time{}
		}
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
	b.retryUnpersisted(ctx)
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
	cfg, rec, err := b.view(ctx, s, name)
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
	cfg, rec, err = b.view(ctx, s, name)
	if err != nil {
		b.sched.setIfAbsent(name, b.now().Add(retryFailedValidation))
		return
	}
	b.reschedule(ctx, name, b.nextDue(cfg, rec))
}
