package e2e

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// TestUpstreamFaults runs every upstream fault against every provider on a
// real Vault dev server, with a fault-injecting proxy between the plugin and
// the sandbox, and asserts what readers see:
//
//	(a) with a valid cached token, creds keep being served and the config's
//	    last_error names the broker;
//	(b) with no valid cached token (config/<name>/retire), creds fail fast
//	    with a clear 4xx/5xx naming the broker, within a bound, without
//	    piling onto the broker; the stored config is intact; once the
//	    fault clears, creds work again;
//	(c) the plugin process does not grow (goroutines and heap from its own
//	    broker/metrics, threads and RSS from /proc) across the suite and is
//	    never restarted.
//
// Status faults go through the sandbox's InjectFault (broker-shaped bodies);
// the proxy adds the rate-limit headers and makes the faults a broker's
// network can: a reset connection, a connection cut mid-body, an HTML error
// page, a wrong content type, truncated JSON, a 10 MB body, an endless
// stream. The revocation of the long-lived secret is done at the sandbox.
//
// To have a token that is valid but due for refresh ahead (so that each
// creds read asks the broker for a new one in the background), the
// sandbox's clock runs 11 minutes behind: Finam and ALOR JWTs of 15 minutes
// arrive with 4 minutes left, which is servable (over 60 s) and due (under
// two fifths). T-Invest validations become due after a minute, so its phase (a)
// runs on configs validated at the start; ChatApp's access token lives a day,
// so its phase (a) asks for the refresh with rotate-root, as the periodic
// rotation does.
func TestUpstreamFaults(t *testing.T) {
	suiteStart := time.Now()
	sb := sandbox.New(sandbox.Options{
		Now:                func() time.Time { return time.Now().Add(-11 * time.Minute) },
		FinamTokenLifetime: 15 * time.Minute,
		FinamRateLimit:     1 << 20,
	})
	sb.SetAlorTokenLifetime(15 * time.Minute)
	sb.SetTInvestRateLimit(1 << 20)
	sbSrv := httptest.NewServer(sb)
	defer sbSrv.Close()
	px := newFaultProxy(t, sbSrv.URL)
	defer px.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	v, err := vaulttest.StartDev(ctx, vaulttest.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		v.Stop()
		if t.Failed() {
			t.Logf("--- vault log tail ---\n%s", v.LogTail(80))
		}
	}()
	if err := v.Register(pluginVersion, "broker"); err != nil {
		t.Fatal(err)
	}
	fe := &faultEnv{t: t, v: v, sb: sb, px: px}

	providers := fe.providers()
	for _, p := range providers {
		p.setup(fe, p)
	}
	// The plugin process, measured once every config is up and warm.
	pid := pluginPID(t, v.PluginDir)
	before := procStatus(t, pid)
	rtBefore := pluginRuntime(t, v)
	t.Logf("plugin pid %d before the faults: %d threads, VmRSS %d kB; metrics: %s (setup took %s)", pid, before.threads, before.rssKB, rtBefore, time.Since(suiteStart).Round(time.Second))

	// The providers run at once (their endpoints differ), each through its
	// faults in turn. Plain goroutines rather than t.Parallel, which -parallel
	// (GOMAXPROCS by default) would cap at two at a time on a small machine.
	var mu sync.Mutex
	var cells []faultCell
	var wg sync.WaitGroup
	for _, p := range providers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t.Run(p.label, func(t *testing.T) {
				got := fe.runProvider(t, p)
				mu.Lock()
				cells = append(cells, got...)
				mu.Unlock()
			})
		}()
	}
	wg.Wait()

	// (c) The plugin survived every fault as the same process, and did not
	// grow. The suite runs 56 provider x fault cells (and more broker
	// calls), so a leak of one goroutine, thread or response body per fault
	// goes far past these bounds; the headroom is for what legitimately
	// moves between the two looks. Measured on a shared 2-core machine
	// (9 runs): goroutines 25 -> 25 every time, threads +0 to +2, heap in
	// use 5.6-6.2 MB -> 5.9-10.7 MB (at most +4.6 MB), VmRSS +1.6 to
	// +5.6 MB.
	if got := pluginPID(t, v.PluginDir); got != pid {
		t.Errorf("the plugin process changed from %d to %d: it crashed or was restarted during the faults", pid, got)
	}
	after := procStatus(t, pid)
	rtAfter := pluginRuntime(t, v)
	t.Logf("plugin pid %d after the faults: %d threads, VmRSS %d kB; metrics: %s", pid, after.threads, after.rssKB, rtAfter)
	// Goroutines: an idle keep-alive connection to the broker holds two
	// (its read and write loops), and the pools may keep a few more or
	// fewer idle connections than at the first look (up to 16 per host,
	// closed after 90 s idle): 8 is four connections more.
	if rtAfter.goroutines > rtBefore.goroutines+8 {
		t.Errorf("plugin goroutines grew from %.0f to %.0f across the faults", rtBefore.goroutines, rtAfter.goroutines)
	}
	// Threads never shrink in Go: after is the peak of the suite. The runtime
	// may add one per P running at once and a few for blocking syscalls.
	if maxThreads := before.threads + max(8, int(rtBefore.gomaxprocs)); after.threads > maxThreads {
		t.Errorf("plugin threads grew from %d to %d across the faults (bound %d)", before.threads, after.threads, maxThreads)
	}
	// Heap in use holds garbage up to the next GC, which comes when the
	// heap reaches twice the live heap (4 MB at least): with about 4-5 MB
	// live, up to some 11 MB at either look. The plugin reads at most 1 MB
	// of a body, and the oversized-body and endless-stream faults make over
	// a dozen such reads: keeping them would pass the bound.
	const mb = 1 << 20
	if rtAfter.heapInuse > rtBefore.heapInuse+8*mb {
		t.Errorf("plugin heap in use grew from %.1f MB to %.1f MB across the faults", rtBefore.heapInuse/(1<<20), rtAfter.heapInuse/(1<<20))
	}
	// VmRSS also keeps freed pages the runtime has not returned yet (its
	// scavenger is lazy): twice the heap bound.
	if after.rssKB > before.rssKB+16*1024 {
		t.Errorf("plugin VmRSS grew from %d kB to %d kB across the faults", before.rssKB, after.rssKB)
	}
	if n := px.active.Load(); n != 0 {
		t.Errorf("%d proxied requests are still open: a connection to the broker was not closed", n)
	}

	sort.Slice(cells, func(i, j int) bool {
		if cells[i].provider != cells[j].provider {
			return cells[i].provider < cells[j].provider
		}
		return cells[i].order < cells[j].order
	})
	wa := len("(a) valid cached token")
	for _, c := range cells {
		wa = max(wa, len([]rune(c.a)))
	}
	var b strings.Builder
	fmt.Fprintf(&b, "fault matrix: (a) the config holds a valid token when the fault starts; (b) it holds none (retired)\n")
	fmt.Fprintf(&b, "%-8s | %-23s | %-*s | %s\n", "provider", "fault", wa, "(a) valid cached token", "(b) no valid cached token")
	fmt.Fprintf(&b, "%s\n", strings.Repeat("-", 8+3+23+3+wa+3+90))
	for _, c := range cells {
		fmt.Fprintf(&b, "%-8s | %-23s | %s%s | %s\n", c.provider, c.fault, c.a, strings.Repeat(" ", wa-len([]rune(c.a))), c.b)
	}
	fmt.Fprintf(&b, "plugin: threads %d -> %d, VmRSS %d -> %d kB, goroutines %.0f -> %.0f, heap in use %.1f -> %.1f MB; suite %s",
		before.threads, after.threads, before.rssKB, after.rssKB, rtBefore.goroutines, rtAfter.goroutines,
		rtBefore.heapInuse/(1<<20), rtAfter.heapInuse/(1<<20), time.Since(suiteStart).Round(time.Second))
	t.Log(b.String())
}

