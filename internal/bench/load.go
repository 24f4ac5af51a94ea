package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"
)

// client sends load to Vault's HTTP API over keep-alive connections, the way
// a bot's HTTP library does (not the CLI, whose process start would dwarf
// what is measured).
type client struct {
	addr  string
	token string
	http  *http.Client
}

func newClient(addr, token string) *client {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        4096,
		MaxIdleConnsPerHost: 4096,
		IdleConnTimeout:     5 * time.Minute,
		// Vault answers plain JSON; keep gzip out of the measurement.
		DisableCompression: true,
	}
	return &client{addr: addr, token: token, http: &http.Client{Transport: tr, Timeout: 2 * time.Minute}}
}

// result is one request's outcome.
type result struct {
	status int
	bytes  int
	body   []byte // only when asked for
	err    error
}

// do sends one request (path without /v1/) and reads the whole body so the
// connection goes back to the pool.
func (c *client) do(ctx context.Context, method, path string, body any, keepBody bool) result {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return result{err: err}
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.addr+"/v1/"+path, rd)
	if err != nil {
		return result{err: err}
	}
	req.Header.Set("X-Vault-Token", c.token)
	resp, err := c.http.Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	r := result{status: resp.StatusCode}
	if keepBody || resp.StatusCode >= 300 {
		r.body, r.err = io.ReadAll(resp.Body)
		r.bytes = len(r.body)
	} else {
		n, err := io.Copy(io.Discard, resp.Body)
		r.bytes, r.err = int(n), err
	}
	return r
}

// check returns nil for a 2xx answer, else an error naming what Vault said.
func (r result) check(what string) error {
	if r.err != nil {
		return fmt.Errorf("%s: %w", what, r.err)
	}
	if r.status < 200 || r.status >= 300 {
		return fmt.Errorf("%s: HTTP %d: %s", what, r.status, bytes.TrimSpace(r.body))
	}
	return nil
}

// apiJSON sends a request and decodes a 2xx JSON answer into out (may be nil).
func (c *client) apiJSON(ctx context.Context, method, path string, body, out any) error {
	r := c.do(ctx, method, path, body, true)
	if err := r.check(method + " " + path); err != nil {
		return err
	}
	if out != nil && len(r.body) > 0 {
		return json.Unmarshal(r.body, out)
	}
	return nil
}

// sample collects latencies of one target.
type sample struct {
	mu      sync.Mutex
	lat     []time.Duration
	errors  int
	lastErr string
	bytes   int
	elapsed time.Duration // wall time the target was under load
}

func (s *sample) add(d time.Duration, r result) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.err != nil || r.status != http.StatusOK {
		s.errors++
		if r.err != nil {
			s.lastErr = r.err.Error()
		} else {
			s.lastErr = fmt.Sprintf("HTTP %d: %s", r.status, truncate(string(bytes.TrimSpace(r.body)), 300))
		}
		return
	}
	s.lat = append(s.lat, d)
	s.bytes = r.bytes
}

func (s *sample) merge(o *sample) {
	s.lat = append(s.lat, o.lat...)
	s.errors += o.errors
	if o.lastErr != "" {
		s.lastErr = o.lastErr
	}
	if o.bytes > 0 {
		s.bytes = o.bytes
	}
	s.elapsed += o.elapsed
}

// closedLoop runs n clients, each sending its next request as soon as the
// previous one is answered, until d has passed. onResult, if set, sees
// every answer with the time its request was sent.
func closedLoop(ctx context.Context, c *client, path string, n int, d time.Duration, onResult func(sent time.Time, lat time.Duration, r result)) *sample {
	s := &sample{}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var wg sync.WaitGroup
	start := time.Now()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := &sample{}
			for ctx.Err() == nil {
				t := time.Now()
				r := c.do(context.WithoutCancel(ctx), http.MethodGet, path, nil, false)
				lat := time.Since(t)
				local.add(lat, r)
				if onResult != nil {
					onResult(t, lat, r)
				}
			}
			s.mu.Lock()
			s.merge(local)
			s.mu.Unlock()
		}()
	}
	wg.Wait()
	s.elapsed = time.Since(start)
	return s
}

// openLoop sends rate requests a second for d, each timed from the moment it
// was due (so a stalled client shows up as latency, not as fewer requests).
// onResult, if set, sees every answer.
func openLoop(ctx context.Context, c *client, path string, rate int, d time.Duration, onResult func(due time.Time, lat time.Duration, r result)) *sample {
	s := &sample{}
	interval := time.Second / time.Duration(rate)
	total := int(d / interval)
	start := time.Now()
	var wg sync.WaitGroup
	for i := range total {
		due := start.Add(time.Duration(i) * interval)
		if w := time.Until(due); w > 0 {
			select {
			case <-time.After(w):
			case <-ctx.Done():
			}
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := c.do(context.WithoutCancel(ctx), http.MethodGet, path, nil, false)
			lat := time.Since(due)
			s.add(lat, r)
			if onResult != nil {
				onResult(due, lat, r)
			}
		}()
	}
	wg.Wait()
	s.elapsed = time.Since(start)
	return s
}

// stats summarise a sample.
type stats struct {
	N          int     `json:"n"`
	Errors     int     `json:"errors"`
	LastError  string  `json:"last_error,omitempty"`
	P50ms      float64 `json:"p50_ms"`
	P90ms      float64 `json:"p90_ms"`
	P99ms      float64 `json:"p99_ms"`
	P999ms     float64 `json:"p999_ms"`
	MaxMs      float64 `json:"max_ms"`
	MeanMs     float64 `json:"mean_ms"`
	RPS        float64 `json:"throughput_rps,omitempty"`
	RespBytes  int     `json:"response_bytes,omitempty"`
	SecondsRun float64 `json:"seconds_under_load,omitempty"`
}

func (s *sample) stats() stats {
	lat := slices.Clone(s.lat)
	slices.Sort(lat)
	st := stats{N: len(lat), Errors: s.errors, LastError: s.lastErr, RespBytes: s.bytes}
	if len(lat) == 0 {
		return st
	}
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	st.P50ms = ms(quantile(lat, 0.50))
	st.P90ms = ms(quantile(lat, 0.90))
	st.P99ms = ms(quantile(lat, 0.99))
	st.P999ms = ms(quantile(lat, 0.999))
	st.MaxMs = ms(lat[len(lat)-1])
	st.MeanMs = ms(sum / time.Duration(len(lat)))
	if s.elapsed > 0 {
		st.RPS = round(float64(len(lat)+s.errors)/s.elapsed.Seconds(), 1)
		st.SecondsRun = round(s.elapsed.Seconds(), 2)
	}
	return st
}

// countOver counts latencies above d.
func (s *sample) countOver(d time.Duration) int {
	n := 0
	for _, l := range s.lat {
		if l > d {
			n++
		}
	}
	return n
}

// quantile of sorted lat (nearest rank).
func quantile(lat []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(lat)))) - 1
	return lat[max(0, min(i, len(lat)-1))]
}

func ms(d time.Duration) float64 { return round(float64(d)/float64(time.Millisecond), 3) }

func round(f float64, digits int) float64 {
	p := math.Pow10(digits)
	return math.Round(f*p) / p
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return round(a/b, 3)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
