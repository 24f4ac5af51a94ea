package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
)

// report is the machine-readable result (docs/bench/latest.json is one).
type report struct {
	Schema    int      `json:"schema"`
	Mode      string   `json:"mode"`
	Date      string   `json:"date"`
	DurationS float64  `json:"duration_s"`
	Machine   machine  `json:"machine"`
	Git       gitInfo  `json:"git"`
	Vault     string   `json:"vault_version"`
	Plugin    string   `json:"plugin_version"`
	KVPlugin  kvPlugin `json:"kv_plugin"`
	Notes     []string `json:"notes"`
	// Load is, per phase, how busy the machine was: the bench's own
	// processes and everything else (other work on a shared machine).
	Load        map[string]phaseLoad `json:"machine_load"`
	P1          *p1Result            `json:"p1,omitempty"`
	P2Cold      *p2ColdResult        `json:"p2_cold,omitempty"`
	Roles       *rolesResult         `json:"roles,omitempty"`
	P2Steady    *p2SteadyResult      `json:"p2_steady,omitempty"`
	P3          *p3Result            `json:"p3,omitempty"`
	P4          *p4Result            `json:"p4,omitempty"`
	Targets     []target             `json:"targets"`
	Passed      bool                 `json:"all_passed"`
	FailedCount int                  `json:"failed"`
}

type kvPlugin struct {
	Module  string `json:"module"`
	Version string `json:"version"`
	SHA256  string `json:"sha256"`
	Mount   string `json:"mount"`
}

type machine struct {
	Hostname string  `json:"hostname"`
	OS       string  `json:"os"`
	Kernel   string  `json:"kernel"`
	CPU      string  `json:"cpu"`
	CPUs     int     `json:"cpus"`
	MemGB    float64 `json:"mem_gb"`
	Go       string  `json:"go"`
}

// target is one goal of the issue (or, in quick mode, one regression guard).
type target struct {
	Phase string  `json:"phase"`
	Name  string  `json:"name"`
	Want  string  `json:"want"`
	Got   string  `json:"got"`
	Value float64 `json:"value"`
	Bound float64 `json:"bound"`
	Pass  bool    `json:"pass"`
}

func readMachine() machine {
	m := machine{OS: runtime.GOOS + "/" + runtime.GOARCH, CPUs: runtime.NumCPU(), Go: runtime.Version()}
	m.Hostname, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseFloat(f[1], 64)
				m.MemGB = round(kb/1024/1024, 1)
			}
		}
	}
	return m
}

func (r *report) add(t target) {
	r.Targets = append(r.Targets, t)
}

func (r *report) finish() {
	r.Passed, r.FailedCount = true, 0
	for _, t := range r.Targets {
		if !t.Pass {
			r.Passed = false
			r.FailedCount++
		}
	}
}