// faultEnv is the shared state of the suite.
type faultEnv struct {
	t  *testing.T
	v  *vaulttest.Vault
	sb *sandbox.Server
	px *faultProxy
}

// faultCell is one provider x fault outcome, for the matrix.
type faultCell struct {
	provider, fault string
	order           int
	a, b            string
}

// upstreamFault is one way a broker can fail.
type upstreamFault struct {
	name string
	// status, when set, is injected at the sandbox for the mint endpoint.
	status int
	// mode is what the proxy does on the mint endpoint.
	mode proxyMode
	// says is what the error (creds and last_error) must mention.
	says string
	// httpStatus is the status creds answer with while it lasts.
	httpStatus int
	revoke     bool
}

func upstreamFaults() []upstreamFault {
	return []upstreamFault{
		{name: "429 + Retry-After", status: 429, mode: addRetryAfter, says: "rate limited", httpStatus: 429},
		{name: "429 + x-ratelimit-reset", status: 429, mode: addRateReset, says: "rate limited", httpStatus: 429},
		{name: "500", status: 500, says: "HTTP 500", httpStatus: 502},
		{name: "502", status: 502, says: "HTTP 502", httpStatus: 502},
		{name: "503", status: 503, says: "HTTP 503", httpStatus: 502},
		{name: "504", status: 504, says: "HTTP 504", httpStatus: 502},
		{name: "connection reset", mode: resetConn, says: "unavailable", httpStatus: 502},
		{name: "cut mid-body", mode: cutMidBody, says: "unavailable", httpStatus: 502},
		{name: "HTML error page", mode: htmlErrorPage, says: "HTTP 502", httpStatus: 502},
		{name: "wrong content type", mode: wrongContentType, says: "bad response", httpStatus: 502},
		{name: "truncated JSON", mode: truncatedJSON, says: "bad response", httpStatus: 502},
		{name: "10 MB body", mode: oversizedBody, says: "larger than", httpStatus: 502},
		{name: "endless stream", mode: endlessStream, says: "larger than", httpStatus: 502},
		{name: "secret revoked", revoke: true, says: "authentication failed", httpStatus: 502},
	}
}

