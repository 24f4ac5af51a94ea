package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// P4: many configs. N configs are written through the API (Finam with
// verify=false; one in a hundred is T-Invest, the provider with periodic
// work), each made warm by a creds read, and the plugin process is looked
// at from outside: its RSS and open descriptors when all are warm and
// again once idle connections have expired, its CPU over an idle minute
// (one periodic tick with nothing due), over the tick that has the 1% of
// T-Invest configs due, and over the first tick after a plugin reload.
// Vault offers no trigger for PeriodicFunc (its rollback manager calls it
// once a minute), so ticks are waited for and recognised by the upstream
// calls or the CPU they cause. The scheduling cost of one tick in isolation
// comes from the in-process Go benchmark BenchmarkPeriodicFunc.

type p4Config struct {
	Configs     int
	Concurrency int
	// Ticks: also measure the idle minute, the 1%-due tick and the reload
	// (several minutes of waiting for Vault's once-a-minute ticks).
	Ticks bool
}

type p4Result struct {
	Configs        int       `json:"configs"`
	Finam          int       `json:"finam_configs"`
	TInvest        int       `json:"tinvest_configs"`
	WriteSeconds   float64   `json:"write_seconds"`
	WritesPerS     float64   `json:"config_writes_per_s"`
	WarmSeconds    float64   `json:"warm_seconds"`
	WarmReadsPerS  float64   `json:"warming_reads_per_s"`
	WarmMints      int       `json:"warming_upstream_mints"`
	WarmErrors     int       `json:"errors"`
	LastError      string    `json:"last_error,omitempty"`
	RSSBefore      procMem   `json:"plugin_before_configs"`
	RSSWarm        procMem   `json:"plugin_all_warm"`
	FDsBefore      int       `json:"plugin_open_fds_before"`
	FDsWarm        int       `json:"plugin_open_fds_all_warm"`
	ThreadsWarm    int       `json:"plugin_threads_all_warm"`
	PerConfigKB    float64   `json:"rss_per_warm_config_kb"`
	RSSIdle        procMem   `json:"plugin_after_idle_connections_expired"`
	FDsIdle        int       `json:"plugin_open_fds_after_idle"`
	SecondsToIdle  float64   `json:"idle_measured_s_after_warm"`
	VaultRSS       procMem   `json:"vault_server"`
	KVPluginRSS    procMem   `json:"kv_plugin"`
	IdleMinute     *cpuWin   `json:"idle_minute,omitempty"`
	DueTick        *tickM    `json:"tick_1pct_due,omitempty"`
	Reload         *reload   `json:"first_tick_after_reload,omitempty"`
	PeriodicBench  []goBench `json:"periodic_tick_go_benchmark,omitempty"`
	PeriodicBenchE string    `json:"periodic_bench_error,omitempty"`
}

type cpuWin struct {
	Seconds float64 `json:"window_s"`
	CPUms   float64 `json:"plugin_cpu_ms"`
	Note    string  `json:"note"`
}

type tickM struct {
	Due           int     `json:"configs_due"`
	UpstreamCalls int     `json:"upstream_calls"`
	WallMs        float64 `json:"wall_ms"`
	CPUms         float64 `json:"plugin_cpu_ms"`
	WaitedS       float64 `json:"waited_for_tick_s"`
	Seen          bool    `json:"seen"`
}

type reload struct {
	StartCPUms   float64 `json:"process_start_cpu_ms"`
	TickCPUms    float64 `json:"first_tick_cpu_ms"`
	TickWallMs   float64 `json:"first_tick_wall_ms"`
	TickAtS      float64 `json:"first_tick_at_s"`
	Seen         bool    `json:"seen"`
	RSSAfterTick procMem `json:"rss_after_first_tick"`
	// CPUSteps are [seconds after the reload, plugin CPU ms] wherever the
	// CPU time moved, for a look at what happened when.
	CPUSteps [][2]float64 `json:"cpu_steps"`
	Note     string       `json:"note"`
}

func p4Name(i int) string { return fmt.Sprintf("n%05d", i) }

