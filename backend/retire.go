package backend

import (
	"context"
	"fmt"

	"github.com/hashicorp/vault/sdk/logical"
)

// retireAll is the incident switch: from now on no lease receives a token
// obtained before this moment, including one a running refresh is about to
// deliver (its epoch is older). Rotated secrets such a refresh brings are still
// stored. It is one step of the config's owner: a refresh finishing at the same
// moment cannot write its token back over it.
func (b *backend) retireAll(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	for {
		st, err := b.lookup(ctx, s, name)
		if err != nil {
			return nil, nil, err
		}
		if st == nil {
			return nil, nil, errConfigNotFound
		}
		st.lockOwner()
		st.mu.Lock()
		if st.dead {
			st.mu.Unlock()
			st.owner.Unlock()
			continue
		}
		rec, cfg := st.rec, st.cfg
		st.mu.Unlock()

		old := rec.Token
		rec.Token = nil
		rec.RetiredBefore = b.now()
		rec.RetireEpoch++
		if err := writeTokenRecord(ctx, s, name, rec); err != nil {
			st.owner.Unlock()
			return nil, nil, fmt.Errorf("retiring the tokens of %q: %w", name, err)
		}
		st.mu.Lock()
		st.rec = rec
		st.failErr = nil
		st.mu.Unlock()
		st.owner.Unlock()
		b.Logger().Warn("all tokens of the config retired", "config", name)
		return cfg, old, nil
	}
}