// faultProvider describes one provider for the suite.
type faultProvider struct {
	label, display string
	config         string // config name for phases (a) and (b)
	endpoint       string // the mint endpoint, as InjectFault and the proxy key it
	secretFields   []string
	idempotent     bool // the mint call is retried on transient failures
	// sample is a real-looking success body of the mint endpoint (cut for
	// the truncation faults).
	sample string
	setup  func(fe *faultEnv, p *faultProvider)
	valid  func(fe *faultEnv, token string) bool
	// phaseA triggers an upstream call for a config that holds a valid
	// token; nil: a creds read does (the token is due for refresh ahead).
	phaseA func(fe *faultEnv, t *testing.T, p *faultProvider, f upstreamFault) string
	// revoke kills the long-lived secret of a config at the broker;
	// recover writes a working one to the config and reports what it did.
	revoke  func(fe *faultEnv, p *faultProvider, config string)
	recover func(fe *faultEnv, t *testing.T, p *faultProvider) string

	// state of the run
	secret  string
	aConfig map[string]string // tinvest: phase (a) config per fault
	aToken  map[string]string // tinvest: the token of each phase (a) config
}

func (fe *faultEnv) providers() []*faultProvider {
	base := fe.px.URL()
	return []*faultProvider{
		{
			label: "finam", display: "Finam", config: "finam", endpoint: "POST /v1/sessions", secretFields: []string{"secret"},
			sample: `{"token":"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJicm9rZXItc2FuZGJveC9maW5hbSIsInN1YiI6ImNsaWVudC0xYTJiM2MiLCJleHAiOjE3NzIzNjAxMDB9.c2lnbmF0dXJl"}`,
			setup: func(fe *faultEnv, p *faultProvider) {
				p.secret = "e2e-faults-finam-1"
				fe.sb.AddFinamSecret(p.secret, []string{"1899011", "1899012"}, false)
				fe.mustWrite(fe.t, p.config, map[string]any{"provider": "finam", "secret": p.secret, "base_url": base})
			},
			valid:  func(fe *faultEnv, tok string) bool { return fe.sb.FinamValid(tok) },
			revoke: func(fe *faultEnv, p *faultProvider, _ string) { fe.sb.RevokeFinamSecret(p.secret) },
			recover: func(fe *faultEnv, t *testing.T, p *faultProvider) string {
				p.secret = "e2e-faults-finam-2"
				fe.sb.AddFinamSecret(p.secret, []string{"1899011"}, false)
				fe.mustWrite(t, p.config, map[string]any{"secret": p.secret})
				return "new secret written"
			},
		},
		{
			label: "tinvest", display: "T-Invest", config: "tinvest", endpoint: sandbox.TInvestGetInfoEP, secretFields: []string{"token"}, idempotent: true,
			sample: `{"premStatus":false,"qualStatus":false,"qualifiedForWorkWith":["bond","foreign_shares"],"tariff":"investor","userId":"8f4b2c1e-3a5d-4e6f-9a7b-0c1d2e3f4a5b","riskLevelCode":"1"}`,
			setup: func(fe *faultEnv, p *faultProvider) {
				p.secret = "e2e-faults-tinvest-b1"
				fe.sb.AddTInvestToken(p.secret, false, tinvestAccount())
				fe.mustWrite(fe.t, p.config, map[string]any{"provider": "tinvest", "token": p.secret, "base_url": base + sandbox.TInvestPrefix})
				// Phase (a) needs a validation over a minute old: one config
				// per fault, validated now, used after the (b) runs.
				p.aConfig, p.aToken = map[string]string{}, map[string]string{}
				for i, f := range upstreamFaults() {
					name := fmt.Sprintf("tinvest-a%02d", i)
					tok := sandbox.TInvestReadOnlyToken
					if f.revoke {
						tok = "e2e-faults-tinvest-a-revoked"
						fe.sb.AddTInvestToken(tok, false, tinvestAccount())
					}
					p.aConfig[f.name], p.aToken[name] = name, tok
					fe.mustWrite(fe.t, name, map[string]any{"provider": "tinvest", "token": tok, "base_url": base + sandbox.TInvestPrefix})
				}
			},
			valid: func(fe *faultEnv, tok string) bool { return fe.sb.TInvestValid(tok) },
			revoke: func(fe *faultEnv, p *faultProvider, config string) {
				if tok, ok := p.aToken[config]; ok {
					fe.sb.RevokeTInvestToken(tok)
					return
				}
				fe.sb.RevokeTInvestToken(p.secret)
			},
			recover: func(fe *faultEnv, t *testing.T, p *faultProvider) string {
				p.secret = "e2e-faults-tinvest-b2"
				fe.sb.AddTInvestToken(p.secret, false, tinvestAccount())
				fe.mustWrite(t, p.config, map[string]any{"token": p.secret})
				return "new token written"
			},
		},
		{
			label: "alor", display: "ALOR", config: "alor", endpoint: sandbox.AlorRefreshEP, secretFields: []string{"refresh_token"},
			sample: `{"AccessToken":"eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJQMDEyMzQ1IiwicG9ydGZvbGlvcyI6IkQxMjM0NSIsImV4cCI6MTc3MjM2MTAwMH0.c2lnbmF0dXJl"}`,
			setup: func(fe *faultEnv, p *faultProvider) {
				p.secret = sandbox.AlorRefreshToken
				fe.mustWrite(fe.t, p.config, map[string]any{"provider": "alor", "refresh_token": p.secret, "base_url": base})
			},
			valid:  func(fe *faultEnv, tok string) bool { return fe.sb.AlorValid(tok) },
			revoke: func(fe *faultEnv, p *faultProvider, _ string) { fe.sb.RevokeAlorRefreshToken(p.secret) },
			recover: func(fe *faultEnv, t *testing.T, p *faultProvider) string {
				p.secret = "e2e-faults-alor-new"
				fe.sb.AddAlorRefreshToken(p.secret)
				fe.mustWrite(t, p.config, map[string]any{"refresh_token": p.secret})
				return "new refresh token written"
			},
		},
		{
			label: "chatapp", display: "ChatApp", config: "chat", endpoint: sandbox.ChatAppRefreshEP, secretFields: []string{"email", "password", "app_id"},
			sample: `{"success":true,"data":{"cabinetUserId":4242,"accessToken":"5b1f0e2d9c8a7b6e5d4c3b2a19080706","accessTokenEndTime":1772445600,"refreshToken":"a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5","refreshTokenEndTime":1773568800}}`,
			setup: func(fe *faultEnv, p *faultProvider) {
				fe.mustWrite(fe.t, p.config, map[string]any{"provider": "chatapp", "email": sandbox.ChatAppEmail, "password": sandbox.ChatAppPassword,
					"app_id": sandbox.ChatAppAppID, "base_url": base})
			},
			valid: func(fe *faultEnv, tok string) bool { return fe.sb.ChatAppAccessValid(tok) },
			// The access token lives a day: ask for the refresh the periodic
			// rotation would make.
			phaseA: func(fe *faultEnv, t *testing.T, p *faultProvider, f upstreamFault) string {
				start := time.Now()
				r := fe.api(t, "POST", "broker/rotate-root/"+p.config, map[string]any{})
				took := time.Since(start)
				if f.revoke {
					if r.Status != 200 {
						t.Errorf("rotate-root after the refresh token was revoked: HTTP %d %v; want a new pair from tokens.make", r.Status, r.Errors)
					}
					return fmt.Sprintf("rotate-root %d (%s)", r.Status, took.Round(time.Millisecond))
				}
				fe.checkFailure(t, p, f, r, took, "rotate-root")
				return fmt.Sprintf("rotate-root %d (%s)", r.Status, took.Round(time.Millisecond))
			},
			revoke: func(fe *faultEnv, p *faultProvider, _ string) {
				for _, rt := range fe.sb.ChatAppIssuedRefreshTokens() {
					fe.sb.RevokeChatAppRefresh(rt)
				}
			},
		},
	}
}