func p4IsTInvest(i int) bool { return i%100 == 99 }

// p4TInvestToken is the T-Invest token of config i, a user's own.
func p4TInvestToken(i int) string { return fmt.Sprintf("bench-tinvest-%05d", i) }

func runP4(ctx context.Context, e *env, cfg p4Config) (*p4Result, error) {
	e.sb.SetFinamTokenLifetime(24 * time.Hour)
	e.sb.SetLatency(0)
	pid, err := e.pluginPID()
	if err != nil {
		return nil, err
	}
	res := &p4Result{Configs: cfg.Configs}
	res.RSSBefore, _ = readMem(pid)
	res.FDsBefore = openFDs(pid)

	// Each T-Invest config holds a token of a user of its own, as configs of
	// different people do: the plugin budgets T-Invest calls per user (90 a
	// minute, shared by all of one user's configs, as T-Invest counts
	// them), and 100 configs of one user would spend 200 calls on their
	// writes and again on their due tick.
	for i := range cfg.Configs {
		if p4IsTInvest(i) {
			e.sb.AddTInvestToken(p4TInvestToken(i), false, sandbox.TInvestAccount{
				ID: fmt.Sprintf("20%08d", i), Type: "ACCOUNT_TYPE_TINKOFF", Name: "bench", Status: "ACCOUNT_STATUS_OPEN",
				OpenedDate: time.Date(2024, 1, 10, 0, 0, 0, 0, time.UTC), AccessLevel: sandbox.TInvestReadOnly})
		}
	}

	// Write.
	t0 := time.Now()
	errs := parallel(ctx, cfg.Configs, cfg.Concurrency, func(i int) error {
		body := map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": e.sbURL, "verify": false}
		if p4IsTInvest(i) {
			// verify=true: the validation made here is the token's, so
			// nothing is due until its validation interval has passed.
			body = map[string]any{"provider": "tinvest", "token": p4TInvestToken(i), "base_url": e.sbURL + sandbox.TInvestPrefix, "verify": true}
		}
		return e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+p4Name(i), body, nil)
	})
	if errs.n > 0 {
		return nil, fmt.Errorf("P4: %d config writes failed, last: %v", errs.n, errs.last)
	}
	res.WriteSeconds = round(time.Since(t0).Seconds(), 2)
	res.WritesPerS = round(float64(cfg.Configs)/time.Since(t0).Seconds(), 1)
	for i := range cfg.Configs {
		if p4IsTInvest(i) {
			res.TInvest++
		} else {
			res.Finam++
		}
	}
	e.logf("P4: %d configs written in %.1fs", cfg.Configs, res.WriteSeconds)

	// Warm: one creds read each (Finam: a mint; T-Invest: the cached
	// validation).
	mints := e.sb.Calls(sessionsEP)
	t0 = time.Now()
	errs = parallel(ctx, cfg.Configs, cfg.Concurrency, func(i int) error {
		return e.c.do(ctx, http.MethodGet, brokerMount+"/creds/"+p4Name(i), nil, false).check("creds/" + p4Name(i))
	})
	warmEnd := time.Now()
	res.WarmSeconds = round(warmEnd.Sub(t0).Seconds(), 2)
	res.WarmReadsPerS = round(float64(cfg.Configs)/warmEnd.Sub(t0).Seconds(), 1)
	res.WarmMints = e.sb.Calls(sessionsEP) - mints
	res.WarmErrors = errs.n
	if errs.last != nil {
		res.LastError = errs.last.Error()
	}
	time.Sleep(2 * time.Second) // let the last mints' goroutines settle
	res.RSSWarm, _ = readMem(pid)
	res.FDsWarm = openFDs(pid)
	res.ThreadsWarm = threads(pid)
	res.PerConfigKB = round((res.RSSWarm.RSSMB-res.RSSBefore.RSSMB)*1024/float64(cfg.Configs), 2)
	if vp := e.v.PID(); vp > 0 {
		res.VaultRSS, _ = readMem(vp)
	}
	if kp, err := findProcess(e.kvExe); err == nil {
		res.KVPluginRSS, _ = readMem(kp)
	}
	e.logf("P4: warm in %.1fs (%d mints, %d errors); plugin RSS %.1f MB (before: %.1f MB), %d open fds",
		res.WarmSeconds, res.WarmMints, res.WarmErrors, res.RSSWarm.RSSMB, res.RSSBefore.RSSMB, res.FDsWarm)

	// Wait until the idle keep-alive connections to the broker have
	// expired (90 s in Go's default transport) and, for the tick
	// measurements, until earlier phases' short leases (60 s tokens), which
	// Vault revokes through the plugin as they expire, are gone.
	wait := 95*time.Second - time.Since(warmEnd)
	if cfg.Ticks {
		wait = max(wait, time.Until(e.shortLeasesUntil.Add(5*time.Second)))
	}
	if wait > 0 {
		e.logf("P4: waiting %s for idle connections (and short leases) to expire", wait.Round(time.Second))
		sleepCtx(ctx, wait)
	}
	res.SecondsToIdle = round(time.Since(warmEnd).Seconds(), 1)
	res.RSSIdle, _ = readMem(pid)
	res.FDsIdle = openFDs(pid)
	e.logf("P4: %.0fs after warm: plugin RSS %.1f MB, %d open fds", res.SecondsToIdle, res.RSSIdle.RSSMB, res.FDsIdle)

	if cfg.Ticks {
		// An idle minute holds exactly one tick, with nothing due.
		c0, _ := cpuTime(pid)
		w0 := time.Now()
		sleepCtx(ctx, 60*time.Second)
		c1, _ := cpuTime(pid)
		res.IdleMinute = &cpuWin{Seconds: round(time.Since(w0).Seconds(), 1), CPUms: ms(c1 - c0),
			Note: "plugin CPU over 60 s without requests: one periodic tick with nothing due, plus the Go runtime's own background work (a forced GC every 2 min over the whole heap); 10 ms resolution"}
		e.logf("P4: idle minute: %.0f ms plugin CPU", res.IdleMinute.CPUms)

		// 1% due: the T-Invest configs get a 1-minute validation
		// interval; their last validation is older than that, so the next
		// tick validates all of them.
		res.DueTick, err = dueTick(ctx, e, pid, cfg)
		if err != nil {
			return nil, err
		}
	}
	if cfg.Ticks {
		res.Reload, err = reloadTick(ctx, e, cfg)
		if err != nil {
			return nil, err
		}
	}
	return res, nil
}

