package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// Rotating long-lived secrets (ChatApp): every refresh replaces the refresh
// token, and a new pair from tokens.make costs one of 100 a day. The plugin
// (1) records the intent to rotate before calling the broker, so a crash
// between the broker's answer and the storage write is noticed and
// recovered without a human; (2) counts makes per day in storage and
// refuses past a budget; (3) refreshes pairs well before they die.

const (
	walRotation = "rotation"
	// A rotation intent older than this was interrupted: recover it. It is
	// longer than defaultMintTimeout so a live rotation is never taken for a dead one.
	walRecoverAfter = 2 * time.Minute
	makesPrefix     = "makes/"
	// defaultMakeBudget leaves 10 of ChatApp's 100 makes a day for a human.
	defaultMakeBudget = 90
	maxMakeBudget     = 100
)

// errMakeBudget: the daily make budget is spent; answered with 429.
var errMakeBudget = errors.New("the daily tokens.make budget is spent")

type rotationWAL struct {
	Config  string    `json:"config"`
	Started time.Time `json:"started"`
}

func (b *backend) rotates(cfg *brokerConfig) bool {
	return b.specs[cfg.Provider].RotatesSecret
}

func (b *backend) putRotationWAL(ctx context.Context, name string) (string, error) {
	return framework.PutWAL(ctx, b.storage, walRotation, &rotationWAL{Config: name, Started: b.now().UTC()})
}

func (b *backend) deleteRotationWAL(ctx context.Context, id string) {
	if err := framework.DeleteWAL(ctx, b.storage, id); err != nil {
		// Harmless: recovery of a finished rotation is one extra refresh.
		b.Logger().Warn("could not delete a rotation record", "error", err)
	}
}

// walRollback recovers an interrupted rotation: the broker may have replaced
// the refresh token without the new one reaching storage. Refreshing again
// with what storage holds either works (the old one was still valid) or is
// refused, and only then does the provider fall back to tokens.make, within
// the budget. Returning an error keeps the record for the next attempt.
func (b *backend) walRollback(ctx context.Context, req *logical.Request, kind string, data any) error {
	if kind != walRotation {
		return nil
	}
	var w rotationWAL
	if raw, err := json.Marshal(data); err != nil || json.Unmarshal(raw, &w) != nil || w.Config == "" {
		return nil // unreadable: nothing to recover
	}
	cfg, err := b.config(ctx, req.Storage, w.Config)
	if err != nil {
		return err
	}
	if cfg == nil || !b.rotates(cfg) {
		return nil
	}
	b.Logger().Warn("recovering an interrupted rotation", "config", w.Config, "started", w.Started)
	_, _, err = b.refreshInBackground(ctx, req.Storage, w.Config)
	if rejectedSecret(err) || errors.Is(err, errMakeBudget) || errors.Is(err, provider.ErrGuard) {
		// Replaying cannot help: the broker refused what storage holds and
		// the make fallback failed too. The error is in the config's
		// last_error; drop the record rather than present a dead refresh
		// token (and spend a make) at every rollback.
		b.Logger().Error("an interrupted rotation could not be recovered; write the config again", "config", w.Config, "error", err)
		return nil
	}
	return err
}

// makeCount is the durable count of tokens.make calls for one login today.
type makeCount struct {
	Day   string `json:"day"` // UTC date
	Count int    `json:"count"`
}

// makesKey identifies a login: the budget is per email and appId, shared by
// every config that uses the same login.
func makesKey(cfg *brokerConfig) string {
	sum := sha256.Sum256([]byte(strings.ToLower(cfg.Secrets["email"]) + "\x00" + cfg.Secrets["app_id"]))
	return makesPrefix + hex.EncodeToString(sum[:12])
}

// reserveMake returns the hook a provider calls before tokens.make. It
// counts the make in storage first, so a crash after the call still counts.
func (b *backend) reserveMake(cfg *brokerConfig) func(context.Context) error {
	if !b.rotates(cfg) {
		return nil
	}
	budget := cfg.MakeBudget
	if budget <= 0 {
		budget = defaultMakeBudget
	}
	return func(ctx context.Context) error {
		b.makeMu.Lock()
		defer b.makeMu.Unlock()
		key := makesKey(cfg)
		var mc makeCount
		e, err := b.storage.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("reading the make count: %w", err)
		}
		if e != nil {
			if err := e.DecodeJSON(&mc); err != nil {
				return fmt.Errorf("decoding the make count: %w", err)
			}
		}
		today := b.now().UTC().Format(time.DateOnly)
		if mc.Day != today {
			mc = makeCount{Day: today}
		}
		if mc.Count >= budget {
			return fmt.Errorf("%w: %d of the service's 100 are spent for this login; no more until %s 00:00 UTC. Raise make_budget only if you are sure nothing loops",
				errMakeBudget, budget, b.now().UTC().Add(24*time.Hour).Format(time.DateOnly))
		}
		mc.Count++
		e, err = logical.StorageEntryJSON(key, mc)
		if err != nil {
			return err
		}
		if err := b.storage.Put(ctx, e); err != nil {
			return fmt.Errorf("storing the make count: %w", err)
		}
		b.Logger().Warn("calling tokens.make: the refresh token was missing or refused", "count_today", mc.Count, "budget", budget)
		return nil
	}
}

// makesToday reads the count for a config's login.
func (b *backend) makesToday(ctx context.Context, s logical.Storage, cfg *brokerConfig) (int, error) {
	e, err := s.Get(ctx, makesKey(cfg))
	if err != nil || e == nil {
		return 0, err
	}
	var mc makeCount
	if err := e.DecodeJSON(&mc); err != nil {
		return 0, err
	}
	if mc.Day != b.now().UTC().Format(time.DateOnly) {
		return 0, nil
	}
	return mc.Count, nil
}
