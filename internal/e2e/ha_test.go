package e2e

import (
	"context"
	"fmt"
	"maps"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// TestHAFailover runs a three-node Vault cluster with integrated storage on
// loopback, the plugin registered once through the (replicated) catalog.
// Under a steady creds load through every node's HTTP API (standbys
// forward), the active node is killed with SIGKILL, its plugin process with
// it. The test asserts that reads resume on the new active node within
// Vault's failover time; that nothing stored is lost (every config reads,
// the ChatApp refresh token rotated before the crash still works: the next
// rotate-root needs no tokens.make); that the failover mints nothing (one
// upstream mint per config in all); that periodic work runs on the active
// node only (a T-Invest config validated every minute costs about one
// GetInfo a minute, not one per node); and that config writes sent to a
// standby are forwarded and stored.
func TestHAFailover(t *testing.T) {
	testStart := time.Now()
	sb := sandbox.New(sandbox.Options{})
	sbSrv := httptest.NewServer(sb)
	defer sbSrv.Close()

	ctx := context.Background()
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c, err := vaulttest.StartCluster(sctx, vaulttest.ClusterOptions{Dir: t.TempDir(), PluginVersion: pluginVersion, Mount: "broker"})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			for _, nd := range c.Nodes {
				t.Logf("--- %s log tail ---\n%s", nd.ID, nd.LogTail(40))
			}
		}
		c.Stop()
	}()
	active, err := c.WaitActive(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var standbys []*vaulttest.Node
	for _, nd := range c.Nodes {
		if nd != active {
			standbys = append(standbys, nd)
		}
	}
	t.Logf("cluster of %d up in %s; active %s, plugin sha256 %s", len(c.Nodes), time.Since(testStart).Round(time.Second), active.ID, c.PluginSHA256[:12])

	call := func(nd *vaulttest.Node, method, path string, body any) *vaulttest.APIResponse {
		t.Helper()
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		r, err := nd.API(ctx, method, path, body)
		if err != nil {
			t.Fatalf("%s %s %s: %v", nd.ID, method, path, err)
		}
		return r
	}
	mustOK := func(nd *vaulttest.Node, method, path string, body any) *vaulttest.APIResponse {
		t.Helper()
		r := call(nd, method, path, body)
		if r.Status != 200 && r.Status != 204 {
			t.Fatalf("%s %s %s: HTTP %d %v", nd.ID, method, path, r.Status, r.Errors)
		}
		return r
	}

	// Configs: written on the active node, and one through a standby.
	mustOK(active, "POST", "broker/config/finam", map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": sbSrv.URL})
	mustOK(standbys[0], "POST", "broker/config/alor", map[string]any{"provider": "alor", "refresh_token": sandbox.AlorRefreshToken, "base_url": sbSrv.URL})
	mustOK(active, "POST", "broker/config/chat", map[string]any{"provider": "chatapp", "email": sandbox.ChatAppEmail,
		"password": sandbox.ChatAppPassword, "app_id": sandbox.ChatAppAppID, "base_url": sbSrv.URL})
	// The pair rotates once before the crash: the stored refresh token is
	// no longer the one tokens.make gave.
	mustOK(active, "POST", "broker/rotate-root/chat", map[string]any{})
	rotatedRTs := sb.ChatAppIssuedRefreshTokens()
	liveRT := rotatedRTs[len(rotatedRTs)-1]
	// Periodic work: a T-Invest token validated every minute, read by no one.
	periodicStart := time.Now()
	mustOK(active, "POST", "broker/config/tbank", map[string]any{"provider": "tinvest", "token": sandbox.TInvestFullToken,
		"base_url": sbSrv.URL + sandbox.TInvestPrefix, "validation_interval": "1m"})
	// A config whose tokens are retired on the active node just before it
	// dies: the new active node must never serve the retired token.
	mustOK(active, "POST", "broker/config/incident", map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": sbSrv.URL})
	retiredTok := mustOK(active, "GET", "broker/creds/incident", nil).Data["access_token"]
	sb.ResetCalls()
	infoTimes := newCallClock()

	// Readers: two per node, through that node's API, over the three minted
	// configs. A standby forwards to the active node.
	configs := []string{"finam", "alor", "chat"}
	for _, name := range configs {
		for _, nd := range c.Nodes {
			mustOK(nd, "GET", "broker/creds/"+name, nil)
		}
	}
	for _, ep := range []string{"POST /v1/sessions", sandbox.AlorRefreshEP, sandbox.ChatAppRefreshEP, sandbox.ChatAppMakeEP} {
		if n := sb.Calls(ep); n != 0 {
			t.Fatalf("warm reads through every node called %s %d times: %v", ep, n, sb.AllCalls())
		}
	}
	load := newReadLoad()
	stopLoad := make(chan struct{})
	var wg sync.WaitGroup
	for _, nd := range c.Nodes {
		for r := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := r; ; i++ {
					select {
					case <-stopLoad:
						return
					default:
					}
					if nd.Killed() {
						return
					}
					name := configs[i%len(configs)]
					rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
					start := time.Now()
					resp, err := nd.API(rctx, "GET", "broker/creds/"+name, nil)
					cancel()
					ok := err == nil && resp.Status == 200 && str(resp.Data["access_token"]) != ""
					if nd.Killed() {
						return // reads of the dead node do not count
					}
					load.record(nd.ID, start, time.Now(), ok, err, resp)
					time.Sleep(150 * time.Millisecond)
				}
			}()
		}
	}
	// Watch GetInfo calls (the periodic validation) as they happen.
	stopWatch := make(chan struct{})
	go func() {
		last := 0
		for {
			select {
			case <-stopWatch:
				return
			case <-time.After(200 * time.Millisecond):
			}
			if n := sb.Calls(sandbox.TInvestGetInfoEP); n > last {
				for range n - last {
					infoTimes.add(time.Now())
				}
				last = n
			}
		}
	}()
	defer close(stopWatch)

	time.Sleep(20 * time.Second)
	before := load.snapshot()
	if before.ok == 0 || before.failed != 0 {
		t.Fatalf("load before the crash: %d ok, %d failed (%v)", before.ok, before.failed, load.firstErrors(3))
	}

	mustOK(active, "POST", "broker/config/incident/retire", map[string]any{})
	// Crash the active node, and its plugin with it.
	old := active
	killAt := time.Now()
	old.Kill()
	for wait := time.Now().Add(5 * time.Second); len(pluginPIDs(old.PluginDir)) != 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(wait) {
			t.Fatalf("plugin processes of the killed node survive: %v", pluginPIDs(old.PluginDir))
		}
	}
	active, err = c.WaitActive(ctx, 60*time.Second)
	if err != nil {
		t.Fatalf("no new active node after killing %s: %v", old.ID, err)
	}
	electedIn := time.Since(killAt)
	// Reads resume: wait until every surviving node has served reads for
	// a few seconds in a row.
	resumed := false
	deadline := killAt.Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if load.allGoodSince(killAt, c.Alive(), 3*time.Second) {
			resumed = true
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(10 * time.Second) // steady load on the new active node
	close(stopLoad)
	wg.Wait()
	fo := load.failover(killAt, c.Alive())
	t.Logf("failover: killed active %s at +%s; %s active after %s; first read served %s after the kill, reads stable from %s; "+
		"%d reads failed after the kill (%d served); before the kill: %d served, 0 failed",
		old.ID, killAt.Sub(testStart).Round(time.Second), active.ID, electedIn.Round(10*time.Millisecond),
		fo.firstOK.Round(10*time.Millisecond), fo.lastFail.Round(10*time.Millisecond), fo.failed, fo.ok, before.ok)
	for _, line := range fo.perNode {
		t.Logf("  %s", line)
	}
	if !resumed {
		t.Fatalf("reads did not resume on every surviving node within 60s of the kill (failed %d): %v", fo.failed, load.firstErrors(5))
	}
	// Vault's failover on loopback with raft's fastest timing is seconds:
	// an election (about 1 s) and the new active node's setup.
	if fo.lastFail > 30*time.Second {
		t.Errorf("reads failed until %s after the kill; want within 30s", fo.lastFail)
	}

	// No mint during the failover: the new active node serves the tokens
	// its predecessor stored. In all, one mint per config (its verifying
	// write) plus the one rotation.
	calls := sb.AllCalls()
	for _, ep := range []string{"POST /v1/sessions", sandbox.AlorRefreshEP, sandbox.ChatAppRefreshEP, sandbox.ChatAppMakeEP} {
		if calls[ep] != 0 {
			t.Errorf("%d calls to %s after the configs were written: the failover minted again", calls[ep], ep)
		}
	}
	if got := sb.ChatAppMakes(); got != 1 {
		t.Errorf("%d tokens.make in all, want the one at config write", got)
	}
	// The retire made on the dead node holds on every surviving one.
	var fresh any
	for _, nd := range c.Alive() {
		got := mustOK(nd, "GET", "broker/creds/incident", nil).Data["access_token"]
		if got == retiredTok {
			t.Errorf("%s served the token retired on the dead active node", nd.ID)
		}
		if fresh == nil {
			fresh = got
		} else if got != fresh {
			t.Errorf("%s served a different token after the retire: one mint should serve all", nd.ID)
		}
	}
	sb.ResetCalls()

	// Nothing stored is lost: every config reads, on every surviving node.
	secretFields := map[string][]string{"finam": {"secret"}, "alor": {"refresh_token"}, "chat": {"email", "password", "app_id"}, "tbank": {"token"}}
	for _, nd := range c.Alive() {
		for name, fields := range secretFields {
			r := mustOK(nd, "GET", "broker/config/"+name, nil)
			for _, f := range fields {
				if r.Data[f+"_set"] != true {
					t.Errorf("%s: config %s lost %s (%s_set = %v)", nd.ID, name, f, f, r.Data[f+"_set"])
				}
			}
		}
	}
	// The rotated refresh token survived: still valid at ChatApp, and the
	// next rotation refreshes it without a make.
	if !sb.ChatAppRefreshValid(liveRT) {
		t.Error("the refresh token rotated before the crash is no longer valid at ChatApp")
	}
	makes := sb.ChatAppMakes()
	mustOK(standbyOf(c, active), "POST", "broker/rotate-root/chat", map[string]any{})
	if got := sb.ChatAppMakes(); got != makes {
		t.Errorf("rotate-root after the failover needed tokens.make (%d -> %d): the rotated refresh token was lost", makes, got)
	}
	if sb.Calls(sandbox.ChatAppRefreshEP) != 1 {
		t.Errorf("rotate-root after the failover: %d refreshes, want 1", sb.Calls(sandbox.ChatAppRefreshEP))
	}

	// A config write through a standby is forwarded to the new active node
	// and seen everywhere (verify=false: same upstream, no mint).
	sbNode := standbyOf(c, active)
	mustOK(sbNode, "POST", "broker/config/finam", map[string]any{"ttl": "10m", "verify": false})
	for _, nd := range c.Alive() {
		if r := mustOK(nd, "GET", "broker/config/finam", nil); fmt.Sprint(r.Data["ttl"]) != "600" {
			t.Errorf("%s: finam ttl = %v after a write through %s, want 600", nd.ID, r.Data["ttl"], sbNode.ID)
		}
	}
	// (Leases also end where the token's refresh is due, so it can be less.)
	if r := mustOK(sbNode, "GET", "broker/creds/finam", nil); r.LeaseDuration > 600 || r.LeaseDuration < 1 {
		t.Errorf("creds after the ttl write: lease %ds, want at most 600", r.LeaseDuration)
	}
	if n := sb.Calls("POST /v1/sessions"); n != 0 {
		t.Errorf("the ttl write minted (%d sessions)", n)
	}

	// Periodic work: the T-Invest config validated every minute, read by
	// no one, across the failover. One node at a time runs it: about one
	// validation a minute, never one per node. Watch until two validations
	// show the interval (or the first is not followed within two ticks).
	for {
		times := infoTimes.all()
		if len(times) >= 2 || (len(times) == 1 && time.Since(times[0]) > 130*time.Second) || time.Since(periodicStart) > 240*time.Second {
			break
		}
		time.Sleep(time.Second)
	}
	window := time.Since(periodicStart)
	times := infoTimes.all()
	var gaps []time.Duration
	for i := 1; i < len(times); i++ {
		gaps = append(gaps, times[i].Sub(times[i-1]).Round(time.Second))
	}
	t.Logf("periodic: %d GetInfo calls in %s since tbank was written (at %v after it; gaps %v); GetAccounts %d",
		len(times), window.Round(time.Second), offsets(times, periodicStart), gaps, sb.Calls(sandbox.TInvestGetAccountsEP))
	switch {
	case len(times) == 0:
		t.Error("the T-Invest token was never validated in the background (validation_interval=1m)")
	case float64(len(times))/window.Minutes() > 1.5:
		t.Errorf("%d validations in %s with validation_interval=1m: periodic work runs on more than one node", len(times), window.Round(time.Second))
	}
	for _, g := range gaps {
		if g < 45*time.Second {
			t.Errorf("two validations %s apart: periodic work ran twice", g)
		}
		if g > 75*time.Second {
			t.Errorf("validations %s apart with validation_interval=1m: a due validation waited for a later periodic tick", g)
		}
	}
	if len(times) == 1 {
		t.Errorf("no validation in the %s after the first (validation_interval=1m, periodic ticks every minute): a due validation waited for a later periodic tick",
			time.Since(times[0]).Round(time.Second))
	}
	t.Logf("HA test took %s", time.Since(testStart).Round(time.Second))
}