// dueTick makes 1% of the configs due and measures the tick that serves
// them.
func dueTick(ctx context.Context, e *env, pid int, cfg p4Config) (*tickM, error) {
	var due []int
	for i := range cfg.Configs {
		if p4IsTInvest(i) {
			due = append(due, i)
		}
	}
	errs := parallel(ctx, len(due), cfg.Concurrency, func(k int) error {
		return e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+p4Name(due[k]),
			map[string]any{"validation_interval": "1m", "verify": false}, nil)
	})
	if errs.n > 0 {
		return nil, fmt.Errorf("P4: making configs due: %v", errs.last)
	}
	calls := func() int { return e.sb.Calls(sandbox.TInvestGetInfoEP) + e.sb.Calls(sandbox.TInvestGetAccountsEP) }
	base := calls()
	want := base + 2*len(due)
	m := &tickM{Due: len(due)}
	w0 := time.Now()
	var (
		startAt, lastAt   time.Time
		cpuStart, cpuLast time.Duration
		prevCPU, _        = cpuTime(pid)
		seen              = base
	)
	for time.Since(w0) < 80*time.Second && ctx.Err() == nil {
		time.Sleep(20 * time.Millisecond)
		n := calls()
		cpu, _ := cpuTime(pid)
		if n > seen {
			if startAt.IsZero() {
				startAt, cpuStart = time.Now(), prevCPU
			}
			lastAt, cpuLast, seen = time.Now(), cpu, n
		}
		prevCPU = cpu
		if !startAt.IsZero() && (n >= want || time.Since(lastAt) > 3*time.Second) {
			// Let the tick write its last status.
			time.Sleep(200 * time.Millisecond)
			cpuLast, _ = cpuTime(pid)
			break
		}
	}
	if startAt.IsZero() {
		e.logf("P4: no tick with the due configs seen in 80 s")
		return m, nil
	}
	m.Seen = true
	m.UpstreamCalls = seen - base
	m.WallMs = ms(lastAt.Sub(startAt))
	m.CPUms = ms(cpuLast - cpuStart)
	m.WaitedS = round(startAt.Sub(w0).Seconds(), 1)
	e.logf("P4: tick with %d due: %d upstream calls in %.0f ms, %.0f ms plugin CPU", m.Due, m.UpstreamCalls, m.WallMs, m.CPUms)

	// Put them back on the daily interval so the reload measures loading.
	errs = parallel(ctx, len(due), cfg.Concurrency, func(k int) error {
		return e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+p4Name(due[k]),
			map[string]any{"validation_interval": "24h", "verify": false}, nil)
	})
	if errs.n > 0 {
		return nil, fmt.Errorf("P4: resetting validation_interval: %v", errs.last)
	}
	return m, nil
}

