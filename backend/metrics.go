package backend

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
)

// metrics is a small Prometheus-text registry. Labels are bounded: provider,
// operation and outcome come from fixed sets, and config names are the only
// open label (one series per config, never per token or account).
type metrics struct {
	mu       sync.RWMutex
	counters map[string]*atomic.Uint64 // rendered series name -> value
	hists    map[string]*histogram
}

type histogram struct {
	counts []uint64 // per bucket, cumulative when rendered
	sum    float64
	n      uint64
}

// latencyBuckets in seconds: from a cached loopback call to a stuck broker.
var latencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

func newMetrics() *metrics {
	return &metrics{counters: map[string]*atomic.Uint64{}, hists: map[string]*histogram{}}
}

func series(name string, labels ...string) string {
	if len(labels) == 0 {
		return name
	}
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('{')
	for i := 0; i+1 < len(labels); i += 2 {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%s=%q", labels[i], labels[i+1])
	}
	b.WriteByte('}')
	return b.String()
}

func (m *metrics) inc(name string, labels ...string) {
	m.incKey(series(name, labels...))
}

// incKey bumps a counter by its rendered series name. It is on the creds
// read path, so the common case takes only a shared lock and an atomic add.
func (m *metrics) incKey(key string) {
	m.mu.RLock()
	c := m.counters[key]
	m.mu.RUnlock()
	if c == nil {
		m.mu.Lock()
		if c = m.counters[key]; c == nil {
			c = new(atomic.Uint64)
			m.counters[key] = c
		}
		m.mu.Unlock()
	}
	c.Add(1)
}

func (m *metrics) observe(name string, v float64, labels ...string) {
	key := series(name, labels...)
	m.mu.Lock()
	h := m.hists[key]
	if h == nil {
		h = &histogram{counts: make([]uint64, len(latencyBuckets))}
		m.hists[key] = h
	}
	for i, le := range latencyBuckets {
		if v <= le {
			h.counts[i]++
			break
		}
	}
	h.sum += v
	h.n++
	m.mu.Unlock()
}

// observeUpstream is the upstream client's hook for one provider.
func (m *metrics) observeUpstream(provider string) func(op, outcome string, d time.Duration) {
	return func(op, outcome string, d time.Duration) {
		m.inc("broker_upstream_requests_total", "provider", provider, "op", op, "outcome", outcome)
		m.observe("broker_upstream_request_duration_seconds", d.Seconds(), "provider", provider, "op", op)
	}
}

// render writes every series in Prometheus text format, plus gauges computed
// now from the cached states.
func (m *metrics) render(gauges map[string]float64) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	typed := map[string]bool{}
	header := func(name, kind, help string) {
		if !typed[name] {
			typed[name] = true
			fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
		}
	}
	ck := make([]string, 0, len(m.counters))
	for k := range m.counters {
		ck = append(ck, k)
	}
	sort.Strings(ck)
	for _, k := range ck {
		name := k[:strings.IndexAny(k+"{", "{")]
		header(name, "counter", metricHelp[name])
		fmt.Fprintf(&b, "%s %d\n", k, m.counters[k].Load())
	}
	hk := make([]string, 0, len(m.hists))
	for k := range m.hists {
		hk = append(hk, k)
	}
	sort.Strings(hk)
	for _, k := range hk {
		h := m.hists[k]
		name, labels, _ := strings.Cut(strings.TrimSuffix(k, "}"), "{")
		header(name, "histogram", metricHelp[name])
		sep := ""
		if labels != "" {
			sep = ","
		}
		var cum uint64
		for i, le := range latencyBuckets {
			cum += h.counts[i]
			fmt.Fprintf(&b, "%s_bucket{%s%sle=\"%g\"} %d\n", name, labels, sep, le, cum)
		}
		fmt.Fprintf(&b, "%s_bucket{%s%sle=\"+Inf\"} %d\n", name, labels, sep, h.n)
		fmt.Fprintf(&b, "%s_sum{%s} %g\n%s_count{%s} %d\n", name, labels, h.sum, name, labels, h.n)
	}
	for _, k := range sortedKeysF(gauges) {
		name := k[:strings.IndexAny(k+"{", "{")]
		header(name, "gauge", metricHelp[name])
		v := gauges[k]
		if math.IsInf(v, 0) || math.IsNaN(v) {
			continue
		}
		fmt.Fprintf(&b, "%s %g\n", k, v)
	}
	return b.String()
}

var metricHelp = map[string]string{
	"broker_upstream_requests_total":           "Calls to brokers by provider, operation and outcome.",
	"broker_upstream_request_duration_seconds": "Latency of calls to brokers.",
	"broker_creds_total":                       "creds reads by config and outcome (hit: served from cache; miss: waited on a mint; error).",
	"broker_mints_total":                       "Tokens obtained from brokers by config and outcome.",
	"broker_rotations_total":                   "Rotations of long-lived secrets (ChatApp refresh) by config.",
	"broker_token_expiry_seconds":              "Seconds until the cached token of a config expires.",
	"broker_secret_expiry_seconds":             "Seconds until the long-lived secret of a config expires, where known.",
}

func sortedKeysF(m map[string]float64) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func (b *backend) pathMetrics() []*framework.Path {
	return []*framework.Path{{
		Pattern: "metrics$",
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathMetricsRead, Summary: "Prometheus metrics of this mount."},
		},
		HelpSynopsis:    "Metrics in Prometheus text format: upstream calls, cache hits, mints, rotations, expiries.",
		HelpDescription: "Scrape with a Vault token whose policy allows read on <mount>/metrics. Labels are provider, operation, outcome and config name only; never tokens or accounts.",
	}}
}

func (b *backend) pathMetricsRead(_ context.Context, _ *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	now := b.now()
	gauges := map[string]float64{}
	b.mu.RLock()
	states := make([]*configState, 0, len(b.states))
	for _, st := range b.states {
		states = append(states, st)
	}
	b.mu.RUnlock()
	for _, st := range states {
		st.mu.Lock()
		cfg, rec := st.cfg, st.rec
		st.mu.Unlock()
		if cfg == nil {
			continue
		}
		if t := rec.Token; t != nil && !t.ExpiresAt.IsZero() {
			gauges[series("broker_token_expiry_seconds", "config", st.name, "provider", cfg.Provider)] = t.ExpiresAt.Sub(now).Seconds()
		}
		if exp := rec.SecretExpiresAt; !exp.IsZero() {
			gauges[series("broker_secret_expiry_seconds", "config", st.name, "provider", cfg.Provider)] = exp.Sub(now).Seconds()
		} else if exp := cfg.SecretExpiresAt; !exp.IsZero() {
			gauges[series("broker_secret_expiry_seconds", "config", st.name, "provider", cfg.Provider)] = exp.Sub(now).Seconds()
		}
	}
	return &logical.Response{Data: map[string]any{
		logical.HTTPContentType: "text/plain; version=0.0.4",
		logical.HTTPRawBody:     []byte(b.metrics.render(gauges)),
		logical.HTTPStatusCode:  200,
	}}, nil
}
