package backend

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
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
	reg      *prometheus.Registry
	upstream *prometheus.CounterVec   // provider, op, outcome
	latency  *prometheus.HistogramVec // provider, op
	// The per-config and per-role counters live beside their state
	// (counts) and are exported by countCollector.

	expiryOnce sync.Once
	obsMu      sync.Mutex
	observers  map[string]func(op, outcome string, d time.Duration)
}

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
	}
	m.reg.MustRegister(m.upstream, m.latency,
		// The plugin process's goroutines, memory and file descriptors.
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observeUpstream is the upstream client's hook for one provider: one
// function per provider, shared by every config's client.
func (m *metrics) observeUpstream(provider string) func(op, outcome string, d time.Duration) {
	m.obsMu.Lock()
	defer m.obsMu.Unlock()
	if f, ok := m.observers[provider]; ok {
		return f
	}
	f := func(op, outcome string, d time.Duration) {
		m.upstream.WithLabelValues(provider, op, outcome).Inc()
		m.latency.WithLabelValues(provider, op).Observe(d.Seconds())
	}
	if m.observers == nil {
		m.observers = map[string]func(op, outcome string, d time.Duration){}
	}
	m.observers[provider] = f
	return f
}

var (
	credsDesc = prometheus.NewDesc("broker_creds_total",
		"creds reads by config, role (empty for a read of the config itself) and outcome (hit: served from cache; miss: waited on a mint; error).",
		[]string{"config", "role", "outcome"}, nil)
	mintsDesc = prometheus.NewDesc("broker_mints_total",
		"Tokens obtained from brokers by config and outcome.", []string{"config", "outcome"}, nil)
	rotationsDesc = prometheus.NewDesc("broker_rotations_total",
		"Rotations of long-lived secrets (a rotating refresh token replaced) by config.", []string{"config"}, nil)
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
	b.eachLoaded(func(name string, cfg *brokerConfig, rec tokenRecord) {
		if t := rec.Token; t != nil && !t.ExpiresAt.IsZero() {
			ch <- prometheus.MustNewConstMetric(tokenExpiryDesc, prometheus.GaugeValue, t.ExpiresAt.Sub(now).Seconds(), name, cfg.Provider)
		}
		exp := rec.SecretExpiresAt
		if exp.IsZero() {
			exp = cfg.SecretExpiresAt
		}
		if !exp.IsZero() {
			ch <- prometheus.MustNewConstMetric(secretExpiryDesc, prometheus.GaugeValue, exp.Sub(now).Seconds(), name, cfg.Provider)
		}
	})
}

// countCollector exports the counters of every config that exists and of
// every role over one: a deleted config's or role's series are gone with it.
type countCollector struct{ b *backend }

func (c countCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- credsDesc
	ch <- mintsDesc
	ch <- rotationsDesc
}

func (c countCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v *atomic.Uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v.Load()), labels...)
	}
	present := map[string]bool{}
	c.b.eachState(func(name string, n *counts) {
		present[name] = true
		counter(credsDesc, &n.hit, name, "", "hit")
		counter(credsDesc, &n.miss, name, "", "miss")
		counter(credsDesc, &n.credsErr, name, "", "error")
		counter(mintsDesc, &n.refreshOK, name, "ok")
		counter(mintsDesc, &n.refreshErr, name, "error")
		counter(rotationsDesc, &n.rotate, name)
	})
	c.b.roles.each(func(r *roleEntry) {
		if present[r.Config] {
			counter(credsDesc, &r.counts.hit, r.Config, r.Name, "hit")
			counter(credsDesc, &r.counts.miss, r.Config, r.Name, "miss")
			counter(credsDesc, &r.counts.credsErr, r.Config, r.Name, "error")
		}
	})
}

// expose renders every metric of the mount in the text format. The expiry
// collector joins the registry on the first scrape: it reads the backend,
// which does not exist yet when newMetrics runs.
func (m *metrics) expose(b *backend) ([]byte, error) {
	m.expiryOnce.Do(func() { m.reg.MustRegister(expiryCollector{b}, countCollector{b}) })
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
