package main

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"time"
)

// P2: what readers cost upstream.
//
// Cold: N clients read creds of a config that has no token yet, all at once,
// while the broker answers slowly (so they really overlap the mint): the
// single flight must make exactly one mint.
//
// Steady: a fixed rate of reads for minutes with a short token lifetime:
// mints stay at one per three fifths of the lifetime (refresh ahead, at most
// one per half lifetime), and once
// warm no read waits on the broker. The broker is made slow (latency) after
// warm-up, so a read that waited on it stands out by its latency.

const (
	sessionsEP = "POST /v1/sessions"
	detailsEP  = "POST /v1/sessions/details"
)

type p2ColdResult struct {
	Readers         int     `json:"readers"`
	BrokerLatencyMs float64 `json:"broker_latency_ms"`
	Mints           int     `json:"upstream_mints"`
	DetailsCalls    int     `json:"upstream_details_calls"`
	OK              int     `json:"ok"`
	DistinctTokens  int     `json:"distinct_tokens"`
	// Readers that waited on the mint (slower than half the broker latency).
	WaitedOnMint int     `json:"readers_that_waited_on_the_mint"`
	Latency      stats   `json:"latency"`
	Seconds      float64 `json:"seconds"`
}

func runP2Cold(ctx context.Context, e *env, readers int, brokerLatency time.Duration) (*p2ColdResult, error) {
	// Long-lived: no lease of this phase expires during a later one.
	e.sb.SetFinamTokenLifetime(24 * time.Hour)
	if err := e.writeFinamConfig(ctx, "cold", false, 0); err != nil {
		return nil, err
	}
	e.sb.SetLatency(brokerLatency)
	defer e.sb.SetLatency(0)
	mints, details := e.sb.Calls(sessionsEP), e.sb.Calls(detailsEP)

	start := make(chan struct{})
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		tokens = map[string]int{}
		s      = &sample{}
		ready  sync.WaitGroup
	)
	for range readers {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			ready.Done()
			<-start
			t := time.Now()
			r := e.c.do(ctx, http.MethodGet, brokerMount+"/creds/cold", nil, true)
			s.add(time.Since(t), r)
			if r.err == nil && r.status == http.StatusOK {
				var out struct {
					Data struct {
						AccessToken string `json:"access_token"`
					} `json:"data"`
				}
				if json.Unmarshal(r.body, &out) == nil {
					mu.Lock()
					tokens[out.Data.AccessToken]++
					mu.Unlock()
				}
			}
		}()
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	wg.Wait()
	res := &p2ColdResult{
		Readers:         readers,
		BrokerLatencyMs: ms(brokerLatency),
		Mints:           e.sb.Calls(sessionsEP) - mints,
		DetailsCalls:    e.sb.Calls(detailsEP) - details,
		OK:              len(s.lat),
		DistinctTokens:  len(tokens),
		WaitedOnMint:    s.countOver(brokerLatency / 2),
		Latency:         s.stats(),
		Seconds:         round(time.Since(t0).Seconds(), 2),
	}
	e.logf("P2 cold: %d readers, %d ok, %d upstream mint(s), %d waited on it", readers, res.OK, res.Mints, res.WaitedOnMint)
	return res, nil
}

type p2SteadyResult struct {
	Rate            int     `json:"reads_per_second"`
	DurationS       float64 `json:"duration_s"`
	WarmupS         float64 `json:"warmup_s"`
	TokenLifetimeS  float64 `json:"token_lifetime_s"`
	BrokerLatencyMs float64 `json:"broker_latency_ms_after_warmup"`
	SlowThresholdMs float64 `json:"slow_threshold_ms"`
	Mints           int     `json:"upstream_mints"`
	// MintBound is duration / (lifetime/2) + 1: the refresh ahead runs at
	// three fifths of the life (a read up to 2 s early starts it), so never
	// more than one mint per half life.
	MintBound float64 `json:"mint_bound"`
	// When each mint was seen, seconds after the run started.
	MintAtS []float64 `json:"mints_at_s"`
	// LeaseTTLS is the config's ttl (0: leases end with the token).
	LeaseTTLS float64 `json:"lease_ttl_s"`
	// When the tokens served during the run expire upstream, seconds after
	// its start: every lease handed out with a token ends then, unless a
	// ttl cuts it shorter.
	TokenExpiriesAtS []float64 `json:"token_expiries_at_s"`
	// Reads slower than the threshold. A read can wait on the broker only
	// while a mint is under way (the only broker call on the read path):
	// WaitedOnBroker counts slow reads that overlapped a mint; the others
	// were slowed by something else, AtTokenExpiry of them from 1.5 s
	// before to 5 s after a token's expiry (JWT exp and lease TTLs are whole
	// seconds; the revocation burst takes a few seconds).
	SlowReads      int       `json:"reads_over_threshold"`
	WaitedOnBroker int       `json:"reads_that_waited_on_the_broker"`
	AtTokenExpiry  int       `json:"slow_reads_at_a_token_expiry"`
	SlowAtS        []float64 `json:"slow_reads_at_s,omitempty"`
	Latency        stats     `json:"latency"`
	// CPU of Vault and of the plugin, every half second.
	CPU *cpuTimeline `json:"cpu_timeline"`
}

