package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

func TestParseGoBenchReadsCustomMetrics(t *testing.T) {
	out := []byte(`goos: linux
BenchmarkPeriodicFunc/configs=10000/due=0-2         	 6947056	       167.6 ns/op	         0 validations/op	      32 B/op	       1 allocs/op
2026-11-30T23:48:44.532Z [INFO]  storage migrated: from=1 to=2
BenchmarkPeriodicFunc/configs=10000/due=100-2       	     519	   2259522 ns/op	       100.0 validations/op	  374503 B/op	    6703 allocs/op
PASS
`)
	got := parseGoBench(out)
	if len(got) != 2 {
		t.Fatalf("parsed %d lines, want 2: %+v", len(got), got)
	}
	p := &p4Result{PeriodicBench: got}
	none, some, ok := p.tickBench()
	if !ok || none.NsPerOp != 167.6 || none.ValidationsPerOp != 0 || none.AllocsPerOp != 1 ||
		some.NsPerOp != 2259522 || some.ValidationsPerOp != 100 || some.BytesPerOp != 374503 || some.AllocsPerOp != 6703 {
		t.Fatalf("tick results: %+v %+v %v", none, some, ok)
	}
}

func TestHeapOnlyBenchmarkIsNoTick(t *testing.T) {
	p := &p4Result{PeriodicBench: []goBench{
		{Name: "BenchmarkPeriodicTick/configs=10000/due=0-2", NsPerOp: 218},
		{Name: "BenchmarkPeriodicTick/configs=10000/due=100-2", NsPerOp: 36300},
	}}
	if _, _, ok := p.tickBench(); ok {
		t.Fatal("the heap-pop benchmark was taken for a real tick")
	}
}