// reloadTick reloads the plugin (a restart, as after an upgrade or a
// leadership change) and measures the first tick of the new process, which
// builds the schedule from storage.
func reloadTick(ctx context.Context, e *env, cfg p4Config) (*reload, error) {
	old, _ := e.pluginPID()
	if err := e.c.apiJSON(ctx, "PUT", "sys/plugins/reload/backend", map[string]any{"plugin": vaulttest.PluginName}, nil); err != nil {
		return nil, err
	}
	var pid int
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if p, err := e.pluginPID(); err == nil && p != old {
			pid = p
			break
		}
	}
	r := &reload{Note: "the first PeriodicFunc of a new plugin process lists config/ and loads every config and token record from storage (loadSchedule); recognised as the largest CPU burst after the process start-up (its first 2 s); 50 ms samples of 10 ms CPU ticks"}
	if pid == 0 {
		r.Note = "no new plugin process seen after the reload"
		return r, nil
	}
	// Sample CPU every 50 ms: the start-up, then the first tick (Vault's
	// rollback manager ticks once a minute, so it comes within 60 s). A
	// burst is a run of samples in which the CPU time grew, gaps of up to
	// 200 ms included; the tick is the largest burst after the start-up.
	type pt struct {
		at  time.Time
		cpu time.Duration
	}
	type burst struct{ from, to int }
	const startup = 2 * time.Second
	var (
		pts    []pt
		bursts []burst
		start  = time.Now()
	)
	largest := func() (burst, time.Duration) {
		var best burst
		var cpu time.Duration
		for _, b := range bursts {
			if c := pts[b.to].cpu - pts[b.from].cpu; c > cpu {
				best, cpu = b, c
			}
		}
		return best, cpu
	}
	for time.Since(start) < 75*time.Second && ctx.Err() == nil {
		c, err := cpuTime(pid)
		if err != nil {
			break
		}
		now := time.Now()
		pts = append(pts, pt{now, c})
		i := len(pts) - 1
		if i > 0 && pts[i].cpu != pts[i-1].cpu {
			r.CPUSteps = append(r.CPUSteps, [2]float64{round(now.Sub(start).Seconds(), 2), ms(c)})
			if now.Sub(start) > startup {
				if n := len(bursts); n > 0 && i-bursts[n-1].to <= 4 {
					bursts[n-1].to = i
				} else {
					bursts = append(bursts, burst{i - 1, i})
				}
			}
		}
		// Done once a real burst has been over for 3 s.
		if b, cpu := largest(); cpu >= 50*time.Millisecond && now.Sub(pts[b.to].at) > 3*time.Second {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, p := range pts {
		if p.at.Sub(start) >= startup {
			r.StartCPUms = ms(p.cpu)
			break
		}
	}
	if b, cpu := largest(); cpu >= 20*time.Millisecond {
		r.Seen = true
		r.TickCPUms = ms(cpu)
		r.TickWallMs = ms(pts[b.to].at.Sub(pts[b.from].at))
		r.TickAtS = round(pts[b.from].at.Sub(start).Seconds(), 1)
	}
	r.RSSAfterTick, _ = readMem(pid)
	e.logf("P4: after reload: start %.0f ms CPU; first tick %.0f ms CPU over %.0f ms; RSS %.1f MB",
		r.StartCPUms, r.TickCPUms, r.TickWallMs, r.RSSAfterTick.RSSMB)
	// The configs still answer after the reload.
	if err := e.c.do(ctx, http.MethodGet, brokerMount+"/creds/"+p4Name(0), nil, false).check("creds after reload"); err != nil {
		return nil, err
	}
	return r, nil
}

type errCount struct {
	n    int
	last error
}

// parallel runs f(0..n-1) on workers goroutines.
func parallel(ctx context.Context, n, workers int, f func(i int) error) errCount {
	var next atomic.Int64
	var mu sync.Mutex
	var ec errCount
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					ec.n++
					ec.last = err
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return ec
}

func sleepCtx(ctx context.Context, d time.Duration) {
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
}

// goBench is one line of `go test -bench` output.
type goBench struct {
	Name        string  `json:"name"`
	NsPerOp     float64 `json:"ns_per_op"`
	BytesPerOp  float64 `json:"bytes_per_op"`
	AllocsPerOp float64 `json:"allocs_per_op"`
	// ValidationsPerOp is how many configs each tick validated (the
	// benchmark's own metric): 0 and 100 for nothing due and 1% due.
	ValidationsPerOp float64 `json:"validations_per_op"`
}

// periodicBenchName is the in-process benchmark of one real tick: Vault's
// rollback request through the framework, the backend's PeriodicFunc over
// 10,000 configs on in-memory storage with nothing due and with 1% due
// (backend/periodic_bench_test.go).
const periodicBenchName = "BenchmarkPeriodicFunc"

// periodicBench runs periodicBenchName: the plugin has no external trigger
// for a tick, and in-process the tick's own cost is not lost among Vault's.
func periodicBench(ctx context.Context) ([]goBench, error) {
	cmd := exec.CommandContext(ctx, "go", "test", "./backend/", "-run", "^$", "-bench", "^"+periodicBenchName+"$", "-benchmem", "-count", "1")
	cmd.Dir = vaulttest.RepoRoot()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("go test -bench %s: %w\n%s", periodicBenchName, err, out)
	}
	res := parseGoBench(out)
	if len(res) == 0 {
		return nil, fmt.Errorf("no benchmark lines in:\n%s", out)
	}
	return res, nil
}

