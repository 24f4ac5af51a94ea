package backend

import (
	"context"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

const (
	sessionsEP = "POST /v1/sessions"
	detailsEP  = "POST /v1/sessions/details"
)

type harness struct {
	t *testing.T
	// skipped is how far skip has moved the harness clock past real time.
	// The one clock (now) is the backends' and the sandbox's: a token ages
	// on both sides of the wire at once, without the test sleeping.
	skipped atomic.Int64
	b       *backend
	storage logical.Storage
	sb      *sandbox.Server
	url     string
}

// newHarness starts a sandbox on loopback and a backend on in-memory
// storage, both on the harness clock.
func newHarness(t *testing.T, opts sandbox.Options) *harness {
	t.Helper()
	h := &harness{t: t}
	opts.Now = h.now
	h.sb = sandbox.New(opts)
	srv := httptest.NewServer(h.sb)
	t.Cleanup(srv.Close)
	h.url = srv.URL
	h.b, h.storage = h.newBackend(nil)
	return h
}

// now is the harness clock: real time moved on by every skip.
func (h *harness) now() time.Time { return time.Now().Add(time.Duration(h.skipped.Load())) }

// newBackend builds a backend, on the given storage or a fresh one.
func (h *harness) newBackend(s logical.Storage) (*backend, logical.Storage) {
	h.t.Helper()
	conf := logical.TestBackendConfig()
	if s != nil {
		conf.StorageView = s
	} else {
		conf.StorageView = &logical.InmemStorage{}
	}
	lb, err := FactoryWith(Options{Version: "v0.0.0-test", Clock: h.now})(context.Background(), conf)
	if err != nil {
		h.t.Fatal(err)
	}
	b := lb.(*backend)
	h.t.Cleanup(func() { b.Clean(context.Background()) })
	if err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: conf.StorageView}); err != nil {
		h.t.Fatal(err)
	}
	return b, conf.StorageView
}

func (h *harness) do(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	h.t.Helper()
	return h.doOn(h.b, op, path, data)
}

func (h *harness) doOn(b *backend, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	h.t.Helper()
	return request(b, h.storage, op, path, data)
}

// request sends one request to b as Vault's router would.
func request(b *backend, s logical.Storage, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	req := &logical.Request{Operation: op, Path: path, Storage: s, Data: data}
	if op == logical.CreateOperation || op == logical.UpdateOperation {
		checked, exists, err := b.HandleExistenceCheck(context.Background(), req)
		if err != nil {
			// Vault answers a field that fails conversion here with a 400.
			return nil, err
		}
		// As Vault does: a path without an existence check is an update.
		req.Operation = logical.UpdateOperation
		if checked && !exists {
			req.Operation = logical.CreateOperation
		}
	}
	return b.HandleRequest(context.Background(), req)
}

// mustOK fails the test unless the request succeeded.
func (h *harness) mustOK(op logical.Operation, path string, data map[string]any) *logical.Response {
	h.t.Helper()
	resp, err := h.do(op, path, data)
	if err != nil || (resp != nil && resp.IsError()) {
		h.t.Fatalf("%s %s: err=%v resp=%v", op, path, err, resp)
	}
	return resp
}

// writeFinam writes config/<name> for the sandbox's trading secret.
func (h *harness) writeFinam(name string, extra map[string]any) *logical.Response {
	h.t.Helper()
	data := map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url}
	for k, v := range extra {
		data[k] = v
	}
	return h.mustOK(logical.UpdateOperation, "config/"+name, data)
}

// errText returns the error a request produced, from either channel.
func errText(resp *logical.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	if resp != nil && resp.IsError() {
		return resp.Error().Error()
	}
	return ""
}

func statusOf(resp *logical.Response, err error) int {
	if err != nil {
		if ce, ok := err.(logical.HTTPCodedError); ok {
			return ce.Code()
		}
		if _, ok := err.(errutil.UserError); ok {
			return 400
		}
		return 500
	}
	if resp != nil && resp.IsError() {
		return 400
	}
	return 200
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

// skip moves the harness clock on by d, as if d had passed: every token
// ages by d, in the backends and in the sandbox alike.
func (h *harness) skip(d time.Duration) { h.skipped.Add(int64(d)) }

// coreHarness is a backend on gated in-memory storage with fake brokers and
// a fake clock.
type coreHarness struct {
	t       testing.TB
	clock   *fakeClock
	brokers map[string]*fakeBroker
	raw     *logical.InmemStorage
	storage *gateStorage
	b       *backend
}

// It takes a testing.TB so that benchmarks (periodic_bench_test.go) build
// the same backend as the tests.
func newCoreHarness(t testing.TB, brokers ...*fakeBroker) *coreHarness {
	t.Helper()
	c := &coreHarness{t: t, clock: newFakeClock(), brokers: map[string]*fakeBroker{}, raw: &logical.InmemStorage{}}
	c.storage = &gateStorage{Storage: c.raw}
	for _, f := range brokers {
		f.clock = c.clock
		c.brokers[f.name] = f
	}
	c.b = c.newBackend(nil)
	return c
}

// newBackend builds another backend on the same storage (a restart, a
// reload, another node); sys overrides the system view when set.
func (c *coreHarness) newBackend(sys logical.SystemView) *backend {
	c.t.Helper()
	conf := logical.TestBackendConfig()
	conf.StorageView = c.storage
	if sys != nil {
		conf.System = sys
	}
	provs := map[string]provider.Provider{}
	for n, f := range c.brokers {
		provs[n] = f
	}
	lb, err := FactoryWith(Options{Version: "test", Providers: provs, Clock: c.clock.Now})(context.Background(), conf)
	if err != nil {
		c.t.Fatal(err)
	}
	b := lb.(*backend)
	c.t.Cleanup(func() { b.Clean(context.Background()) })
	// As Vault does on the active node before the mount serves: a failure
	// is logged and the mount serves anyway (the migration runs again at
	// the next start; the schedule scans storage meanwhile).
	if err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: c.storage}); err != nil {
		c.t.Logf("initialize: %v", err)
	}
	return b
}