// The kept run from before this check (a dirty tree, the heap-only
// benchmark) must not reach the README.
func TestDirtyRunCannotBackTheREADME(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(vaulttest.RepoRoot(), "docs", "bench", "latest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var r report
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if !r.Git.Dirty {
		t.Skip("the kept run is clean")
	}
	err = r.keepable()
	if err == nil || !strings.Contains(err.Error(), "dirty") {
		t.Fatalf("keepable: %v, want a refusal naming the dirty tree", err)
	}
}

func cleanReport() *report {
	st := func(p50, p99 float64) stats { return stats{P50ms: p50, P99ms: p99} }
	lv := func(n int, c, x float64) p1Level {
		return p1Level{Clients: n, P50CredsOverKVExt: c / x, Targets: map[string]stats{
			"creds": st(c, 10*c), "kvext": st(x, 10*x), "kvv2": st(c/3, 10*c/3)}}
	}
	return &report{
		Mode: "full", Date: "2026-12-01T10:00:00Z", Vault: "Vault v1.21.0, built 2025-11-22T03:11:38Z (cgo)",
		Machine: machine{CPU: "AMD EPYC", CPUs: 2},
		Git:     gitInfo{Commit: "0123456789abcdef0123456789abcdef01234567"},
		Load:    map[string]phaseLoad{"p1": {OtherCores: 0.2}},
		P1:      &p1Result{Levels: []p1Level{lv(1, 0.6, 0.9), lv(16, 4.4, 7.2), lv(64, 19.8, 28.9)}},
		P2Cold:  &p2ColdResult{Readers: 1000, Mints: 1, OK: 1000, DistinctTokens: 1},
		P2Steady: &p2SteadyResult{Rate: 200, DurationS: 300, TokenLifetimeS: 60, Mints: 7, MintBound: 8.5,
			Latency: stats{P99ms: 117, MaxMs: 522}},
		Roles: &rolesResult{
			Ratio:  &roleRatio{Clients: 16, P50RoleOverC: 1.01, P99RoleOverC: 0.97},
			Memory: &roleMemory{Roles: 1000, Configs: 10, AddedMB: 3.2},
			Cold:   &roleCold{Readers: 1000, Mints: 1},
		},
		P3: &p3Result{BrokerLatencyMs: 1000, RefreshesAtS: []float64{38, 79, 120}, P99CredsOverKV: 0.76},
		P4: &p4Result{Configs: 10000, RSSWarm: procMem{RSSMB: 104.2}, FDsWarm: 32, PeriodicBench: []goBench{
			{Name: "BenchmarkPeriodicFunc/configs=10000/due=0-2", NsPerOp: 167.6, AllocsPerOp: 1},
			{Name: "BenchmarkPeriodicFunc/configs=10000/due=100-2", NsPerOp: 2259522, ValidationsPerOp: 100, AllocsPerOp: 6703},
		}},
		Targets: []target{{Phase: "P1", Name: "x", Pass: true}, {Phase: "P4", Name: "plugin RSS", Want: "<= 200 MB", Got: "250 MB"}},
	}
}

func TestREADMESectionComesFromTheRun(t *testing.T) {
	r := cleanReport()
	if err := r.keepable(); err != nil {
		t.Fatal(err)
	}
	sec := r.readmeSection()
	for _, want := range []string{
		"commit `0123456789ab`", "Vault v1.21.0", "| 16 | 4.4 / 44.0 | 7.2 / 72.0 | 1.5 / 14.7 | 0.61 |",
		"1,000 concurrent cold reads: 1 upstream mint(s), 1,000 answered with 1 token(s)", "5 minutes at 200 reads/s", "7 mints (bound 8.5)",
		"10,000 configs, all warm: 104 MB", "168 ns with\n  nothing due and 2.26 ms with 1% due (100 validations, 6,703 allocations)",
		"(2026-12-01, Vault v1.21.0, commit",
		"a cached `creds/<role>` read at 16 clients costs 1.01x", "1,000 roles over 10 configs add 3.2 MB", "narrowed ALOR role: 1 upstream mint(s)",
		"1 of 2 targets of docs/performance.md missed", "P4 plugin RSS: want <= 200 MB, got 250 MB",
	} {
		if !strings.Contains(sec, want) {
			t.Errorf("section lacks %q:\n%s", want, sec)
		}
	}

	doc := []byte("# x\n\n## Performance\n\n" + readmeBegin + "\nold numbers\n" + readmeEnd + "\n\n## Next\n")
	out, err := replaceSection(doc, sec)
	if err != nil {
		t.Fatal(err)
	}
	if s := string(out); strings.Contains(s, "old numbers") || !strings.Contains(s, sec+readmeEnd+"\n\n## Next\n") ||
		!strings.HasPrefix(s, "# x\n\n## Performance\n\n"+readmeBegin+"\n") {
		t.Fatalf("replaced:\n%s", out)
	}
	if _, err := replaceSection([]byte("no markers"), sec); err == nil {
		t.Fatal("a README without markers was accepted")
	}

	r.Git.Dirty, r.Git.DirtyFiles = true, []string{"backend/x.go"}
	if err := r.keepable(); err == nil || !strings.Contains(err.Error(), "backend/x.go") {
		t.Fatalf("a dirty run: %v", err)
	}
	r.Git.Dirty, r.Mode = false, "quick"
	if err := r.keepable(); err == nil {
		t.Fatal("a quick run was keepable")
	}
	r.Mode, r.Roles.Memory = "full", nil
	if err := r.keepable(); err == nil || !strings.Contains(err.Error(), "roles") {
		t.Fatalf("a run without the roles' RSS part: %v", err)
	}
}

func TestStillAtMarksAMovedTree(t *testing.T) {
	g := gitInfo{Commit: "aaaa"}
	g.stillAt(gitInfo{Commit: "aaaa"})
	if g.Dirty {
		t.Fatal("an unchanged tree marked dirty")
	}
	g.stillAt(gitInfo{Commit: "aaaa", DirtyFiles: []string{"?? backend/new.go"}})
	if !g.Dirty || len(g.DirtyFiles) != 1 {
		t.Fatalf("a file added during the run: %+v", g)
	}
	g = gitInfo{Commit: "aaaa"}
	g.stillAt(gitInfo{Commit: "bbbb"})
	if !g.Dirty {
		t.Fatal("a commit during the run was not noticed")
	}
}