func standbyOf(c *vaulttest.Cluster, active *vaulttest.Node) *vaulttest.Node {
	for _, nd := range c.Alive() {
		if nd != active {
			return nd
		}
	}
	return active
}

func offsets(ts []time.Time, from time.Time) []string {
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.Sub(from).Round(time.Second).String()
	}
	return out
}

type callClock struct {
	mu sync.Mutex
	ts []time.Time
}

func newCallClock() *callClock { return &callClock{} }

func (c *callClock) add(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ts = append(c.ts, t)
}

func (c *callClock) all() []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Time(nil), c.ts...)
}

// readLoad records every read of the load.
type readLoad struct {
	mu    sync.Mutex
	reads []loadRead
}

type loadRead struct {
	node       string
	start, end time.Time
	ok         bool
	err        string
}

func newReadLoad() *readLoad { return &readLoad{} }

func (l *readLoad) record(node string, start, end time.Time, ok bool, err error, resp *vaulttest.APIResponse) {
	r := loadRead{node: node, start: start, end: end, ok: ok}
	switch {
	case err != nil:
		r.err = err.Error()
	case !ok:
		r.err = fmt.Sprintf("HTTP %d %s", resp.Status, strings.Join(resp.Errors, "; "))
	}
	l.mu.Lock()
	l.reads = append(l.reads, r)
	l.mu.Unlock()
}

