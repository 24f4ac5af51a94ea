package backend

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// The schedule's persisted index: one empty entry per config with periodic
// work, at due/<hour>/<name>, the hour being when it is next due. After a
// reload, restart or failover the first tick lists the hours (a few dozen
// keys) and reads only the configs of the hours that have come; later
// hours are read as they come. So the schedule comes back in time
// proportional to what is due, not to the number of configs.

const (
	duePrefix = "due/"
	// dueRepairKey marks an index that missed a write (see reschedule).
	dueRepairKey = "due-repair"
	dueBucket    = time.Hour
	// indexedSchema is the storage schema from which the index is complete
	// (the migration to it builds the index once).
	indexedSchema = 2
)

func bucketOf(at time.Time) int64 { return at.Unix() / int64(dueBucket/time.Second) }

func bucketStart(b int64) time.Time { return time.Unix(b*int64(dueBucket/time.Second), 0) }

func dueKey(bucket int64, name string) string {
	return duePrefix + strconv.FormatInt(bucket, 10) + "/" + name
}

// reschedule sets when name next needs periodic work (zero: never), in
// memory and, on a node that can write, in the persisted index.
func (b *backend) reschedule(ctx context.Context, name string, at time.Time) {
	b.sched.set(name, at)
	if b.storage == nil || !b.canWrite() {
		return
	}
	b.sched.idxMu.Lock()
	defer b.sched.idxMu.Unlock()
	old, had := b.sched.persisted[name]
	if at.IsZero() {
		delete(b.sched.unpersisted, name)
		if had {
			b.deleteDueKey(ctx, dueKey(old, name))
			delete(b.sched.persisted, name)
		}
		return
	}
	nb := bucketOf(at)
	if had && old == nb {
		return
	}
	if err := b.storage.Put(ctx, &logical.StorageEntry{Key: dueKey(nb, name)}); err != nil {
		// The in-memory schedule still holds it, and the next tick writes
		// it again; the repair mark makes a restart before that rebuild
		// the schedule from every config.
		b.Logger().Warn("could not store a config's next due time; it is written again at the next tick", "config", name, "error", err)
		b.sched.unpersisted[name] = true
		if err := b.storage.Put(ctx, &logical.StorageEntry{Key: dueRepairKey}); err != nil {
			b.Logger().Warn("could not mark the schedule index for repair", "error", err)
		}
		return
	}
	delete(b.sched.unpersisted, name)
	b.sched.persisted[name] = nb
	if had {
		b.deleteDueKey(ctx, dueKey(old, name))
	}
}

func (b *backend) deleteDueKey(ctx context.Context, key string) {
	if err := b.storage.Delete(ctx, key); err != nil {
		b.Logger().Warn("could not delete a stale due time; the tick that reaches it drops it", "key", key, "error", err)
	}
}

// loadSchedule brings the schedule up to now: on the first tick it lists
// the index's hours (or, before the index exists, scans every config once
// and writes it); on every tick it reads the hours that have come.
func (b *backend) loadSchedule(ctx context.Context, s logical.Storage) error {
	b.sched.mu.Lock()
	loaded := b.sched.loaded
	b.sched.mu.Unlock()
	if !loaded {
		if err := b.openIndex(ctx, s); err != nil {
			return err
		}
	}
	return b.loadDueHours(ctx, s, bucketOf(b.now()))
}

func (b *backend) openIndex(ctx context.Context, s logical.Storage) error {
	version, err := schemaOf(ctx, s)
	if err != nil {
		return err
	}
	if version < indexedSchema {
		// Vault runs the migration that builds the index before the mount
		// serves; without it (an old Vault), scan every config once.
		return b.scanSchedule(ctx, s)
	}
	repair, err := s.Get(ctx, dueRepairKey)
	if err != nil {
		return fmt.Errorf("reading the schedule index's repair mark: %w", err)
	}
	if repair != nil {
		// A write of the index failed before a restart: it may lack a
		// config. Rebuild it from every config once.
		b.Logger().Warn("the schedule index missed a write; rebuilding it from every config")
		if err := b.indexSchedule(ctx, s); err != nil {
			return err
		}
		if b.canWrite() {
			if err := s.Delete(ctx, dueRepairKey); err != nil {
				b.Logger().Warn("could not clear the schedule index's repair mark", "error", err)
			}
		}
	}
	hours, err := s.List(ctx, duePrefix)
	if err != nil {
		return fmt.Errorf("listing the schedule index: %w", err)
	}
	var pending []int64
	for _, h := range hours {
		n, err := strconv.ParseInt(strings.TrimSuffix(h, "/"), 10, 64)
		if err != nil {
			continue // not ours
		}
		pending = append(pending, n)
	}
	slices.Sort(pending)
	b.sched.mu.Lock()
	b.sched.pending, b.sched.loaded = pending, true
	b.sched.mu.Unlock()
	return nil
}

