package main

import (
	"context"
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
	// Refreshes that ran during the run, seconds after its start.
	RefreshesAtS    []float64 `json:"refreshes_at_s"`
	SlowThresholdMs float64   `json:"slow_threshold_ms"`
	CredsSlow       int       `json:"creds_reads_over_threshold"`
	KVExtSlow       int       `json:"kvext_reads_over_threshold"`
	Creds           stats     `json:"creds"`
	KVExt           stats     `json:"kvext"`
	P99CredsOverKV  float64   `json:"p99_creds_over_kvext"`
	P50CredsOverKV  float64   `json:"p50_creds_over_kvext"`
}

func runP3(ctx context.Context, e *env, clients int, d, slice, lifetime, brokerLatency, slow time.Duration) (*p3Result, error) {
	e.sb.SetFinamTokenLifetime(lifetime)
	e.sb.SetLatency(0)
	if err := e.writeFinamConfig(ctx, "p3", true); err != nil {
		return nil, err
	}
	credsPath, kvPath := brokerMount+"/creds/p3", kvExtMount+"/p1"
	closedLoop(ctx, e.c, credsPath, clients, time.Second)
	closedLoop(ctx, e.c, kvPath, clients, time.Second)

	e.sb.SetLatency(brokerLatency)
	defer e.sb.SetLatency(0)
	start := time.Now()
	stopWatch := watchCalls(e, sessionsEP, start)
	creds, kv := &sample{}, &sample{}
	for r := 0; time.Since(start) < d && ctx.Err() == nil; r++ {
		a, b := creds, kv
		pa, pb := credsPath, kvPath
		if r%2 == 1 {
			a, b, pa, pb = kv, creds, kvPath, credsPath
		}
		a.merge(closedLoop(ctx, e.c, pa, clients, slice))
		b.merge(closedLoop(ctx, e.c, pb, clients, slice))
	}
	res := &p3Result{
		Clients: clients, DurationS: round(time.Since(start).Seconds(), 1), SliceS: slice.Seconds(),
		BrokerLatencyMs: ms(brokerLatency), TokenLifetimeS: lifetime.Seconds(),
		RefreshesAtS:    stopWatch(),
		SlowThresholdMs: ms(slow),
		CredsSlow:       creds.countOver(slow),
		KVExtSlow:       kv.countOver(slow),
		Creds:           creds.stats(),
		KVExt:           kv.stats(),
	}
	res.P99CredsOverKV = ratio(res.Creds.P99ms, res.KVExt.P99ms)
	res.P50CredsOverKV = ratio(res.Creds.P50ms, res.KVExt.P50ms)
	e.logf("P3: %d refreshes during the run; creds p99 %.2f ms, kvext p99 %.2f ms (%.2fx); %d creds reads over %s",
		len(res.RefreshesAtS), res.Creds.P99ms, res.KVExt.P99ms, res.P99CredsOverKV, res.CredsSlow, slow)
	return res, nil
}
