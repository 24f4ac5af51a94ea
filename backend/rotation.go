package backend

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// Rotating long-lived secrets (Spec.RotatesSecret): every refresh may
// replace the secret. The plugin records the intent to rotate before
// calling the broker, so a crash between the broker's answer and the
// storage write is noticed and recovered without a human, and refreshes
// the secret well before it dies.

const (
	walRotation = "rotation"
	// A rotation intent older than this was interrupted: recover it. It is
	// longer than defaultRefreshTimeout (one broker call) so a live rotation
	// is never taken for a dead one.
	walRecoverAfter = 2 * time.Minute
)

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

// deleteRotationWALs deletes the rotation records whose rotations are
// stored (or moot); empty ids are skipped.
func (b *backend) deleteRotationWALs(ctx context.Context, ids ...string) {
	for _, id := range ids {
		if id != "" {
			b.deleteRotationWAL(ctx, id)
		}
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
	if rejectedSecret(err) || errors.Is(err, errQuotaSpent) || errors.Is(err, provider.ErrGuard) {
		// Replaying cannot help: the broker refused what storage holds and
		// any fallback failed too. The error is in the config's
		// last_error; drop the record rather than present a dead refresh
		// token (and spend a make) at every rollback.
		b.Logger().Error("an interrupted rotation could not be recovered; write the config again", "config", w.Config, "error", err)
		return nil
	}
	return err
}