func tinvestAccount() sandbox.TInvestAccount {
	return sandbox.TInvestAccount{ID: "2000000009", Type: "ACCOUNT_TYPE_TINKOFF", Name: "e2e", Status: "ACCOUNT_STATUS_OPEN",
		OpenedDate: time.Date(2024, 1, 10, 0, 0, 0, 0, time.UTC), AccessLevel: sandbox.TInvestReadOnly}
}

// runProvider runs every fault against one provider and returns its row of
// the matrix.
func (fe *faultEnv) runProvider(t *testing.T, p *faultProvider) []faultCell {
	var cells []faultCell
	faults := upstreamFaults()
	aDone := map[string]string{}
	for i, f := range faults {
		c := faultCell{provider: p.label, fault: f.name, order: i}
		if p.label != "tinvest" {
			t.Run(f.name+"/a", func(t *testing.T) { aDone[f.name] = fe.phaseA(t, p, f, p.config) })
		}
		t.Run(f.name+"/b", func(t *testing.T) { c.b = fe.phaseB(t, p, f) })
		cells = append(cells, c)
	}
	if p.label == "tinvest" {
		// Each phase (a) config was validated at setup; phaseA waits until
		// that validation is over a minute old (due for revalidation),
		// which the (b) runs above outlast.
		for _, f := range faults {
			t.Run(f.name+"/a", func(t *testing.T) { aDone[f.name] = fe.phaseA(t, p, f, p.aConfig[f.name]) })
		}
	}
	for i := range cells {
		cells[i].a = aDone[cells[i].fault]
	}
	return cells
}

// startFault turns f on for p's mint endpoint (a revocation: for config).
func (fe *faultEnv) startFault(p *faultProvider, f upstreamFault, config string) {
	if f.revoke {
		p.revoke(fe, p, config)
		return
	}
	if f.status != 0 {
		fe.sb.InjectFault(p.endpoint, f.status, -1)
	}
	fe.px.set(p.endpoint, f.mode, p.sample)
}

// stopFault turns p's faults off (a revocation is not undone: the secret
// stays dead).
func (fe *faultEnv) stopFault(p *faultProvider, _ upstreamFault) {
	fe.sb.InjectFault(p.endpoint, 0, 0)
	fe.px.set(p.endpoint, passThrough, "")
}

