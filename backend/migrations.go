package backend

import (
	"context"
	"fmt"
	"net/http"

	"github.com/hashicorp/vault/sdk/logical"
)

// The storage layout is versioned so an upgraded plugin can tell what it
// finds and move it forward once, on the active node, before serving.
const (
	schemaKey     = "schema"
	schemaVersion = 2
)

type schemaRecord struct {
	Version int `json:"version"`
}

// migration returns what moves storage from version v to v+1. Version 0 is
// storage written before the layout was versioned; it is the same as 1.
// Version 2 adds the schedule's index of next due times.
func (b *backend) migration(v int) func(context.Context, logical.Storage) error {
	switch v {
	case 0:
		return func(context.Context, logical.Storage) error { return nil }
	case 1:
		return b.indexSchedule
	}
	return nil
}

// schemaOf reads the storage schema version (0 when unversioned).
func schemaOf(ctx context.Context, s logical.Storage) (int, error) {
	var rec schemaRecord
	e, err := s.Get(ctx, schemaKey)
	if err != nil {
		return 0, fmt.Errorf("reading the storage schema version: %w", err)
	}
	if e != nil {
		if err := e.DecodeJSON(&rec); err != nil {
			return 0, fmt.Errorf("decoding the storage schema version: %w", err)
		}
	}
	return rec.Version, nil
}

// initialize runs pending migrations. Vault calls it once the mount is
// ready, on the active node only; a standby's writes would not be its own.
func (b *backend) initialize(ctx context.Context, req *logical.InitializationRequest) error {
	s := req.Storage
	version, err := schemaOf(ctx, s)
	if err != nil {
		return err
	}
	if version > schemaVersion {
		err := fmt.Errorf("storage was written by a newer plugin (schema %d, this plugin knows %d): upgrade the plugin, do not downgrade", version, schemaVersion)
		// Vault keeps routing to a mount whose initialization failed, so the
		// refusal is remembered and given to every request (HandleRequest).
		msg := err.Error()
		b.refused.Store(&msg)
		b.Logger().Error(msg)
		return err
	}
	b.refused.Store(nil)
	for v := version; v < schemaVersion; v++ {
		if err := b.migration(v)(ctx, s); err != nil {
			return fmt.Errorf("migrating storage from schema %d: %w", v, err)
		}
		e, err := logical.StorageEntryJSON(schemaKey, schemaRecord{Version: v + 1})
		if err != nil {
			return err
		}
		if err := s.Put(ctx, e); err != nil {
			return fmt.Errorf("recording storage schema %d: %w", v+1, err)
		}
		b.Logger().Info("storage migrated", "from", v, "to", v+1)
	}
	return nil
}

// refusal is what a request gets while storage holds a schema this version
// does not know (handled false: serve it): every request but help and
// revoke is refused, since reading could misread what a newer version wrote
// and writing (a config write, a refresh, a rotation's recovery on the
// rollback tick) could destroy it. Revoke reads and writes nothing, so
// leases still end and the mount can be disabled.
func (b *backend) refusal(req *logical.Request) (handled bool, err error) {
	msg := b.refused.Load()
	if msg == nil {
		return false, nil
	}
	switch req.Operation {
	case logical.HelpOperation, logical.RevokeOperation:
		return false, nil
	case logical.RollbackOperation:
		// Every minute: the refusal was logged once already.
		return true, nil
	}
	return true, logical.CodedError(http.StatusServiceUnavailable, *msg)
}
