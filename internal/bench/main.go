// Command bench measures the broker plugin on the real Vault (a dev server
// from bin/vault), with the plugin registered through the catalog and the
// broker sandbox in this process, against two floors measured in the same
// run: Vault's built-in kv-v2 and HashiCorp's kv engine as an external
// plugin (built by scripts/build-kvplugin.sh). See docs/performance.md.
//
//	go run ./internal/bench            # the full run (make bench), ~16 min
//	go run ./internal/bench -quick     # the CI guard (make bench-quick), <2 min
//	go run ./internal/bench -only roles -strict=false   # one part, for dev runs
//
// It prints a table and writes a JSON result (date, machine, commit, every
// number) to -out; a full run of a clean tree also to -latest (the kept run,
// docs/bench/latest.json). Exit status 1: a quick-mode guard failed or a
// full-run target was missed (-strict=false: only reported); 2: the run
// itself failed.
//
//	go run ./internal/bench -readme docs/bench/latest.json
//
// runs nothing: it rewrites README.md's performance section (between its
// bench markers) from that JSON, and refuses a run that is not a full run
// of a clean tree at a known commit (make bench-readme).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

type options struct {
	quick      bool
	strict     bool
	out        string
	latest     string
	kvBin      string
	keep       bool
	skip       map[string]bool
	p1Clients  []int
	p1Rounds   int
	p1Slice    time.Duration
	coldN      int
	steady     time.Duration
	steadyRate int
	p3         time.Duration
	configs    int
	ticks      bool
	leaseTTL   time.Duration
	roles      rolesConfig
}

// phases are the parts of a full run, in the order they run (-skip, -only).
var phases = []string{"p1", "p2cold", "roles", "p2steady", "p4", "p3"}