// phaseA: the config holds a valid token when the fault starts.
func (fe *faultEnv) phaseA(t *testing.T, p *faultProvider, f upstreamFault, config string) string {
	if p.label == "tinvest" {
		// Validated at setup; due for revalidation once over a minute old.
		st := fe.configStatus(t, config)
		if last, err := time.Parse(time.RFC3339, str(st.Data["last_refresh"])); err == nil {
			if wait := time.Until(last.Add(62 * time.Second)); wait > 0 {
				time.Sleep(wait)
			}
		}
	}
	// The config must hold a token before the fault. (Not a T-Invest one:
	// a read now would revalidate it, and the fault would find it fresh.)
	if p.label != "tinvest" {
		if r := fe.creds(t, config); r.Status != 200 {
			t.Fatalf("creds before the fault: HTTP %d %v", r.Status, r.Errors)
		}
	} else if st := fe.configStatus(t, config); str(st.Data["token_expires_at"]) != "" || st.Data["readonly"] == nil {
		t.Fatalf("T-Invest config %s holds no validated token: %v", config, st.Data)
	}
	makes := fe.sb.ChatAppMakes()
	faultAt := time.Now()
	fe.startFault(p, f, config)
	defer fe.stopFault(p, f)

	var trigger string
	if p.phaseA != nil {
		trigger = p.phaseA(fe, t, p, f)
	}
	// Reads go on being served from the cached token while the refresh
	// they start in the background fails. Poll until the failure shows in
	// the config's status.
	var st *vaulttest.APIResponse
	served, failedReads := 0, 0
	var failedStatus int
	deadline := time.Now().Add(20 * time.Second)
	for {
		start := time.Now()
		r := fe.creds(t, config)
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("a creds read with a valid cached token took %s during %s", took, f.name)
		}
		switch {
		case r.Status == 200:
			served++
			if tok := str(r.Data["access_token"]); !f.revoke && !p.valid(fe, tok) {
				t.Errorf("served a token the broker does not accept")
			}
		case f.revoke:
			// Once the broker refuses the secret, its tokens are not
			// handed out any more (they die with it).
			failedReads++
			failedStatus = r.Status
			fe.checkFailure(t, p, f, r, time.Since(start), "creds")
		default:
			t.Fatalf("creds with a valid cached token failed during %s: HTTP %d %v", f.name, r.Status, r.Errors)
		}
		st = fe.configStatus(t, config)
		lastErrAt, _ := time.Parse(time.RFC3339, str(st.Data["last_error_at"]))
		if !lastErrAt.Before(faultAt.Truncate(time.Second)) && str(st.Data["last_error"]) != "" &&
			(!f.revoke || failedReads > 0 || p.label == "chatapp") {
			break
		}
		if p.label == "chatapp" && f.revoke && r.Status == 200 && fe.sb.ChatAppMakes() == makes+1 {
			break // recovered through tokens.make: no error to record
		}
		if time.Now().After(deadline) {
			t.Fatalf("no last_error after %s of %s (served %d): %v", time.Since(faultAt).Round(time.Second), f.name, served, st.Data["last_error"])
		}
		time.Sleep(250 * time.Millisecond)
	}
	lastErr := str(st.Data["last_error"])
	if p.label == "chatapp" && f.revoke {
		if got := fe.sb.ChatAppMakes(); got != makes+1 {
			t.Errorf("makes %d -> %d: a refused refresh token should cost exactly one tokens.make", makes, got)
		}
		r := fe.creds(t, config)
		if r.Status != 200 || !p.valid(fe, str(r.Data["access_token"])) {
			t.Errorf("creds after the new pair: HTTP %d %v", r.Status, r.Errors)
		}
		return fmt.Sprintf("%s; new pair via tokens.make (+1 make); creds served", trigger)
	}
	fe.checkLastError(t, p, f, st, "last_error")
	// `vault read broker/config/<name>` shows it, as an operator sees it.
	out := fe.v.CLI("read", "-format=json", "broker/config/"+config)
	if !out.OK() || !strings.Contains(out.Stdout, p.display) || !strings.Contains(out.Stdout, `"last_error"`) {
		t.Errorf("vault read broker/config/%s does not show the %s error: %s", config, p.display, out)
	}
	if p.label == "chatapp" && fe.sb.ChatAppMakes() != makes {
		t.Errorf("a %s on tokens.refresh spent a tokens.make (%d -> %d)", f.name, makes, fe.sb.ChatAppMakes())
	}
	if f.revoke {
		return fmt.Sprintf("%s%d served, then creds %d; last_error: %s", prefix(trigger), served, failedStatus, short(lastErr))
	}
	// Still served after the failure was recorded.
	if r := fe.creds(t, config); r.Status != 200 {
		t.Errorf("creds after the failed refresh: HTTP %d %v", r.Status, r.Errors)
	}
	return fmt.Sprintf("%sall %d served; last_error: %s", prefix(trigger), served+1, short(lastErr))
}