// setSchema rewrites the stored schema version (to replay an upgrade).
func (c *coreHarness) setSchema(v int) {
	c.t.Helper()
	e, _ := logical.StorageEntryJSON(schemaKey, schemaRecord{Version: v})
	if err := c.raw.Put(context.Background(), e); err != nil {
		c.t.Fatal(err)
	}
}

func (c *coreHarness) do(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	return c.doOn(c.b, op, path, data)
}

func (c *coreHarness) doOn(b *backend, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	return request(b, c.storage, op, path, data)
}

func (c *coreHarness) ok(op logical.Operation, path string, data map[string]any) *logical.Response {
	c.t.Helper()
	resp, err := c.do(op, path, data)
	if err != nil || (resp != nil && resp.IsError()) {
		c.t.Fatalf("%s %s: err=%v resp=%v", op, path, err, resp)
	}
	return resp
}

func (c *coreHarness) token(path string) string {
	c.t.Helper()
	return c.ok(logical.ReadOperation, path, nil).Data["access_token"].(string)
}

// stored reads the token record as storage holds it.
func (c *coreHarness) stored(name string) (tokenRecord, bool) {
	c.t.Helper()
	e, err := c.raw.Get(context.Background(), tokenPrefix+name)
	if err != nil {
		c.t.Fatal(err)
	}
	if e == nil {
		return tokenRecord{}, false
	}
	var rec tokenRecord
	if err := e.DecodeJSON(&rec); err != nil {
		c.t.Fatal(err)
	}
	return rec, true
}

// queued waits until a goroutine is blocked on name's upstream or owner
// lock, or done is closed: either way the writer under test has reached the
// point the race is about. It polls a counter, never a timer.
func (c *coreHarness) queued(name string, done <-chan struct{}) {
	c.t.Helper()
	until(c.t, "the writer neither finished nor queued on the config", func() bool {
		select {
		case <-done:
			return true
		default:
		}
		c.b.mu.RLock()
		st := c.b.states[name]
		c.b.mu.RUnlock()
		return st != nil && st.waiting.Load() > 0
	})
}

// waitIdle waits for the backend's background mints of name to finish.
func (c *coreHarness) waitIdle(name string) {
	c.t.Helper()
	waitIdle(c.t, c.b, name)
}

// inState runs fn on a config's in-memory state, under its mutex.
func (c *coreHarness) inState(name string, fn func(st *configState)) {
	c.t.Helper()
	c.b.mu.RLock()
	st := c.b.states[name]
	c.b.mu.RUnlock()
	if st == nil {
		c.t.Fatalf("config %q has no in-memory state", name)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	fn(st)
}

// waitIdle waits until no mint of name is under way on b: it waits on the
// flights' done channels (each wait bounded by brokertest.WaitBound), never
// sleeps.
func waitIdle(t testing.TB, b *backend, name string) {
	t.Helper()
	for {
		b.mu.RLock()
		st := b.states[name]
		b.mu.RUnlock()
		if st == nil {
			return
		}
		st.mu.Lock()
		f := st.own.flight
		for _, sl := range st.narrowed {
			if f == nil {
				f = sl.flight
			}
		}
		st.mu.Unlock()
		if f == nil {
			return
		}
		waitFor(t, f.done, "a refresh of "+name+" never finished")
	}
}

// waitFor receives from ch, failing the test with what (what did not
// happen) after brokertest.WaitBound: every wait of a backend test is
// bounded, so a slip fails the one test, by name, instead of hanging the
// package until go test's 10-minute panic.
func waitFor[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	return brokertest.Wait(t, ch, what)
}

// waitGroup waits for wg within brokertest.WaitBound, failing with what.
func waitGroup(t testing.TB, wg *sync.WaitGroup, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	waitFor(t, done, what)
}

// until spins (yielding, never sleeping) until cond holds, failing after brokertest.WaitBound:
// for a condition only a counter shows, such as a goroutine queued on a lock.
func until(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(brokertest.WaitBound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal(what)
		}
		runtime.Gosched()
	}
}

// rotatingConfig is a backend with a rotating fake broker (ChatApp's shape)
// and config/x written against it with the seed refresh token seed-1.
func rotatingConfig(t *testing.T) (*fakeBroker, *coreHarness) {
	t.Helper()
	f := chatLike()
	c := newCoreHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
	return f, c
}