type loadCount struct{ ok, failed int }

func (l *readLoad) snapshot() loadCount {
	l.mu.Lock()
	defer l.mu.Unlock()
	var c loadCount
	for _, r := range l.reads {
		if r.ok {
			c.ok++
		} else {
			c.failed++
		}
	}
	return c
}

func (l *readLoad) firstErrors(n int) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.reads {
		if !r.ok && len(out) < n {
			out = append(out, r.node+": "+r.err)
		}
	}
	return out
}

// allGoodSince reports whether every node has served reads started after
// the kill, and none failed, for the last d.
func (l *readLoad) allGoodSince(kill time.Time, nodes []*vaulttest.Node, d time.Duration) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	for _, nd := range nodes {
		var lastFail, firstOKAfterFail time.Time
		served := false
		for _, r := range l.reads {
			if r.node != nd.ID || r.start.Before(kill) {
				continue
			}
			if !r.ok {
				lastFail = r.end
				firstOKAfterFail = time.Time{}
				continue
			}
			served = true
			if firstOKAfterFail.IsZero() {
				firstOKAfterFail = r.start
			}
		}
		if !served || firstOKAfterFail.IsZero() || now.Sub(firstOKAfterFail) < d || (!lastFail.IsZero() && lastFail.After(firstOKAfterFail)) {
			return false
		}
	}
	return true
}

