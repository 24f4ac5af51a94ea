package main

import (
	"context"
	"sync"
	"time"
)

// P3: a slow broker must not show in read latency. The sandbox answers every
// call after a delay (1 s) and tokens live 60 s, so the plugin refreshes
// several times during the run; creds reads and external-kv reads take turns
// in short slices at the same client count, and the creds p99 is compared
// with the kv p99: refreshes run off the read path.

type p3Result struct {
	Clients         int     `json:"clients"`
	DurationS       float64 `json:"duration_s"`
	SliceS          float64 `json:"slice_s"`
	BrokerLatencyMs float64 `json:"broker_latency_ms"`
	TokenLifetimeS  float64 `json:"token_lifetime_s"`
	LeaseTTLS       float64 `json:"lease_ttl_s"`
	// Refreshes that ran during the run, seconds after its start, and when
	// the tokens served expire upstream (their leases end then too).
	RefreshesAtS     []float64 `json:"refreshes_at_s"`
	TokenExpiriesAtS []float64 `json:"token_expiries_at_s"`
	SlowThresholdMs  float64   `json:"slow_threshold_ms"`
	CredsSlow        int       `json:"creds_reads_over_threshold"`
	// Of those, how many overlapped a refresh (could have waited on the
	// broker) and how many came from 1.5 s before to 5 s after a token expiry.
	CredsSlowInMint int `json:"creds_slow_reads_during_a_refresh"`
	CredsSlowAtExp  int `json:"creds_slow_reads_at_a_token_expiry"`
	KVExtSlow       int `json:"kvext_reads_over_threshold"`
	// When the slow reads were sent, seconds after the start.
	CredsSlowAtS   []float64 `json:"creds_slow_reads_at_s,omitempty"`
	KVExtSlowAtS   []float64 `json:"kvext_slow_reads_at_s,omitempty"`
	Creds          stats     `json:"creds"`
	KVExt          stats     `json:"kvext"`
	P99CredsOverKV float64   `json:"p99_creds_over_kvext"`
	P50CredsOverKV float64   `json:"p50_creds_over_kvext"`
}

func runP3(ctx context.Context, e *env, clients int, d, slice, lifetime, brokerLatency, slow, leaseTTL time.Duration) (*p3Result, error) {
	e.sb.SetFinamTokenLifetime(lifetime)
	e.sb.SetLatency(0)
	written := time.Now()
	if err := e.writeFinamConfig(ctx, "p3", true, leaseTTL); err != nil {
		return nil, err
	}
	credsPath, kvPath := brokerMount+"/creds/p3", kvExtMount+"/p1"
	closedLoop(ctx, e.c, credsPath, clients, time.Second, nil)
	closedLoop(ctx, e.c, kvPath, clients, time.Second, nil)

	e.sb.SetLatency(brokerLatency)
	defer e.sb.SetLatency(0)
	start := time.Now()
	stopWatch := watchCalls(e, sessionsEP, start)
	creds, kv := &sample{}, &sample{}
	var mu sync.Mutex
	slowReads := map[string][]slowRead{}
	onSlow := func(name string) func(time.Time, time.Duration, result) {
		return func(sent time.Time, lat time.Duration, _ result) {
			if lat > slow {
				mu.Lock()
				slowReads[name] = append(slowReads[name], slowRead{sent.Sub(start).Seconds(), lat.Seconds()})
				mu.Unlock()
			}
		}
	}
	for r := 0; time.Since(start) < d && ctx.Err() == nil; r++ {
		a, b := creds, kv
		pa, pb := credsPath, kvPath
		na, nb := "creds", "kvext"
		if r%2 == 1 {
			a, b, pa, pb, na, nb = kv, creds, kvPath, credsPath, nb, na
		}
		a.merge(closedLoop(ctx, e.c, pa, clients, slice, onSlow(na)))
		b.merge(closedLoop(ctx, e.c, pb, clients, slice, onSlow(nb)))
	}
	refreshes := stopWatch()
	e.shortLeasesUntil = time.Now().Add(lifetime)
	exp := expiries(written.Sub(start).Seconds(), refreshes, brokerLatency, lifetime)
	duringMint, atExpiry := classify(slowReads["creds"], refreshes, 2*brokerLatency.Seconds()+0.5, exp)
	times := func(rs []slowRead) []float64 {
		var out []float64
		for _, r := range rs[:min(len(rs), 50)] {
			out = append(out, round(r.at, 2))
		}
		return out
	}
	res := &p3Result{
		Clients: clients, DurationS: round(time.Since(start).Seconds(), 1), SliceS: slice.Seconds(),
		BrokerLatencyMs: ms(brokerLatency), TokenLifetimeS: lifetime.Seconds(),
		LeaseTTLS:        leaseTTL.Seconds(),
		RefreshesAtS:     refreshes,
		TokenExpiriesAtS: exp,
		SlowThresholdMs:  ms(slow),
		CredsSlow:        len(slowReads["creds"]),
		CredsSlowInMint:  duringMint,
		CredsSlowAtExp:   atExpiry,
		KVExtSlow:        len(slowReads["kvext"]),
		CredsSlowAtS:     times(slowReads["creds"]),
		KVExtSlowAtS:     times(slowReads["kvext"]),
		Creds:            creds.stats(),
		KVExt:            kv.stats(),
	}
	res.P99CredsOverKV = ratio(res.Creds.P99ms, res.KVExt.P99ms)
	res.P50CredsOverKV = ratio(res.Creds.P50ms, res.KVExt.P50ms)
	e.logf("P3: %d refreshes during the run; creds p99 %.2f ms, kvext p99 %.2f ms (%.2fx); %d creds reads over %s",
		len(res.RefreshesAtS), res.Creds.P99ms, res.KVExt.P99ms, res.P99CredsOverKV, res.CredsSlow, slow)
	return res, nil
}