// slowRead is one read over the threshold: when it was sent (or due) and
// how long it took, in seconds after the run's start.
type slowRead struct{ at, lat float64 }

// classify counts slow reads that overlapped a mint window [m, m+mintDur]
// and, of the rest, those from 1.5 s before to 5 s after a token expiry.
func classify(slow []slowRead, mints []float64, mintDur float64, expiries []float64) (duringMint, atExpiry int) {
	for _, r := range slow {
		overlap := false
		for _, m := range mints {
			if r.at <= m+mintDur && r.at+r.lat >= m {
				overlap = true
				break
			}
		}
		if overlap {
			duringMint++
			continue
		}
		for _, x := range expiries {
			if r.at+r.lat >= x-1.5 && r.at <= x+5 {
				atExpiry++
				break
			}
		}
	}
	return duringMint, atExpiry
}

// expiries are the upstream expiries of the tokens served: the first one,
// minted at firstAt with no broker latency, and one per mint (the broker
// dates a token when it answers, after its latency).
func expiries(firstAt float64, mints []float64, latency, lifetime time.Duration) []float64 {
	out := []float64{round(firstAt+lifetime.Seconds(), 2)}
	for _, m := range mints {
		out = append(out, round(m+latency.Seconds()+lifetime.Seconds(), 2))
	}
	return out
}

func runP2Steady(ctx context.Context, e *env, rate int, warm, d, lifetime, brokerLatency, slow, leaseTTL time.Duration) (*p2SteadyResult, error) {
	e.sb.SetFinamTokenLifetime(lifetime)
	e.sb.SetLatency(0)
	written := time.Now()
	if err := e.writeFinamConfig(ctx, "steady", true, leaseTTL); err != nil {
		return nil, err
	}
	path := brokerMount + "/creds/steady"
	if s := openLoop(ctx, e.c, path, rate, warm, nil); s.errors > 0 {
		e.logf("P2 steady warm-up: %d errors (last: %s)", s.errors, s.lastErr)
	}

	e.sb.SetLatency(brokerLatency)
	defer e.sb.SetLatency(0)
	start := time.Now()
	stopWatch := watchCalls(e, sessionsEP, start)
	stopCPU := e.sampleCPU(500 * time.Millisecond)
	var mu sync.Mutex
	var slowReads []slowRead
	s := openLoop(ctx, e.c, path, rate, d, func(due time.Time, lat time.Duration, r result) {
		if lat > slow {
			mu.Lock()
			slowReads = append(slowReads, slowRead{due.Sub(start).Seconds(), lat.Seconds()})
			mu.Unlock()
		}
	})
	mintAt := stopWatch()
	cpu := stopCPU()
	e.shortLeasesUntil = time.Now().Add(lifetime)
	exp := expiries(written.Sub(start).Seconds(), mintAt, brokerLatency, lifetime)
	cpu.around(exp)
	// A mint is two broker calls; allow a little for the plugin's own work.
	duringMint, atExpiry := classify(slowReads, mintAt, 2*brokerLatency.Seconds()+0.5, exp)
	var slowAt []float64
	for _, r := range slowReads[:min(len(slowReads), 100)] {
		slowAt = append(slowAt, round(r.at, 2))
	}
	res := &p2SteadyResult{
		Rate: rate, DurationS: d.Seconds(), WarmupS: warm.Seconds(),
		TokenLifetimeS:   lifetime.Seconds(),
		BrokerLatencyMs:  ms(brokerLatency),
		SlowThresholdMs:  ms(slow),
		Mints:            len(mintAt),
		MintBound:        round(d.Seconds()/(lifetime.Seconds()/2)+1, 2),
		MintAtS:          mintAt,
		LeaseTTLS:        leaseTTL.Seconds(),
		TokenExpiriesAtS: exp,
		SlowReads:        len(slowReads),
		WaitedOnBroker:   duringMint,
		AtTokenExpiry:    atExpiry,
		SlowAtS:          slowAt,
		CPU:              cpu,
		Latency:          s.stats(),
	}
	e.logf("P2 steady: %d reads in %s, %d mints (bound %.1f), %d reads over %s (%d during a mint, %d at a token expiry), p99 %.2f ms",
		res.Latency.N, d, res.Mints, res.MintBound, res.SlowReads, slow, res.WaitedOnBroker, res.AtTokenExpiry, res.Latency.P99ms)
	return res, nil
}

// watchCalls polls a sandbox counter every 50 ms and, when stopped, returns
// the times (seconds after start) at which calls were seen.
func watchCalls(e *env, endpoint string, start time.Time) func() []float64 {
	done := make(chan struct{})
	out := make(chan []float64, 1)
	base := e.sb.Calls(endpoint)
	go func() {
		var at []float64
		seen := base
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			stop := false
			select {
			case <-done:
				stop = true
			case <-tick.C:
			}
			n := e.sb.Calls(endpoint)
			for ; seen < n; seen++ {
				at = append(at, round(time.Since(start).Seconds(), 2))
			}
			if stop {
				out <- at
				return
			}
		}
	}()
	return func() []float64 { close(done); return <-out }
}
