package backend

import (
	"context"
	"fmt"

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
		return fmt.Errorf("storage was written by a newer plugin (schema %d, this plugin knows %d): upgrade the plugin, do not downgrade", version, schemaVersion)
	}
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