// phaseB: no valid cached token when the fault starts.
func (fe *faultEnv) phaseB(t *testing.T, p *faultProvider, f upstreamFault) string {
	makes := fe.sb.ChatAppMakes()
	fe.startFault(p, f, p.config)
	stopped := false
	defer func() {
		if !stopped {
			fe.stopFault(p, f)
		}
	}()
	if r := fe.api(t, "POST", "broker/config/"+p.config+"/retire", map[string]any{}); r.Status != 200 {
		t.Fatalf("retire: HTTP %d %v", r.Status, r.Errors)
	}
	hits := fe.px.hits(p.endpoint)
	start := time.Now()
	r := fe.creds(t, p.config)
	took := time.Since(start)
	calls := fe.px.hits(p.endpoint) - hits

	if p.label == "chatapp" && f.revoke {
		// A refused refresh token is what tokens.make is for.
		if r.Status != 200 || !p.valid(fe, str(r.Data["access_token"])) {
			t.Fatalf("creds after the refresh token was revoked: HTTP %d %v; want a new pair from tokens.make", r.Status, r.Errors)
		}
		if got := fe.sb.ChatAppMakes(); got != makes+1 {
			t.Errorf("makes %d -> %d, want exactly one", makes, got)
		}
		return fmt.Sprintf("creds 200 in %s: new pair via tokens.make (+1 make)", took.Round(time.Millisecond))
	}
	fe.checkFailure(t, p, f, r, took, "creds")
	switch {
	case !p.idempotent && calls != 1:
		t.Errorf("the failed mint reached the broker %d times; a mint is never retried", calls)
	case p.idempotent && (calls < 1 || calls > 3):
		t.Errorf("the failed validation reached the broker %d times, want 1 to 3", calls)
	}
	if p.idempotent && f.status == 429 {
		// Retries honour the broker's 1 s Retry-After / x-ratelimit-reset.
		if gaps := fe.px.gaps(p.endpoint, calls); len(gaps) > 0 && minDur(gaps) < 900*time.Millisecond {
			t.Errorf("retries %v apart, under the 1 s the broker asked for", gaps)
		}
	}
	// Fail fast: an immediate second read gets the same answer without
	// another call to the failing broker.
	hits2 := fe.px.hits(p.endpoint)
	start2 := time.Now()
	r2 := fe.creds(t, p.config)
	if took2 := time.Since(start2); r2.Status != r.Status || took2 > time.Second || fe.px.hits(p.endpoint) != hits2 {
		t.Errorf("second read: HTTP %d in %s with %d more broker calls; want a fast %d and none", r2.Status, took2, fe.px.hits(p.endpoint)-hits2, r.Status)
	}
	// Nothing stored is lost.
	st := fe.configStatus(t, p.config)
	for _, field := range p.secretFields {
		if st.Data[field+"_set"] != true {
			t.Errorf("%s_set = %v after the failure", field, st.Data[field+"_set"])
		}
	}
	fe.checkLastError(t, p, f, st, "last_error")
	if p.label == "chatapp" && fe.sb.ChatAppMakes() != makes {
		t.Errorf("a %s on tokens.refresh spent a tokens.make (%d -> %d)", f.name, makes, fe.sb.ChatAppMakes())
	}

	// The fault clears; creds work again, within the fail-fast window and
	// a mint.
	fe.stopFault(p, f)
	stopped = true
	recovery := "cleared"
	if f.revoke {
		recovery = p.recover(fe, t, p)
	}
	cleared := time.Now()
	for {
		r := fe.creds(t, p.config)
		if r.Status == 200 {
			if !p.valid(fe, str(r.Data["access_token"])) {
				t.Errorf("served a token the broker does not accept after recovery")
			}
			break
		}
		if time.Since(cleared) > 12*time.Second {
			t.Fatalf("creds still failing %s after the fault cleared: HTTP %d %v", time.Since(cleared).Round(time.Second), r.Status, r.Errors)
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Sprintf("creds %d in %s (%d upstream call); repeat fast; config intact; %s, creds ok after %s",
		r.Status, took.Round(time.Millisecond), calls, recovery, time.Since(cleared).Round(100*time.Millisecond))
}

// checkFailure asserts a failed request is a clear, bounded answer that
// names the broker.
func (fe *faultEnv) checkFailure(t *testing.T, p *faultProvider, f upstreamFault, r *vaulttest.APIResponse, took time.Duration, what string) {
	t.Helper()
	msg := strings.Join(r.Errors, "; ")
	if r.Status != f.httpStatus {
		t.Errorf("%s during %s: HTTP %d, want %d: %s", what, f.name, r.Status, f.httpStatus, msg)
	}
	if r.Status < 400 || r.Status > 599 || msg == "" {
		t.Errorf("%s during %s: HTTP %d with message %q", what, f.name, r.Status, msg)
	}
	if !strings.Contains(msg, p.display) || !strings.Contains(msg, f.says) {
		t.Errorf("%s during %s: error does not name %s and %q: %s", what, f.name, p.display, f.says, msg)
	}
	if took > 20*time.Second {
		t.Errorf("%s during %s took %s", what, f.name, took)
	}
}

func (fe *faultEnv) checkLastError(t *testing.T, p *faultProvider, f upstreamFault, st *vaulttest.APIResponse, field string) {
	t.Helper()
	le := str(st.Data[field])
	if !strings.Contains(le, p.display) || !strings.Contains(le, f.says) {
		t.Errorf("config %s = %q during %s: does not name %s and %q", field, le, f.name, p.display, f.says)
	}
	if str(st.Data["provider"]) != p.label {
		t.Errorf("config read lost its provider: %v", st.Data)
	}
}

func (fe *faultEnv) api(t *testing.T, method, path string, body any) *vaulttest.APIResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	r, err := fe.v.API(ctx, method, path, body)
	if err != nil {
		t.Fatalf("%s %s: %v (a hang or a broken answer)", method, path, err)
	}
	return r
}

func (fe *faultEnv) creds(t *testing.T, config string) *vaulttest.APIResponse {
	t.Helper()
	return fe.api(t, "GET", "broker/creds/"+config, nil)
}

func (fe *faultEnv) configStatus(t *testing.T, config string) *vaulttest.APIResponse {
	t.Helper()
	r := fe.api(t, "GET", "broker/config/"+config, nil)
	if r.Status != 200 {
		t.Fatalf("config read %s: HTTP %d %v", config, r.Status, r.Errors)
	}
	return r
}

func (fe *faultEnv) mustWrite(t *testing.T, config string, body map[string]any) {
	t.Helper()
	r := fe.api(t, "POST", "broker/config/"+config, body)
	if r.Status != 200 && r.Status != 204 {
		t.Fatalf("writing config %s: HTTP %d %v", config, r.Status, r.Errors)
	}
}

func str(v any) string {
	s, _ := v.(string)
	return s
}

func prefix(s string) string {
	if s == "" {
		return ""
	}
	return s + "; "
}

// short keeps the matrix readable: what the error says after the broker's
// call name, up to its hint, on one line.
func short(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if i := strings.Index(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	if i := strings.Index(s, "; "); i >= 0 {
		s = s[:i]
	}
	if r := []rune(s); len(r) > 48 {
		s = string(r[:48]) + "…"
	}
	return s
}

func minDur(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds[1:] {
		m = min(m, d)
	}
	return m
}

// procStat is what /proc/<pid>/status tells about a process.
type procStat struct {
	threads int
	rssKB   int
}

func procStatus(t *testing.T, pid int) procStat {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("reading the plugin's status: %v", err)
	}
	var st procStat
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "Threads:":
			st.threads, _ = strconv.Atoi(f[1])
		case "VmRSS:":
			st.rssKB, _ = strconv.Atoi(f[1])
		}
	}
	return st
}