// scanSchedule schedules every config from a full scan.
func (b *backend) scanSchedule(ctx context.Context, s logical.Storage) error {
	err := b.eachConfig(ctx, s, func(name string, cfg *brokerConfig, rec tokenRecord) error {
		b.sched.setIfAbsent(name, b.nextDue(cfg, rec))
		return nil
	})
	if err != nil {
		return err
	}
	b.sched.mu.Lock()
	b.sched.loaded = true
	b.sched.mu.Unlock()
	return nil
}

// indexSchedule is the migration to schema 2: it writes the index entry of
// every config with periodic work, reading storage directly (nothing is
// loaded into memory).
func (b *backend) indexSchedule(ctx context.Context, s logical.Storage) error {
	return b.eachConfig(ctx, s, func(name string, cfg *brokerConfig, rec tokenRecord) error {
		if due := b.nextDue(cfg, rec); !due.IsZero() {
			if err := s.Put(ctx, &logical.StorageEntry{Key: dueKey(bucketOf(due), name)}); err != nil {
				return fmt.Errorf("indexing config %q: %w", name, err)
			}
		}
		return nil
	})
}

// eachConfig reads every config and its token record straight from
// storage. One unreadable entry skips that entry, not the rest.
func (b *backend) eachConfig(ctx context.Context, s logical.Storage, fn func(string, *brokerConfig, tokenRecord) error) error {
	names, err := s.List(ctx, configPrefix)
	if err != nil {
		return fmt.Errorf("listing configs: %w", err)
	}
	for _, name := range names {
		if strings.HasSuffix(name, "/") {
			continue
		}
		cfg, err := readConfig(ctx, s, name)
		if err == nil && cfg == nil {
			continue
		}
		var rec tokenRecord
		if err == nil {
			rec, err = readTokenRecord(ctx, s, name)
		}
		if errors.Is(err, errUndecodable) {
			b.Logger().Error("skipping a config the schedule cannot decode", "config", name, "error", err)
			continue
		}
		if err != nil {
			// Storage failing to answer: the whole pass is tried again,
			// rather than leave a config out of the schedule for good.
			return err
		}
		if err := fn(name, cfg, rec); err != nil {
			return err
		}
	}
	return nil
}

// loadDueHours reads the index's hours up to and including upTo: each
// config there is scheduled at its hour's start, and the tick that pops it
// checks the config's real due time.
func (b *backend) loadDueHours(ctx context.Context, s logical.Storage, upTo int64) error {
	for {
		b.sched.mu.Lock()
		if len(b.sched.pending) == 0 || b.sched.pending[0] > upTo {
			b.sched.mu.Unlock()
			return nil
		}
		hour := b.sched.pending[0]
		b.sched.mu.Unlock()
		names, err := s.List(ctx, duePrefix+strconv.FormatInt(hour, 10)+"/")
		if err != nil {
			return fmt.Errorf("listing the schedule index: %w", err)
		}
		b.sched.idxMu.Lock()
		for _, name := range names {
			if _, ok := b.sched.persisted[name]; !ok {
				b.sched.persisted[name] = hour
				b.sched.setIfAbsent(name, bucketStart(hour))
			} else if b.sched.persisted[name] != hour && b.canWrite() {
				// Rescheduled since, without knowing this hour: stale.
				b.deleteDueKey(ctx, dueKey(hour, name))
			}
		}
		b.sched.idxMu.Unlock()
		b.sched.mu.Lock()
		b.sched.pending = b.sched.pending[1:]
		b.sched.mu.Unlock()
	}
}

// retryUnpersisted writes again the index entries that failed.
func (b *backend) retryUnpersisted(ctx context.Context) {
	b.sched.idxMu.Lock()
	names := slices.Collect(maps.Keys(b.sched.unpersisted))
	b.sched.idxMu.Unlock()
	for _, name := range names {
		b.sched.mu.Lock()
		var at time.Time
		if it, ok := b.sched.items[name]; ok {
			at = it.at
		}
		b.sched.mu.Unlock()
		b.reschedule(ctx, name, at)
	}
}
