package backend

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/common/expfmt"
)

// metrics is one mount's Prometheus registry: each backend has its own, never
// the library's global one, so two mounts count apart. Labels are bounded:
// provider, operation and outcome come from fixed sets, and config names are
// the only open label (one series per config, never per token or account).
type metrics struct {
	reg       *prometheus.Registry
	upstream  *prometheus.CounterVec   // provider, op, outcome
	latency   *prometheus.HistogramVec // provider, op
	creds     *prometheus.CounterVec   // config, role, outcome
	mints     *prometheus.CounterVec   // config, outcome
	rotations *prometheus.CounterVec   // config

	expiryOnce sync.Once
}

// counter is a series of one of the vectors above, looked up once and kept
// (see metricKeys).
type counter = prometheus.Counter

// latencyBuckets in seconds: from a cached loopback call to a stuck broker.
var latencyBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// metricsContentType is what <mount>/metrics has always answered with: the
// text format the library writes.
const metricsContentType = "text/plain; version=0.0.4"

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_upstream_requests_total",
			Help: "Calls to brokers by provider, operation and outcome.",
		}, []string{"provider", "op", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "broker_upstream_request_duration_seconds",
			Help:    "Latency of calls to brokers.",
			Buckets: latencyBuckets,
		}, []string{"provider", "op"}),
		creds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_creds_total",
			Help: "creds reads by config, role (empty for a read of the config itself) and outcome (hit: served from cache; miss: waited on a mint; error).",
		}, []string{"config", "role", "outcome"}),
		mints: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_mints_total",
			Help: "Tokens obtained from brokers by config and outcome.",
		}, []string{"config", "outcome"}),
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "broker_rotations_total",
			Help: "Rotations of long-lived secrets (a rotating refresh token replaced) by config.",
		}, []string{"config"}),
	}
	m.reg.MustRegister(m.upstream, m.latency, m.creds, m.mints, m.rotations,
		// The plugin process's goroutines, memory and file descriptors.
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// forget deletes a config's series (the config was deleted).
func (m *metrics) forget(config string) {
	for _, v := range []*prometheus.CounterVec{m.creds, m.mints, m.rotations} {
		v.DeletePartialMatch(prometheus.Labels{"config": config})
	}
}

// observeUpstream is the upstream client's hook for one provider.
func (m *metrics) observeUpstream(provider string) func(op, outcome string, d time.Duration) {
	return func(op, outcome string, d time.Duration) {
		m.upstream.WithLabelValues(provider, op, outcome).Inc()
		m.latency.WithLabelValues(provider, op).Observe(d.Seconds())
	}
}

var (
	tokenExpiryDesc = prometheus.NewDesc("broker_token_expiry_seconds",
		"Seconds until the cached token of a config expires.", []string{"config", "provider"}, nil)
	secretExpiryDesc = prometheus.NewDesc("broker_secret_expiry_seconds",
		"Seconds until the long-lived secret of a config expires, where known.", []string{"config", "provider"}, nil)
)

// expiryCollector computes the expiry gauges from the cached states when
// scraped, so nothing on the read path keeps them up to date.
type expiryCollector struct{ b *backend }

func (c expiryCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- tokenExpiryDesc
	ch <- secretExpiryDesc
}

func (c expiryCollector) Collect(ch chan<- prometheus.Metric) {
	b := c.b
	now := b.now()
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
			ch <- prometheus.MustNewConstMetric(tokenExpiryDesc, prometheus.GaugeValue, t.ExpiresAt.Sub(now).Seconds(), st.name, cfg.Provider)
		}
		exp := rec.SecretExpiresAt
		if exp.IsZero() {
			exp = cfg.SecretExpiresAt
		}
		if !exp.IsZero() {
			ch <- prometheus.MustNewConstMetric(secretExpiryDesc, prometheus.GaugeValue, exp.Sub(now).Seconds(), st.name, cfg.Provider)
		}
	}
}

// expose renders every metric of the mount in the text format. The expiry
// collector joins the registry on the first scrape: it reads the backend,
// which does not exist yet when newMetrics runs.
func (m *metrics) expose(b *backend) ([]byte, error) {
	m.expiryOnce.Do(func() { m.reg.MustRegister(expiryCollector{b}) })
	mfs, err := m.reg.Gather()
	if err != nil {
		return nil, fmt.Errorf("gathering metrics: %w", err)
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			return nil, fmt.Errorf("encoding metrics: %w", err)
		}
	}
	return buf.Bytes(), nil
}

func (b *backend) pathMetrics() []*framework.Path {
	return []*framework.Path{{
		Pattern: "metrics$",
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation: &framework.PathOperation{Callback: b.pathMetricsRead, Summary: "Prometheus metrics of this mount."},
		},
		HelpSynopsis:    "Metrics in Prometheus text format: upstream calls, cache hits, mints, rotations, expiries, and the plugin process's Go runtime and process metrics.",
		HelpDescription: "Scrape with a Vault token whose policy allows read on <mount>/metrics. Labels are provider, operation, outcome and config name only; never tokens or accounts.",
	}}
}

func (b *backend) pathMetricsRead(_ context.Context, _ *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	body, err := b.metrics.expose(b)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		logical.HTTPContentType: metricsContentType,
		logical.HTTPRawBody:     body,
		logical.HTTPStatusCode:  200,
	}}, nil
}