// runtimeStat is what the plugin says about its own process through the Go
// runtime and process collectors of broker/metrics: goroutines are what
// /proc cannot show (a leaked goroutine is no thread, and its 8 KB of stack
// are lost in RSS noise), and the heap in use is the memory the plugin
// holds, without the freed pages not yet returned to the kernel that VmRSS
// still counts.
type runtimeStat struct {
	goroutines float64
	threads    float64
	heapInuse  float64 // bytes
	heapAlloc  float64 // bytes
	nextGC     float64 // bytes: the heap goal, about twice the live heap at the last GC
	rss        float64 // bytes
	gomaxprocs float64
}

func (s runtimeStat) String() string {
	return fmt.Sprintf("%.0f goroutines, %.0f threads, heap in use %.1f MB (allocated %.1f MB, GC goal %.1f MB), RSS %.1f MB",
		s.goroutines, s.threads, s.heapInuse/(1<<20), s.heapAlloc/(1<<20), s.nextGC/(1<<20), s.rss/(1<<20))
}

// pluginRuntime scrapes broker/metrics as Prometheus would (docs/operations.md)
// and reads the plugin process's runtime series from it.
func pluginRuntime(t *testing.T, v *vaulttest.Vault) runtimeStat {
	t.Helper()
	req, err := http.NewRequest("GET", v.Addr+"/v1/broker/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Vault-Token", v.Token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scraping broker/metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("scraping broker/metrics: HTTP %d %s", resp.StatusCode, b)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing broker/metrics: %v", err)
	}
	gauge := func(name string) float64 {
		t.Helper()
		mf, ok := mfs[name]
		if !ok || len(mf.GetMetric()) != 1 {
			t.Fatalf("broker/metrics has no single series %s", name)
		}
		return mf.GetMetric()[0].GetGauge().GetValue()
	}
	return runtimeStat{
		goroutines: gauge("go_goroutines"),
		threads:    gauge("go_threads"),
		heapInuse:  gauge("go_memstats_heap_inuse_bytes"),
		heapAlloc:  gauge("go_memstats_heap_alloc_bytes"),
		nextGC:     gauge("go_memstats_next_gc_bytes"),
		rss:        gauge("process_resident_memory_bytes"),
		gomaxprocs: gauge("go_sched_gomaxprocs_threads"),
	}
}

// pluginPID finds the one process running a binary from dir (the plugin,
// which Vault runs multiplexed: one process for every mount).
func pluginPID(t *testing.T, dir string) int {
	t.Helper()
	pids := pluginPIDs(dir)
	if len(pids) != 1 {
		t.Fatalf("%d plugin processes run from %s: %v", len(pids), dir, pids)
	}
	return pids[0]
}