func main() {
	var o options
	var skip, only, clients string
	flag.BoolVar(&o.quick, "quick", false, "the cheap CI variant: P1 at 16 clients, the 1,000 cold reads and creds/<role> vs creds/<config>, with regression guards")
	flag.BoolVar(&o.strict, "strict", true, "full run: exit 1 when a target is missed (false: report it only, for dev runs)")
	flag.StringVar(&o.out, "out", "bench-results", "directory for the JSON result, or a path ending in .json")
	flag.StringVar(&o.latest, "latest", "", "full run of a clean tree: also write the JSON result here (make bench: docs/bench/latest.json)")
	readme := flag.String("readme", "", "run nothing: rewrite README.md's performance section from this JSON result (make bench-readme)")
	flag.StringVar(&o.kvBin, "kvplugin", filepath.Join(vaulttest.RepoRoot(), "bin", kvPluginName), "the external kv plugin binary (scripts/build-kvplugin.sh)")
	flag.BoolVar(&o.keep, "keep", false, "keep the scratch directory (Vault log, plugin dir)")
	flag.StringVar(&skip, "skip", "", "phases to skip, comma-separated ("+strings.Join(phases, ",")+")")
	flag.StringVar(&only, "only", "", "run only these phases, comma-separated (the others are skipped; e.g. -only roles)")
	flag.StringVar(&clients, "p1-clients", "1,16,64", "P1 client counts")
	flag.IntVar(&o.p1Rounds, "p1-rounds", 6, "P1 rounds (each target gets one slice per round)")
	flag.DurationVar(&o.p1Slice, "p1-slice", 1500*time.Millisecond, "P1 slice length")
	flag.IntVar(&o.coldN, "cold", 1000, "P2 concurrent cold readers")
	flag.DurationVar(&o.steady, "steady", 5*time.Minute, "P2 steady run length (the issue asks for 5m; shorten for dev runs)")
	flag.IntVar(&o.steadyRate, "rate", 200, "P2 steady reads a second")
	flag.DurationVar(&o.p3, "p3", 2*time.Minute, "P3 run length")
	flag.IntVar(&o.configs, "configs", 10000, "P4 configs")
	flag.DurationVar(&o.leaseTTL, "lease-ttl", 0, "P2 steady and P3: the configs' ttl (0: unset, leases end with their token)")
	flag.IntVar(&o.roles.Rounds, "roles-rounds", 16, "roles: rounds of creds/<role> and creds/<config> reads (each gets one slice per round)")
	flag.DurationVar(&o.roles.Slice, "roles-slice", 1500*time.Millisecond, "roles: slice length")
	flag.IntVar(&o.roles.Roles, "roles", 1000, "roles: roles written over -roles-configs configs for the RSS measurement")
	flag.IntVar(&o.roles.Configs, "roles-configs", 10, "roles: configs the roles are spread over (half Finam, half ALOR)")
	flag.IntVar(&o.roles.ColdReaders, "roles-cold", 1000, "roles: concurrent cold readers of one narrowed ALOR role")
	flag.BoolVar(&o.ticks, "ticks", true, "P4: wait for Vault's periodic ticks (idle, 1% due, after reload): ~3.5 min")
	flag.Parse()
	if *readme != "" {
		if err := updateREADME(*readme, filepath.Join(vaulttest.RepoRoot(), "README.md")); err != nil {
			fatal(err)
		}
		return
	}

	o.skip = map[string]bool{}
	for _, s := range strings.Split(skip, ",") {
		if s = strings.TrimSpace(s); s != "" {
			if !slices.Contains(phases, s) {
				fatal(fmt.Errorf("-skip: no phase %q (phases: %s)", s, strings.Join(phases, ",")))
			}
			o.skip[s] = true
		}
	}
	if only != "" {
		keep := map[string]bool{}
		for _, s := range strings.Split(only, ",") {
			if s = strings.TrimSpace(s); s != "" {
				if !slices.Contains(phases, s) {
					fatal(fmt.Errorf("-only: no phase %q (phases: %s)", s, strings.Join(phases, ",")))
				}
				keep[s] = true
			}
		}
		for _, p := range phases {
			if !keep[p] {
				o.skip[p] = true
			}
		}
	}
	o.roles.Clients, o.roles.Warm, o.roles.BrokerLatency = 16, time.Second, 300*time.Millisecond
	for _, s := range strings.Split(clients, ",") {
		var n int
		if _, err := fmt.Sscan(strings.TrimSpace(s), &n); err != nil || n < 1 {
			fatal(fmt.Errorf("bad -p1-clients %q", clients))
		}
		o.p1Clients = append(o.p1Clients, n)
	}
	if o.quick {
		o.p1Clients, o.p1Rounds, o.p1Slice = []int{16}, 3, time.Second
		// Roles: only the role-vs-config ratio (about 10 s), as a loose
		// guard. An even number of rounds: each target goes first in half
		// of them, so the slow drift of a run (Vault's lease table grows
		// with every read) falls on both alike.
		o.roles.Rounds, o.roles.Slice, o.roles.Roles, o.roles.ColdReaders = 4, time.Second, 0, 0
		for _, p := range []string{"p2steady", "p3", "p4"} {
			o.skip[p] = true
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	r, err := run(ctx, o)
	if err != nil {
		fatal(err)
	}
	path := o.out
	if !strings.HasSuffix(path, ".json") {
		if err := os.MkdirAll(path, 0o755); err != nil {
			fatal(err)
		}
		path = filepath.Join(path, fmt.Sprintf("bench-%s-%s.json", r.Mode, time.Now().UTC().Format("20060102T150405Z")))
	}
	if err := writeJSON(path, r); err != nil {
		fatal(err)
	}
	r.print(os.Stdout)
	fmt.Printf("\nresult: %s (%.0fs)\n", path, r.DurationS)
	if o.latest != "" {
		// Only a run that could back the README's numbers replaces the kept
		// one: a full run of a committed tree (see keepable).
		if err := r.keepable(); err != nil {
			fmt.Fprintf(os.Stderr, "bench: not written to %s: %v\n", o.latest, err)
		} else if err := writeJSON(o.latest, r); err != nil {
			fatal(err)
		} else {
			fmt.Printf("kept as %s (make bench-readme puts it in README.md)\n", o.latest)
		}
	}
	if !r.Passed && (o.quick || o.strict) {
		fmt.Fprintf(os.Stderr, "bench: %d target(s) missed\n", r.FailedCount)
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(2)
}

func run(ctx context.Context, o options) (*report, error) {
	began := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(began).Seconds(), fmt.Sprintf(format, args...))
	}
	r := &report{
		Schema: 1, Mode: map[bool]string{true: "quick", false: "full"}[o.quick],
		Date:    began.UTC().Format(time.RFC3339),
		Machine: readMachine(),
		Git:     readGit(),
		Plugin:  pluginVersion,
		Load:    map[string]phaseLoad{},
		Notes: []string{
			"Vault dev server (in-memory storage, no audit device) from bin/vault; the bench client and the broker sandbox run in the bench process on the same machine, so all three share its CPUs.",
			"Load goes through Vault's HTTP API over keep-alive connections; latency is measured at the client, from sending the request to reading the whole answer.",
			"kvext is HashiCorp's kv engine as an external plugin mounted as a plain kv (Vault allows version 2 only for its built-in kv). Vault registers a lease for every kvext read (lease_id kvext/..., 768h, not renewable): it treats only its built-in kv as non-leasing. So kvext pays the gRPC hop, a storage read through the plugin's storage gRPC channel, and a lease; a cached creds read pays the hop and a lease, no storage.",
			"Both kv mounts hold exactly the data a creds read returns, so the three targets answer the same payload.",
		},
	}
	e, err := setup(ctx, o.kvBin, o.keep, logf)
	if err != nil {
		return nil, err
	}
	defer e.close()
	r.Vault = e.vaultVer
	r.KVPlugin = kvPlugin{Module: kvModule, Version: e.kvVersion, SHA256: e.kvSHA, Mount: kvExtMount}

	if !o.skip["p1"] {
		m := e.meter()
		logf("P1: cached reads at %v clients, %d rounds of %s slices", o.p1Clients, o.p1Rounds, o.p1Slice)
		if r.P1, err = runP1(ctx, e, p1Config{Clients: o.p1Clients, Rounds: o.p1Rounds, Slice: o.p1Slice, Warm: time.Second}); err != nil {
			return nil, fmt.Errorf("P1: %w", err)
		}
		r.Load["p1"] = m.read()
	}
	if !o.skip["p2cold"] {
		m := e.meter()
		logf("P2: %d concurrent cold reads", o.coldN)
		if r.P2Cold, err = runP2Cold(ctx, e, o.coldN, 300*time.Millisecond); err != nil {
			return nil, fmt.Errorf("P2 cold: %w", err)
		}
		r.Load["p2_cold"] = m.read()
	}
	// Roles before the long phases: P2 steady's and P3's short leases are
	// revoked through the plugin as they expire, and P4's 10,000 configs
	// would swamp the RSS the roles add.
	if !o.skip["roles"] {
		m := e.meter()
		c := o.roles
		logf("roles: creds/<role> vs creds/<config> at %d clients, %d rounds of %s; %d roles over %d configs; %d cold reads of a narrowed role",
			c.Clients, c.Rounds, c.Slice, c.Roles, c.Configs, c.ColdReaders)
		if r.Roles, err = runRoles(ctx, e, c); err != nil {
			return nil, fmt.Errorf("roles: %w", err)
		}
		r.Load["roles"] = m.read()
	}
	if !o.skip["p2steady"] {
		m := e.meter()
		logf("P2: %d reads/s for %s, 60s tokens", o.steadyRate, o.steady)
		if r.P2Steady, err = runP2Steady(ctx, e, o.steadyRate, 10*time.Second, o.steady, 60*time.Second, 500*time.Millisecond, 250*time.Millisecond, o.leaseTTL); err != nil {
			return nil, fmt.Errorf("P2 steady: %w", err)
		}
		r.Load["p2_steady"] = m.read()
	}
	// P4 before P3: P3's short leases expire (and are revoked through the
	// plugin) for a minute after it, which would blur P4's idle plugin.
	if !o.skip["p4"] {
		m := e.meter()
		logf("P4: %d configs", o.configs)
		if r.P4, err = runP4(ctx, e, p4Config{Configs: o.configs, Concurrency: 32, Ticks: o.ticks}); err != nil {
			return nil, fmt.Errorf("P4: %w", err)
		}
		r.Load["p4"] = m.read()
	}
	if !o.skip["p3"] {
		m := e.meter()
		logf("P3: broker latency 1s, 60s tokens, 16 clients for %s", o.p3)
		if r.P3, err = runP3(ctx, e, 16, o.p3, 2*time.Second, 60*time.Second, time.Second, 250*time.Millisecond, o.leaseTTL); err != nil {
			return nil, fmt.Errorf("P3: %w", err)
		}
		r.Load["p3"] = m.read()
	}
	e.close()
	if r.P4 != nil {
		// After Vault is gone, so nothing competes with it for the CPUs.
		logf("P4: in-process %s", periodicBenchName)
		if r.P4.PeriodicBench, err = periodicBench(ctx); err != nil {
			r.P4.PeriodicBenchE = err.Error()
			logf("%v", err)
		}
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	r.Git.stillAt(readGit())
	judge(r, o)
	r.DurationS = round(time.Since(began).Seconds(), 1)
	return r, nil
}

// quickP50Bound is the CI guard on creds p50 / kvext p50 at 16 clients. A
// cached creds read does less than a kvext read (no storage round trip
// back into Vault), so it must not be slower: at 1.2 the guard fails when
// the cached path costs a fifth more than the floor. Nine runs of make
// bench-quick on a shared 2-core machine, other processes using 0.2 to 1.2
// cores, measured 0.57 to 0.78 (single rounds 0.43 to 0.93): the bound is
// half again the worst of them.
const quickP50Bound = 1.2

// Role targets (issue 21): a cached creds/<role> read costs what a cached
// creds/<config> read costs, 1,000 roles add little memory, and cold readers
// of a narrowed role make one mint.
const (
	roleP50Bound = 1.05
	// quickRoleP50Bound is the CI guard on the same ratio (4 rounds of 1 s):
	// the two reads do nearly the same work, so the guard is loose enough
	// for a shared machine's noise (a short run's ratio moves by a tenth or
	// more) and trips only when a role read costs about a third more (a
	// storage read or a lock on its path, a second cache).
	quickRoleP50Bound = 1.5
	roleRSSBoundMB    = 20.0
)

// roleRatioTarget is the role-vs-config target (bound: full or quick).
func roleRatioTarget(p *roleRatio, bound float64, want string) target {
	return target{Phase: "roles", Name: fmt.Sprintf("creds/<role> p50 vs creds/<config> p50, %d clients", p.Clients), Want: want,
		Got: fmt.Sprintf("%.2fx (%.3f / %.3f ms; p99 %.2fx, %.3f / %.3f ms; rounds %v), shared token %v, %d mint(s), %d errors",
			p.P50RoleOverC, p.RoleStats.P50ms, p.ConfigStats.P50ms, p.P99RoleOverC, p.RoleStats.P99ms, p.ConfigStats.P99ms,
			p.P50ByRound, p.SameToken, p.Mints, p.RoleStats.Errors+p.ConfigStats.Errors),
		Value: p.P50RoleOverC, Bound: bound,
		Pass: p.P50RoleOverC > 0 && p.P50RoleOverC <= bound && p.SameToken && p.Mints == 0 && p.RoleStats.Errors+p.ConfigStats.Errors == 0}
}

// judge records the targets (full run) or the CI guards (quick).
func judge(r *report, o options) {
	if o.quick {
		if c := r.P2Cold; c != nil {
			r.add(target{Phase: "P2", Name: fmt.Sprintf("%d concurrent cold reads", c.Readers), Want: "exactly 1 upstream mint, all ok, one token",
				Got:   fmt.Sprintf("%d mint(s), %d ok, %d token(s)", c.Mints, c.OK, c.DistinctTokens),
				Value: float64(c.Mints), Bound: 1, Pass: c.Mints == 1 && c.OK == c.Readers && c.DistinctTokens == 1})
		}
		if lv := r.P1.level(16); lv != nil {
			c, x := lv.Targets["creds"], lv.Targets["kvext"]
			r.add(target{Phase: "P1", Name: "creds p50 vs external kv p50, 16 clients", Want: fmt.Sprintf("<= %.1fx (regression guard)", quickP50Bound),
				Got: fmt.Sprintf("%.2fx (%.3f / %.3f ms; rounds %v), %d errors", lv.P50CredsOverKVExt, c.P50ms, x.P50ms,
					lv.P50CredsOverKVExtByRound, c.Errors+x.Errors),
				Value: lv.P50CredsOverKVExt, Bound: quickP50Bound, Pass: lv.P50CredsOverKVExt <= quickP50Bound && c.Errors == 0})
		}
		if p := r.Roles; p != nil && p.Ratio != nil {
			r.add(roleRatioTarget(p.Ratio, quickRoleP50Bound, fmt.Sprintf("<= %.1fx (regression guard)", quickRoleP50Bound)))
		}
		r.finish()
		return
	}
	if lv := r.P1.level(16); lv != nil {
		c, x := lv.Targets["creds"], lv.Targets["kvext"]
		r.add(target{Phase: "P1", Name: "creds p50 vs external kv p50, 16 clients", Want: "<= 0.8x",
			Got:   fmt.Sprintf("%.2fx (%.3f / %.3f ms)", lv.P50CredsOverKVExt, c.P50ms, x.P50ms),
			Value: lv.P50CredsOverKVExt, Bound: 0.8, Pass: lv.P50CredsOverKVExt <= 0.8 && c.Errors == 0})
	}
	if c := r.P2Cold; c != nil {
		r.add(target{Phase: "P2", Name: fmt.Sprintf("%d concurrent cold reads", c.Readers), Want: "exactly 1 upstream mint",
			Got:   fmt.Sprintf("%d mint(s), %d ok, %d token(s)", c.Mints, c.OK, c.DistinctTokens),
			Value: float64(c.Mints), Bound: 1, Pass: c.Mints == 1 && c.OK == c.Readers && c.DistinctTokens == 1})
	}
	if p := r.Roles; p != nil {
		if p.Ratio != nil {
			r.add(roleRatioTarget(p.Ratio, roleP50Bound, fmt.Sprintf("<= %.2fx", roleP50Bound)))
		}
		if m := p.Memory; m != nil {
			r.add(target{Phase: "roles", Name: fmt.Sprintf("plugin RSS added by %s roles over %d configs", thousands(m.Roles), m.Configs),
				Want: fmt.Sprintf("<= %.0f MB", roleRSSBoundMB),
				Got: fmt.Sprintf("%+.1f MB (%.1f -> %.1f MB, %.1f KB a role), %d errors",
					m.AddedMB, m.RSSBefore.RSSMB, m.RSSAfter.RSSMB, m.PerRoleKB, m.Errors),
				Value: m.AddedMB, Bound: roleRSSBoundMB, Pass: m.AddedMB <= roleRSSBoundMB && m.Errors == 0})
		}
		if c := p.Cold; c != nil {
			r.add(target{Phase: "roles", Name: fmt.Sprintf("%s cold concurrent reads of one narrowed role", thousands(c.Readers)),
				Want:  "exactly 1 upstream mint, all ok, one token narrowed to the role",
				Got:   fmt.Sprintf("%d mint(s), %d ok, %d token(s) reaching %q", c.Mints, c.OK, c.DistinctTokens, c.Portfolios),
				Value: float64(c.Mints), Bound: 1,
				Pass: c.Mints == 1 && c.OK == c.Readers && c.DistinctTokens == 1 && c.Narrowed})
		}
	}
	if s := r.P2Steady; s != nil {
		r.add(target{Phase: "P2", Name: fmt.Sprintf("mints in %.0fs at %d reads/s, %.0fs tokens", s.DurationS, s.Rate, s.TokenLifetimeS),
			Want: fmt.Sprintf("<= %.1f (one per half lifetime + 1)", s.MintBound), Got: fmt.Sprint(s.Mints),
			Value: float64(s.Mints), Bound: s.MintBound, Pass: float64(s.Mints) <= s.MintBound})
		r.add(target{Phase: "P2", Name: "reads that waited on the broker after warm-up",
			Want: fmt.Sprintf("0 (no read over %.0f ms during a mint, %.0f ms broker)", s.SlowThresholdMs, s.BrokerLatencyMs),
			Got: fmt.Sprintf("%d of %d, %d errors (all reads over %.0f ms: %d, %d of them at a token expiry)",
				s.WaitedOnBroker, s.Latency.N, s.Latency.Errors, s.SlowThresholdMs, s.SlowReads, s.AtTokenExpiry),
			Value: float64(s.WaitedOnBroker), Bound: 0, Pass: s.WaitedOnBroker == 0 && s.Latency.Errors == 0})
	}
	if p := r.P3; p != nil {
		r.add(target{Phase: "P3", Name: "warm creds p99 vs external kv p99, 1 s broker, refreshing", Want: "<= 1.2x",
			Got:   fmt.Sprintf("%.2fx (%.3f / %.3f ms), %d refreshes", p.P99CredsOverKV, p.Creds.P99ms, p.KVExt.P99ms, len(p.RefreshesAtS)),
			Value: p.P99CredsOverKV, Bound: 1.2, Pass: p.P99CredsOverKV <= 1.2 && len(p.RefreshesAtS) > 0 && p.Creds.Errors == 0})
	}
	if p := r.P4; p != nil {
		r.add(target{Phase: "P4", Name: fmt.Sprintf("plugin RSS with %d warm configs", p.Configs), Want: "<= 100 MB",
			Got:   fmt.Sprintf("%.1f MB (%.1f MB once idle connections expired)", p.RSSWarm.RSSMB, p.RSSIdle.RSSMB),
			Value: p.RSSWarm.RSSMB, Bound: 100, Pass: p.RSSWarm.RSSMB <= 100 && p.WarmErrors == 0})
		if none, some, ok := p.tickBench(); ok {
			// Proportional: with nothing due a tick is a look at the head of
			// the schedule (a walk over 10,000 configs would cost over
			// 100 µs), and with 1% due it costs the 100 validations.
			r.add(target{Phase: "P4", Name: "real periodic tick over 10,000 configs (in-process)", Want: "proportional to what is due: nothing due < 10 µs and < 1/100 of 1% due",
				Got:   fmt.Sprintf("nothing due %.0f ns, 1%% due %.0f µs (%.0f validations a tick)", none.NsPerOp, some.NsPerOp/1000, some.ValidationsPerOp),
				Value: none.NsPerOp, Bound: 10000,
				Pass: none.NsPerOp < 10000 && none.NsPerOp < some.NsPerOp/100 && none.ValidationsPerOp == 0 && some.ValidationsPerOp == 100})
		} else {
			r.add(target{Phase: "P4", Name: "real periodic tick over 10,000 configs (in-process)", Want: "measured",
				Got: "no " + periodicBenchName + " result: " + p.PeriodicBenchE})
		}
	}
	r.finish()
}