// tickBench returns the in-process real tick with nothing due and with 1%
// due (only periodicBenchName counts: an older run's heap-only benchmark
// measured no tick).
func (p *p4Result) tickBench() (none, some goBench, ok bool) {
	var n, s bool
	for _, b := range p.PeriodicBench {
		if !strings.HasPrefix(b.Name, periodicBenchName+"/") {
			continue
		}
		switch {
		case strings.Contains(b.Name, "/due=0"):
			none, n = b, true
		case strings.Contains(b.Name, "/due=100"):
			some, s = b, true
		}
	}
	return none, some, n && s
}

// parseGoBench reads the result lines of `go test -bench` output: a name,
// the iteration count, then value-unit pairs in any order (custom metrics
// come between ns/op and B/op).
func parseGoBench(out []byte) []goBench {
	var res []goBench
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || !strings.HasPrefix(f[0], "Benchmark") {
			continue
		}
		if _, err := strconv.Atoi(f[1]); err != nil {
			continue
		}
		b := goBench{Name: f[0]}
		for i := 2; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				break
			}
			switch f[i+1] {
			case "ns/op":
				b.NsPerOp = v
			case "B/op":
				b.BytesPerOp = v
			case "allocs/op":
				b.AllocsPerOp = v
			case "validations/op":
				b.ValidationsPerOp = v
			}
		}
		if b.NsPerOp > 0 {
			res = append(res, b)
		}
	}
	return res
}