type failoverFigures struct {
	firstOK, lastFail time.Duration
	ok, failed        int
	perNode           []string
}

// failover measures, for the reads started after the kill on the surviving
// nodes: the first served read, the end of the last failed one, and counts.
func (l *readLoad) failover(kill time.Time, nodes []*vaulttest.Node) failoverFigures {
	l.mu.Lock()
	defer l.mu.Unlock()
	var f failoverFigures
	alive := map[string]bool{}
	for _, nd := range nodes {
		alive[nd.ID] = true
	}
	type per struct {
		ok, failed  int
		first, last time.Duration
		errs        map[string]int
	}
	byNode := map[string]*per{}
	for _, r := range l.reads {
		if !alive[r.node] || r.start.Before(kill) {
			continue
		}
		p := byNode[r.node]
		if p == nil {
			p = &per{first: -1, errs: map[string]int{}}
			byNode[r.node] = p
		}
		if r.ok {
			f.ok++
			p.ok++
			if d := r.end.Sub(kill); f.firstOK == 0 || d < f.firstOK {
				f.firstOK = d
			}
			if d := r.end.Sub(kill); p.first < 0 || d < p.first {
				p.first = d
			}
			continue
		}
		f.failed++
		p.failed++
		msg := r.err
		if len(msg) > 90 {
			msg = msg[:90] + "…"
		}
		p.errs[msg]++
		if d := r.end.Sub(kill); d > f.lastFail {
			f.lastFail = d
		}
		if d := r.end.Sub(kill); d > p.last {
			p.last = d
		}
	}
	for _, id := range slices.Sorted(maps.Keys(byNode)) {
		p := byNode[id]
		line := fmt.Sprintf("%s: %d served, %d failed; first served %s after the kill, last failure ended %s after", id, p.ok, p.failed,
			p.first.Round(10*time.Millisecond), p.last.Round(10*time.Millisecond))
		for msg, n := range p.errs {
			line += fmt.Sprintf("\n      %dx %s", n, msg)
		}
		f.perNode = append(f.perNode, line)
	}
	return f
}
