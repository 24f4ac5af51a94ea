package backend

import (
	"context"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func TestMetricsExposition(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("finam", map[string]any{"verify": false})
	for range 3 {
		h.ok(logical.ReadOperation, "creds/finam", nil)
	}
	h.do(logical.ReadOperation, "creds/nope", nil)
	resp := h.ok(logical.ReadOperation, "metrics", nil)
	if resp.Data[logical.HTTPContentType] != "text/plain; version=0.0.4" {
		t.Fatalf("content type %v", resp.Data[logical.HTTPContentType])
	}
	text := string(resp.Data[logical.HTTPRawBody].([]byte))
	// The library writes labels sorted by name; the series are found by
	// their label set, whatever the order.
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"broker_creds_total", []string{"config", "finam", "role", "", "outcome", "miss"}, 1},
		{"broker_creds_total", []string{"config", "finam", "role", "", "outcome", "hit"}, 2},
		{"broker_mints_total", []string{"config", "finam", "outcome", "ok"}, 1},
		{"broker_upstream_requests_total", []string{"provider", "finam", "op", "POST /v1/sessions", "outcome", "ok"}, 1},
		{"broker_upstream_request_duration_seconds_count", []string{"provider", "finam", "op", "POST /v1/sessions/details"}, 1},
	} {
		if got, ok := sampleValue(t, text, want.name, want.labels...); !ok || got != want.value {
			t.Errorf("metrics: %s%v = %v (found %v), want %v", want.name, want.labels, got, ok, want.value)
		}
	}
	if want := `# TYPE broker_token_expiry_seconds gauge`; !strings.Contains(text, want) {
		t.Errorf("metrics lack %q", want)
	}
	if strings.Contains(text, "nope") {
		t.Error("a read of a missing config created a series")
	}
	if strings.Contains(text, sandbox.FinamSecret) || strings.Contains(text, "eyJ") {
		t.Error("metrics show a secret or a token")
	}
	h.b.mu.RLock()
	_, kept := h.b.states["nope"]
	h.b.mu.RUnlock()
	if kept {
		t.Error("a read of a missing config kept state in memory")
	}
}

// sampleValue finds one series of the exposition by name and label set (in
// any order); name may end in _count or _sum for a histogram.
func sampleValue(t *testing.T, text, name string, labels ...string) (float64, bool) {
	t.Helper()
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("the exposition does not parse: %v", err)
	}
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	family, part := name, ""
	if mfs[name] == nil {
		for _, suffix := range []string{"_count", "_sum"} {
			if base, ok := strings.CutSuffix(name, suffix); ok && mfs[base] != nil {
				family, part = base, suffix
			}
		}
	}
	mf := mfs[family]
	if mf == nil {
		return 0, false
	}
	for _, m := range mf.GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		if !maps.Equal(got, want) {
			continue
		}
		switch {
		case part == "_count":
			return float64(m.GetHistogram().GetSampleCount()), true
		case part == "_sum":
			return m.GetHistogram().GetSampleSum(), true
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

func scrape(t *testing.T, c *harness, b *backend) string {
	t.Helper()
	resp, err := c.doOn(b, logical.ReadOperation, "metrics", nil)
	if err != nil || resp == nil || resp.IsError() {
		t.Fatalf("read metrics: err=%v resp=%v", err, resp)
	}
	if ct := resp.Data[logical.HTTPContentType]; ct != "text/plain; version=0.0.4" {
		t.Fatalf("content type %v", ct)
	}
	return string(resp.Data[logical.HTTPRawBody].([]byte))
}

// Every family of the mount shows with its HELP and TYPE, and so do the Go
// runtime and process metrics of the plugin.
func TestMetricsFamiliesHelpAndType(t *testing.T) {
	f := chatLike() // rotating, with a secret expiry: every broker_ family
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": f.name, "secret": "s1", "refresh_token": "seed-1", "verify": false})
	c.token("creds/x")
	c.token("creds/x")
	// The fake broker makes no HTTP call: feed the upstream hook as the
	// upstream client does.
	c.b.metrics.observeUpstream(f.name)("POST /v1/token", "ok", 30*time.Millisecond)

	text := scrape(t, c, c.b)
	for _, fam := range []struct{ name, kind, help string }{
		{"broker_upstream_requests_total", "counter", "Calls to brokers by provider, operation and outcome."},
		{"broker_upstream_request_duration_seconds", "histogram", "Latency of calls to brokers."},
		{"broker_creds_total", "counter", "creds reads by config, role (empty for a read of the config itself) and outcome (hit: served from cache; miss: waited on a mint; error)."},
		{"broker_mints_total", "counter", "Tokens obtained from brokers by config and outcome."},
		{"broker_rotations_total", "counter", "Rotations of long-lived secrets (a rotating refresh token replaced) by config."},
		{"broker_token_expiry_seconds", "gauge", "Seconds until the cached token of a config expires."},
		{"broker_secret_expiry_seconds", "gauge", "Seconds until the long-lived secret of a config expires, where known."},
	} {
		for _, want := range []string{
			"# HELP " + fam.name + " " + fam.help + "\n",
			"# TYPE " + fam.name + " " + fam.kind + "\n",
		} {
			if !strings.Contains(text, want) {
				t.Errorf("metrics lack %q", want)
			}
		}
	}
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"broker_upstream_requests_total", []string{"provider", f.name, "op", "POST /v1/token", "outcome", "ok"}, 1},
		{"broker_upstream_request_duration_seconds_count", []string{"provider", f.name, "op", "POST /v1/token"}, 1},
		{"broker_creds_total", []string{"config", "x", "role", "", "outcome", "miss"}, 1},
		{"broker_creds_total", []string{"config", "x", "role", "", "outcome", "hit"}, 1},
		{"broker_mints_total", []string{"config", "x", "outcome", "ok"}, 1},
		{"broker_mints_total", []string{"config", "x", "outcome", "error"}, 0},
		{"broker_rotations_total", []string{"config", "x"}, 1},
		{"broker_token_expiry_seconds", []string{"config", "x", "provider", f.name}, f.life.Seconds()},
		{"broker_secret_expiry_seconds", []string{"config", "x", "provider", f.name}, (14 * 24 * time.Hour).Seconds()},
	} {
		if got, ok := sampleValue(t, text, want.name, want.labels...); !ok || got != want.value {
			t.Errorf("metrics: %s%v = %v (found %v), want %v", want.name, want.labels, got, ok, want.value)
		}
	}
	for _, want := range []string{"# TYPE go_goroutines gauge", "# TYPE go_memstats_heap_alloc_bytes gauge", "# TYPE process_resident_memory_bytes gauge"} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// Two mounts count apart, and neither uses the library's global registry.
