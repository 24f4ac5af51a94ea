package backend

import (
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
)

// tickConfigs is how many configs the tick benchmark schedules (the P4 phase
// of internal/bench holds as many).
const tickConfigs = 10000

// BenchmarkPeriodicFunc measures one real periodic tick: the rollback
// request Vault's rollback manager sends a mount once a minute, through the
// framework (the backend's PeriodicFunc, then the listing of its WAL
// entries), on the SDK's in-memory storage, over 10,000 configs of a
// passthrough provider with keep-alive validations (the fake of
// fakes_test.go, on a fake clock).
//
// The configs validate every 100 minutes and were written in 100 cohorts
// a minute apart, so when the clock moves one minute per tick, exactly one
// cohort (1%) comes due at every tick and is validated, stored and
// rescheduled 100 minutes on: the load stays the same for any b.N, with no
// stopped timer and no rebuilt schedule. With the clock standing still
// between the last write and the first cohort's due time, nothing is due.
// Both cases run on the same 10,000 configs and the same schedule.
//
// What a tick with something due costs is mostly the validations themselves
// (per config: two storage reads, the provider call, the token record and
// its due-index entry written back), not the scheduling.
func BenchmarkPeriodicFunc(b *testing.B) {
	for _, due := range []int{0, tickConfigs / 100} {
		b.Run(fmt.Sprintf("configs=%d/due=%d", tickConfigs, due), func(b *testing.B) {
			benchPeriodicFunc(b, due)
		})
	}
}

func benchPeriodicFunc(b *testing.B, due int) {
	const (
		cohorts  = 100
		interval = cohorts * time.Minute
	)
	// The harness's logger (the SDK's test config) writes to hclog's default
	// output, and go test puts that on the same stream as the benchmark's
	// result lines: a log line written between a result's name and its
	// numbers breaks them for internal/bench. Benchmarks run after every
	// test, so nothing else logs meanwhile.
	out := hclog.DefaultOutput
	hclog.DefaultOutput = io.Discard
	b.Cleanup(func() { hclog.DefaultOutput = out })
	f := tinvestLike()
	c := newFakeHarness(b, f)
	// Vault's default log level: the test config logs at trace, and
	// formatting a debug line per validation would be much of what is
	// measured.
	c.b.Logger().SetLevel(hclog.Info)
	for k := range cohorts {
		for i := range tickConfigs / cohorts {
			c.ok(logical.UpdateOperation, fmt.Sprintf("config/c%03d-%03d", k, i), map[string]any{
				"provider": "fakepass", "secret": "t", "validation_interval": int(interval / time.Second),
			})
		}
		if k < cohorts-1 {
			c.clock.Advance(time.Minute)
		}
	}
	if got := c.b.sched.size(); got != tickConfigs {
		b.Fatalf("%d configs scheduled, want %d", got, tickConfigs)
	}
	// The first cohort is due 100 minutes after it was written, less the
	// slack nextDue allows (10 s): 99 minutes after it, nothing is due yet.
	step := time.Duration(0)
	if due > 0 {
		c.clock.Advance(time.Minute) // the first cohort is due
		step = time.Minute
	}
	tick := &logical.Request{Operation: logical.RollbackOperation, Path: "", Storage: c.storage}
	run := func() int {
		calls := f.callCount()
		if _, err := c.b.HandleRequest(context.Background(), tick); err != nil {
			b.Fatal(err)
		}
		return f.callCount() - calls
	}
	// The first tick of a backend lists the persisted index's hours, and
	// the first validation of each config in a process costs more than the
	// next ones (about 57 allocations more, measured: 11,341 allocs/op over
	// 100 ticks against 6,170 over 1,000). So one whole cycle, every config
	// validated once, runs before the timer: what is measured is the steady
	// state of a long-running plugin.
	if got := run(); got != due {
		b.Fatalf("the first tick validated %d configs, want %d", got, due)
	}
	for range cohorts - 1 {
		c.clock.Advance(step)
		if got := run(); got != due {
			b.Fatalf("a warm-up tick validated %d configs, want %d", got, due)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	validated := 0
	for b.Loop() {
		c.clock.Advance(step)
		got := run()
		if got != due {
			b.Fatalf("a tick validated %d configs, want %d", got, due)
		}
		validated += got
	}
	b.ReportMetric(float64(validated)/float64(b.N), "validations/op")
	if got := c.b.sched.size(); got != tickConfigs {
		b.Fatalf("%d configs scheduled after the ticks, want all %d", got, tickConfigs)
	}
}
