package main

import (
	"context"
	"fmt"
	"time"
)

// P1: cached creds reads against two floors, interleaved in one run.
//
//   creds  broker/creds/p1       the plugin's cached token, as a new lease
//   kvext  kvext/p1              HashiCorp's kv engine as an external plugin
//                                (same gRPC hop; Vault registers a lease for
//                                its reads too, since it only knows its
//                                built-in kv as non-leasing)
//   kvv2   kvv2/data/p1          Vault's built-in kv-v2: no plugin process
//
// Both kv mounts hold exactly the data a creds read returns, so every target
// answers the same payload. For each client count the targets take turns in
// short slices, round after round, so drift (GC, lease tables growing,
// another process waking up) falls on all of them alike.

type p1Config struct {
	Clients []int         `json:"clients"`
	Rounds  int           `json:"rounds"`
	Slice   time.Duration `json:"-"`
	Warm    time.Duration `json:"-"`
	SliceS  float64       `json:"slice_s"`
	WarmS   float64       `json:"warmup_s"`
}

type p1Level struct {
	Clients int              `json:"clients"`
	Targets map[string]stats `json:"targets"`
	// Ratios of creds to each floor (below 1: creds is faster).
	P50CredsOverKVExt float64 `json:"p50_creds_over_kvext"`
	P50CredsOverKVV2  float64 `json:"p50_creds_over_kvv2"`
	P99CredsOverKVExt float64 `json:"p99_creds_over_kvext"`
	P99CredsOverKVV2  float64 `json:"p99_creds_over_kvv2"`
	RPSCredsOverKVExt float64 `json:"throughput_creds_over_kvext"`
	// The p50 ratio of creds to kvext round by round: its spread is the
	// noise of the machine.
	P50CredsOverKVExtByRound []float64 `json:"p50_creds_over_kvext_by_round"`
}

type p1Result struct {
	Config p1Config  `json:"config"`
	Levels []p1Level `json:"levels"`
	// Upstream mints during P1 after the config write (target: 0).
	Mints int `json:"upstream_mints_during_reads"`
}

var p1Targets = []struct{ name, path string }{
	{"creds", brokerMount + "/creds/p1"},
	{"kvext", kvExtMount + "/p1"},
	{"kvv2", kvV2Mount + "/data/p1"},
}

func runP1(ctx context.Context, e *env, cfg p1Config) (*p1Result, error) {
	// A long-lived token: P1 is about the cached path, and leases that
	// expire mid-run would add revocation work to later phases.
	e.sb.SetFinamTokenLifetime(24 * time.Hour)
	if err := e.writeFinamConfig(ctx, "p1", true, 0); err != nil {
		return nil, err
	}
	var creds struct {
		Data map[string]any `json:"data"`
	}
	if err := e.c.apiJSON(ctx, "GET", brokerMount+"/creds/p1", nil, &creds); err != nil {
		return nil, err
	}
	if err := e.writeKV(ctx, "p1", creds.Data); err != nil {
		return nil, err
	}
	mintsBefore := e.sb.Calls(sessionsEP)

	res := &p1Result{Config: cfg}
	res.Config.SliceS, res.Config.WarmS = cfg.Slice.Seconds(), cfg.Warm.Seconds()
	for _, n := range cfg.Clients {
		for _, t := range p1Targets {
			if s := closedLoop(ctx, e.c, t.path, n, cfg.Warm, nil); s.errors > 0 {
				return nil, fmt.Errorf("P1 warm-up of %s: %d errors, last: %s", t.name, s.errors, s.lastErr)
			}
		}
		acc := map[string]*sample{}
		for _, t := range p1Targets {
			acc[t.name] = &sample{}
		}
		var byRound []float64
		for r := range cfg.Rounds {
			// Rotate who goes first, so no target always follows another.
			p50 := map[string]float64{}
			for i := range p1Targets {
				t := p1Targets[(i+r)%len(p1Targets)]
				s := closedLoop(ctx, e.c, t.path, n, cfg.Slice, nil)
				p50[t.name] = s.stats().P50ms
				acc[t.name].merge(s)
			}
			byRound = append(byRound, ratio(p50["creds"], p50["kvext"]))
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
		}
		lv := p1Level{Clients: n, Targets: map[string]stats{}, P50CredsOverKVExtByRound: byRound}
		for name, s := range acc {
			lv.Targets[name] = s.stats()
		}
		c, x, v := lv.Targets["creds"], lv.Targets["kvext"], lv.Targets["kvv2"]
		lv.P50CredsOverKVExt, lv.P50CredsOverKVV2 = ratio(c.P50ms, x.P50ms), ratio(c.P50ms, v.P50ms)
		lv.P99CredsOverKVExt, lv.P99CredsOverKVV2 = ratio(c.P99ms, x.P99ms), ratio(c.P99ms, v.P99ms)
		lv.RPSCredsOverKVExt = ratio(c.RPS, x.RPS)
		res.Levels = append(res.Levels, lv)
		e.logf("P1 %2d clients: creds p50 %.3f ms, kvext p50 %.3f ms, kvv2 p50 %.3f ms (creds/kvext %.2f)",
			n, c.P50ms, x.P50ms, v.P50ms, lv.P50CredsOverKVExt)
	}
	res.Mints = e.sb.Calls(sessionsEP) - mintsBefore
	return res, nil
}

// level returns the P1 level with n clients.
func (r *p1Result) level(n int) *p1Level {
	if r == nil {
		return nil
	}
	for i := range r.Levels {
		if r.Levels[i].Clients == n {
			return &r.Levels[i]
		}
	}
	return nil
}