func TestMetricsPerMount(t *testing.T) {
	one, two := newFakeHarness(t, finamLike()), newFakeHarness(t, finamLike())
	for _, c := range []*harness{one, two} {
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1", "verify": false})
	}
	for range 3 {
		one.token("creds/x")
	}
	two.token("creds/x")

	for _, tc := range []struct {
		c         *harness
		hit, miss float64
	}{{one, 2, 1}, {two, 0, 1}} {
		text := scrape(t, tc.c, tc.c.b)
		hit, _ := sampleValue(t, text, "broker_creds_total", "config", "x", "role", "", "outcome", "hit")
		miss, _ := sampleValue(t, text, "broker_creds_total", "config", "x", "role", "", "outcome", "miss")
		if hit != tc.hit || miss != tc.miss {
			t.Errorf("mount counted hit=%v miss=%v, want hit=%v miss=%v", hit, miss, tc.hit, tc.miss)
		}
	}
	if one.b.metrics.reg == two.b.metrics.reg {
		t.Error("two mounts share a registry")
	}
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), "broker_") {
			t.Errorf("%s is in the global registry", mf.GetName())
		}
	}
}

func TestStaleTokenServedWithWarning(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{FinamTokenLifetime: 9 * time.Second})
	h.writeFinam("finam", nil)
	h.sb.InjectFault(sessionsEP, 503, -1)
	h.clock.Advance(6600 * time.Millisecond)
	h.ok(logical.ReadOperation, "creds/finam", nil) // starts the failing refresh
	waitIdle(t, h.b, "finam")
	if r := h.ok(logical.ReadOperation, "creds/finam", nil); len(r.Warnings) == 0 || !containsAll(r.Warnings[0], "serving the cached token", "HTTP 503") {
		t.Fatal("no warning while serving a token the broker could not refresh")
	}
}

// BenchmarkCredsReadHit measures a creds read served from the cached token:
// the hot path, which bumps one per-config counter.
func BenchmarkCredsReadHit(b *testing.B) {
	do, _ := benchCredsBackend(b)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		do(logical.ReadOperation, "creds/x", nil)
	}
}

// BenchmarkCredsReadHitParallel is the same read from every core at once,
// where a shared lock or counter would show as contention.
func BenchmarkCredsReadHitParallel(b *testing.B) {
	do, _ := benchCredsBackend(b)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			do(logical.ReadOperation, "creds/x", nil)
		}
	})
}

// benchCredsBackend is a backend with one config of the fake broker and its
// token cached; the returned check fails the benchmark if a read minted.
func benchCredsBackend(b *testing.B) (func(logical.Operation, string, map[string]any) *logical.Response, *fakeBroker) {
	b.Helper()
	f := finamLike()
	f.clock = newFakeClock()
	conf := logical.TestBackendConfig()
	conf.Logger = hclog.NewNullLogger()
	storage := &logical.InmemStorage{}
	conf.StorageView = storage
	lb, err := FactoryWith(Options{Version: "test", Providers: map[string]provider.Provider{f.name: f}, Clock: f.clock})(context.Background(), conf)
	if err != nil {
		b.Fatal(err)
	}
	be := lb.(*backend)
	b.Cleanup(func() { be.Clean(context.Background()) })
	if err := be.initialize(context.Background(), &logical.InitializationRequest{Storage: storage}); err != nil {
		b.Fatal(err)
	}
	do := func(op logical.Operation, path string, data map[string]any) *logical.Response {
		resp, err := be.HandleRequest(context.Background(), &logical.Request{Operation: op, Path: path, Storage: storage, Data: data})
		if err != nil || (resp != nil && resp.IsError()) {
			b.Fatalf("%s %s: err=%v resp=%v", op, path, err, resp)
		}
		return resp
	}
	do(logical.CreateOperation, "config/x", map[string]any{"provider": f.name, "secret": "s1"})
	do(logical.ReadOperation, "creds/x", nil) // warm the cache
	calls := f.callCount()
	b.Cleanup(func() {
		if n := f.callCount() - calls; n != 0 {
			b.Errorf("the broker was called %d times during the benchmark: not all reads were hits", n)
		}
	})
	return do, f
}