func pluginPIDs(dir string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.HasPrefix(exe, dir+string(os.PathSeparator)) {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// proxyMode is what the fault proxy does with a request to an endpoint.
type proxyMode int

const (
	passThrough      proxyMode = iota
	addRetryAfter              // forward; a 429 gets Retry-After: 1
	addRateReset               // forward; a 429 gets x-ratelimit-reset: 1
	resetConn                  // close the connection with a TCP RST, no answer
	cutMidBody                 // 200 and half the promised body, then close
	htmlErrorPage              // 502 with a load balancer's HTML page
	wrongContentType           // 200 text/html: a captive portal's login page
	truncatedJSON              // 200 application/json, a success body cut short
	oversizedBody              // 200 application/json of 10 MB
	endlessStream              // 200 application/json that never ends
)

// faultProxy stands between the plugin and the sandbox and breaks what it
// is told to, per endpoint ("METHOD /path").
type faultProxy struct {
	srv    *httptest.Server
	rp     *httputil.ReverseProxy
	active atomic.Int64

	mu      sync.Mutex
	modes   map[string]proxyMode
	samples map[string]string
	count   map[string]int
	times   map[string][]time.Time
}

func newFaultProxy(t *testing.T, target string) *faultProxy {
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{modes: map[string]proxyMode{}, samples: map[string]string{}, count: map[string]int{}, times: map[string][]time.Time{}}
	p.rp = httputil.NewSingleHostReverseProxy(u)
	p.rp.ErrorLog = log.New(io.Discard, "", 0)
	p.rp.ModifyResponse = func(resp *http.Response) error {
		if resp.StatusCode != http.StatusTooManyRequests {
			return nil
		}
		switch p.mode(resp.Request.Method + " " + resp.Request.URL.Path) {
		case addRetryAfter:
			resp.Header.Set("Retry-After", "1")
		case addRateReset:
			resp.Header.Set("x-ratelimit-reset", "1")
		}
		return nil
	}
	p.srv = httptest.NewServer(p)
	return p
}

func (p *faultProxy) URL() string { return p.srv.URL }

func (p *faultProxy) Close() {
	p.srv.CloseClientConnections()
	p.srv.Close()
}

func (p *faultProxy) set(endpoint string, m proxyMode, sample string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.modes[endpoint] = m
	p.samples[endpoint] = sample
}

func (p *faultProxy) mode(endpoint string) proxyMode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.modes[endpoint]
}

func (p *faultProxy) hits(endpoint string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.count[endpoint]
}

// gaps returns the intervals between the last n hits of endpoint.
func (p *faultProxy) gaps(endpoint string, n int) []time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	ts := p.times[endpoint]
	if n > len(ts) {
		n = len(ts)
	}
	ts = ts[len(ts)-n:]
	var out []time.Duration
	for i := 1; i < len(ts); i++ {
		out = append(out, ts[i].Sub(ts[i-1]))
	}
	return out
}

const (
	nginx502 = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
	portal   = `<!DOCTYPE html><html lang="ru"><head><meta charset="utf-8"><title>Вход в сеть</title></head><body><form method="post" action="/login"><input name="user"><input type="password" name="pass"><button>Войти</button></form></body></html>`
)

func (p *faultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p.active.Add(1)
	defer p.active.Add(-1)
	ep := r.Method + " " + r.URL.Path
	p.mu.Lock()
	p.count[ep]++
	p.times[ep] = append(p.times[ep], time.Now())
	mode, sample := p.modes[ep], p.samples[ep]
	p.mu.Unlock()

	switch mode {
	case resetConn, cutMidBody:
		_, _ = io.Copy(io.Discard, r.Body)
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			http.Error(w, "cannot hijack", http.StatusInternalServerError)
			return
		}
		if mode == cutMidBody {
			fmt.Fprintf(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(sample), sample[:len(sample)/2])
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0) // close with RST
		}
		_ = conn.Close()
	case htmlErrorPage:
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusBadGateway)
		_, _ = io.WriteString(w, nginx502)
	case wrongContentType:
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = io.WriteString(w, portal)
	case truncatedJSON:
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, sample[:len(sample)/2])
	case oversizedBody, endlessStream:
		w.Header().Set("Content-Type", "application/json")
		if mode == oversizedBody {
			w.Header().Set("Content-Length", strconv.Itoa(10<<20))
		}
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, `{"token":"`)
		chunk := []byte(strings.Repeat("a", 64<<10))
		rc := http.NewResponseController(w)
		// 10 MB, or until the client hangs up (at most a minute, so a
		// client that never does cannot keep the suite alive).
		deadline := time.Now().Add(time.Minute)
		for sent := 10; mode == endlessStream || sent+len(chunk) <= 10<<20; sent += len(chunk) {
			if _, err := w.Write(chunk); err != nil || r.Context().Err() != nil || time.Now().After(deadline) {
				return
			}
			_ = rc.Flush()
		}
	default:
		p.rp.ServeHTTP(w, r)
	}
}