func writeJSON(path string, r *report) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// print writes the human table.
func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "\nbroker plugin benchmark (%s) %s\n", r.Mode, r.Date)
	fmt.Fprintf(w, "machine: %s, %d CPUs, %.1f GB, %s; %s; commit %s%s\n",
		r.Machine.CPU, r.Machine.CPUs, r.Machine.MemGB, r.Machine.Kernel, r.Vault, short(r.Git.Commit), map[bool]string{true: " (dirty)"}[r.Git.Dirty])
	fmt.Fprintf(w, "floors: Vault's built-in kv-v2 (%s/), %s %s as an external plugin (%s/)\n\n", kvV2Mount, r.KVPlugin.Module, r.KVPlugin.Version, kvExtMount)

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if r.P1 != nil {
		fmt.Fprintln(w, "P1  cached reads (ms; rps = requests/s while under load)")
		fmt.Fprintln(tw, "clients\ttarget\tp50\tp90\tp99\tmax\trps\terrors\tp50 creds/x\tp99 creds/x\t")
		for _, lv := range r.P1.Levels {
			for _, name := range []string{"creds", "kvext", "kvv2"} {
				s := lv.Targets[name]
				r50, r99 := "", ""
				switch name {
				case "kvext":
					r50, r99 = f2(lv.P50CredsOverKVExt), f2(lv.P99CredsOverKVExt)
				case "kvv2":
					r50, r99 = f2(lv.P50CredsOverKVV2), f2(lv.P99CredsOverKVV2)
				}
				fmt.Fprintf(tw, "%d\t%s\t%.3f\t%.3f\t%.3f\t%.1f\t%.0f\t%d\t%s\t%s\t\n",
					lv.Clients, name, s.P50ms, s.P90ms, s.P99ms, s.MaxMs, s.RPS, s.Errors, r50, r99)
			}
		}
		tw.Flush()
		fmt.Fprintln(w)
	}
	if c := r.P2Cold; c != nil {
		fmt.Fprintf(w, "P2  cold: %d concurrent reads, broker latency %.0f ms: %d upstream mint(s), %d ok, %d distinct token(s), %d waited on the mint, p50 %.1f ms, max %.1f ms\n",
			c.Readers, c.BrokerLatencyMs, c.Mints, c.OK, c.DistinctTokens, c.WaitedOnMint, c.Latency.P50ms, c.Latency.MaxMs)
	}
	if p := r.Roles; p != nil {
		if q := p.Ratio; q != nil {
			fmt.Fprintf(w, "roles  cached creds/<role> (read-only Finam role sharing its config's token) vs creds/<config>, %d clients, %d rounds of %.1fs (ms):\n",
				q.Clients, q.Rounds, q.SliceS)
			tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, "target\tp50\tp90\tp99\tmax\trps\terrors\tp50 role/config\tp99 role/config\t")
			for _, t := range []struct {
				name string
				s    stats
			}{{"creds/<config>", q.ConfigStats}, {"creds/<role>", q.RoleStats}} {
				r50, r99 := "", ""
				if t.name == "creds/<role>" {
					r50, r99 = f2(q.P50RoleOverC), f2(q.P99RoleOverC)
				}
				fmt.Fprintf(tw, "%s\t%.3f\t%.3f\t%.3f\t%.1f\t%.0f\t%d\t%s\t%s\t\n", t.name, t.s.P50ms, t.s.P90ms, t.s.P99ms, t.s.MaxMs, t.s.RPS, t.s.Errors, r50, r99)
			}
			tw.Flush()
			fmt.Fprintf(w, "       p50 role/config by round %v; shared token %v; %d upstream mint(s) during the reads\n", q.P50ByRound, q.SameToken, q.Mints)
		}
		if m := p.Memory; m != nil {
			fmt.Fprintf(w, "roles  %d roles over %d configs (%d Finam, %d ALOR; %d roles narrowed, %d narrowed tokens): written %.0f/s, read once in %.1fs (%d mints, %d errors)\n",
				m.Roles, m.Configs, m.FinamConfigs, m.AlorConfigs, m.NarrowedRoles, m.NarrowedTokens, m.RoleWritesPerS, m.ReadSeconds, m.UpstreamMints, m.Errors)
			fmt.Fprintf(w, "       plugin RSS: %.1f MB before the configs, %.1f MB before the roles, %.1f MB after (%+.1f MB, %.1f KB a role; %d -> %d open fds); Go heap in use %.1f -> %.1f MB\n",
				m.RSSStart.RSSMB, m.RSSBefore.RSSMB, m.RSSAfter.RSSMB, m.AddedMB, m.PerRoleKB, m.FDsBefore, m.FDsAfter, m.HeapBeforeMB, m.HeapAfterMB)
		}
		if c := p.Cold; c != nil {
			fmt.Fprintf(w, "roles  cold: %d concurrent reads of an ALOR role narrowed to %s (config %s), broker latency %.0f ms: %d upstream mint(s), %d ok, %d distinct token(s) reaching %q, p50 %.1f ms, max %.1f ms\n",
				c.Readers, c.RoleAccounts, c.ConfigAccounts, c.BrokerLatencyMs, c.Mints, c.OK, c.DistinctTokens, c.Portfolios, c.Latency.P50ms, c.Latency.MaxMs)
		}
	}
	if s := r.P2Steady; s != nil {
		fmt.Fprintf(w, "P2  steady: %d reads/s for %.0fs, token lifetime %.0fs, broker latency %.0f ms after warm-up:\n", s.Rate, s.DurationS, s.TokenLifetimeS, s.BrokerLatencyMs)
		fmt.Fprintf(w, "    %d reads, %d errors, %d upstream mints (bound %.1f) at %v s; p50 %.2f ms, p99 %.2f ms, p99.9 %.1f ms, max %.1f ms\n",
			s.Latency.N, s.Latency.Errors, s.Mints, s.MintBound, s.MintAtS, s.Latency.P50ms, s.Latency.P99ms, s.Latency.P999ms, s.Latency.MaxMs)
		fmt.Fprintf(w, "    %d reads over %.0f ms: %d during a mint, %d at a token expiry (tokens expire at %v s); sent at %v s\n",
			s.SlowReads, s.SlowThresholdMs, s.WaitedOnBroker, s.AtTokenExpiry, s.TokenExpiriesAtS, s.SlowAtS)
		if c := s.CPU; c != nil {
			fmt.Fprintf(w, "    CPU per 4 s around a token expiry (-1 s to +3 s): Vault %.0f ms, plugin %.0f ms (on average over the run: Vault %.0f ms, plugin %.0f ms)\n",
				c.AtExpiryVaultMs, c.AtExpiryPluginMs, c.AvgVaultMs, c.AvgPluginMs)
		}
	}
	if p := r.P3; p != nil {
		fmt.Fprintf(w, "P3  broker latency %.0f ms, token lifetime %.0fs, %d clients, %.0fs, refreshes at %v s:\n", p.BrokerLatencyMs, p.TokenLifetimeS, p.Clients, p.DurationS, p.RefreshesAtS)
		fmt.Fprintf(w, "    creds p50 %.3f p99 %.3f max %.1f ms | kvext p50 %.3f p99 %.3f max %.1f ms | p99 creds/kvext %.2f\n",
			p.Creds.P50ms, p.Creds.P99ms, p.Creds.MaxMs, p.KVExt.P50ms, p.KVExt.P99ms, p.KVExt.MaxMs, p.P99CredsOverKV)
		fmt.Fprintf(w, "    reads over %.0f ms: creds %d (%d during a refresh, %d at a token expiry; tokens expire at %v s), kvext %d\n",
			p.SlowThresholdMs, p.CredsSlow, p.CredsSlowInMint, p.CredsSlowAtExp, p.TokenExpiriesAtS, p.KVExtSlow)
	}
	if p := r.P4; p != nil {
		fmt.Fprintf(w, "P4  %d configs (%d finam verify=false, %d tinvest): written %.0f/s, warmed %.0f/s (%d mints, %d errors)\n",
			p.Configs, p.Finam, p.TInvest, p.WritesPerS, p.WarmReadsPerS, p.WarmMints, p.WarmErrors)
		fmt.Fprintf(w, "    plugin RSS: %.1f MB before, %.1f MB all warm (%.1f KB/config, %d open fds, %d threads), %.1f MB %.0fs later (%d fds); peak %.1f MB\n",
			p.RSSBefore.RSSMB, p.RSSWarm.RSSMB, p.PerConfigKB, p.FDsWarm, p.ThreadsWarm, p.RSSIdle.RSSMB, p.SecondsToIdle, p.FDsIdle, p.RSSIdle.PeakMB)
		if p.IdleMinute != nil {
			fmt.Fprintf(w, "    idle minute (one tick, nothing due): %.0f ms plugin CPU\n", p.IdleMinute.CPUms)
		}
		if t := p.DueTick; t != nil && t.Seen {
			fmt.Fprintf(w, "    tick with %d due (1%%): %d upstream calls, %.0f ms wall, %.0f ms plugin CPU\n", t.Due, t.UpstreamCalls, t.WallMs, t.CPUms)
		}
		if rl := p.Reload; rl != nil && rl.Seen {
			fmt.Fprintf(w, "    first tick after a plugin reload (loads all configs): %.0f ms plugin CPU over %.0f ms; RSS then %.1f MB\n", rl.TickCPUms, rl.TickWallMs, rl.RSSAfterTick.RSSMB)
		}
		for _, b := range p.PeriodicBench {
			fmt.Fprintf(w, "    in-process %s: %.0f ns/op, %.0f B/op, %.0f allocs/op\n", b.Name, b.NsPerOp, b.BytesPerOp, b.AllocsPerOp)
		}
	}
	if len(r.Load) > 0 {
		fmt.Fprintf(w, "\nmachine load per phase (cores busy; %d CPUs): ", r.Machine.CPUs)
		for _, k := range []string{"p1", "p2_cold", "roles", "p2_steady", "p4", "p3"} {
			if l, ok := r.Load[k]; ok {
				fmt.Fprintf(w, "%s bench %.2f + other %.2f; ", k, l.BenchCores, l.OtherCores)
			}
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "targets")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range r.Targets {
		fmt.Fprintf(tw, "  %s\t%s\t%s\twant %s\tgot %s\n", map[bool]string{true: "PASS", false: "FAIL"}[t.Pass], t.Phase, t.Name, t.Want, t.Got)
	}
	tw.Flush()
}

func f2(f float64) string { return strconv.FormatFloat(f, 'f', 2, 64) }

func short(s string) string {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}
