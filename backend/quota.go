package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// Quotas (Spec.Quota): a call the broker allows only so many times a day.
// The plugin counts the calls per day in storage, before each is made, and
// refuses past the config's budget (make_budget).

const (
	// quotaPrefix holds the daily quota counts. The name is historical
	// (the first quota counted makes): kept, so counts survive upgrades.
	quotaPrefix = "makes/"
)

// errQuotaSpent matches any quotaSpentError: a daily quota's budget is
// spent; answered with 429.
var errQuotaSpent error = quotaSpentError{}

// quotaSpentError says which call's budget is spent.
type quotaSpentError struct{ call string }

func (e quotaSpentError) Error() string { return "the daily " + e.call + " budget is spent" }

func (quotaSpentError) Is(target error) bool { _, ok := target.(quotaSpentError); return ok }

// quotaCount is the durable count of a quota's calls for one key today.
type quotaCount struct {
	Day   string `json:"day"` // UTC date
	Count int    `json:"count"`
}

// quotaKey is where the count for the quota's key (the login the broker
// counts against, from the provider) is stored: shared by every config
// with the same key.
func quotaKey(q *provider.Quota, cfg *brokerConfig) string {
	sum := sha256.Sum256([]byte(q.Key(cfg.Secrets)))
	return quotaPrefix + hex.EncodeToString(sum[:12])
}

// reserveQuota returns the hook a provider calls before spending one call
// of its quota, nil when it has none. It counts the call in storage first,
// so a crash after the call still counts.
func (b *backend) reserveQuota(cfg *brokerConfig) func(context.Context) error {
	q := b.specs[cfg.Provider].Quota
	if q == nil {
		return nil
	}
	budget := cfg.quotaBudget(b.specs[cfg.Provider])
	return func(ctx context.Context) error {
		b.quotaMu.Lock()
		defer b.quotaMu.Unlock()
		key := quotaKey(q, cfg)
		var mc quotaCount
		e, err := b.storage.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("reading the quota count: %w", err)
		}
		if e != nil {
			if err := e.DecodeJSON(&mc); err != nil {
				return fmt.Errorf("decoding the quota count: %w", err)
			}
		}
		today := b.now().UTC().Format(time.DateOnly)
		if mc.Day != today {
			mc = quotaCount{Day: today}
		}
		if mc.Count >= budget {
			return fmt.Errorf("%w: %d of the service's %d are spent for this login; no more until %s 00:00 UTC. Raise make_budget only if you are sure nothing loops",
				quotaSpentError{q.Call}, budget, q.Limit, b.now().UTC().Add(24*time.Hour).Format(time.DateOnly))
		}
		mc.Count++
		e, err = logical.StorageEntryJSON(key, mc)
		if err != nil {
			return err
		}
		if err := b.storage.Put(ctx, e); err != nil {
			return fmt.Errorf("storing the quota count: %w", err)
		}
		b.Logger().Warn("spending a quota-limited call", "call", q.Call, "config_provider", cfg.Provider, "count_today", mc.Count, "budget", budget)
		return nil
	}
}

// quotaUsedToday reads today's count for a config's quota key.
func (b *backend) quotaUsedToday(ctx context.Context, s logical.Storage, q *provider.Quota, cfg *brokerConfig) (int, error) {
	e, err := s.Get(ctx, quotaKey(q, cfg))
	if err != nil || e == nil {
		return 0, err
	}
	var mc quotaCount
	if err := e.DecodeJSON(&mc); err != nil {
		return 0, err
	}
	if mc.Day != b.now().UTC().Format(time.DateOnly) {
		return 0, nil
	}
	return mc.Count, nil
}
