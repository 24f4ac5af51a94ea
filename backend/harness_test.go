package backend

import (
	"context"
	"errors"
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
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

const (
	sessionsEP = "POST /v1/sessions"
	detailsEP  = "POST /v1/sessions/details"
)

// harness is a backend on gated in-memory storage, with the test's one
// clock. What the backend talks to names the constructor:
//
//   - newSandboxHarness: the built-in providers against internal/sandbox, the
//     brokers' HTTP fakes, served on loopback (sb, url);
//   - newFakeHarness: fakeBrokers, test doubles called in process (brokers).
//
// The storage is always a gateStorage over raw: with nothing held or
// failed it is the SDK's InmemStorage (a cancelled context fails a call in
// both), and any test can hold or fail a chosen Put, Get or Delete. raw is
// the same storage without the gate, for reading what is stored.
type harness struct {
	t testing.TB
	// clock is the backends' and the brokers' (sandbox or fakes) one clock:
	// a token ages on both sides of the wire at once, without the test
	// sleeping. See harnessClock for its two modes.
	clock   harnessClock
	raw     *logical.InmemStorage
	storage *gateStorage
	b       *backend
	// sb and url: the sandbox and its address (newSandboxHarness only).
	sb  *sandbox.Server
	url string
	// brokers: the fake brokers by name (newFakeHarness only; nil means the
	// backend has the built-in registry).
	brokers map[string]*fakeBroker
}

// harnessClock is a harness's clock; Advance(d) moves it on by d, as if d
// had passed. It has two modes, one per constructor:
//
//   - the sandbox's is real time plus what Advance added (offsetClock),
//     never frozen: a test that makes many broker calls lets real time
//     refill the rate limits (the backend's, and the sandbox's own
//     windows) as it would in production; sandboxHarnessOn takes a frozen
//     one for a test that must see each wait;
//   - the fakes' is frozen (fakeClock, clocktest): nothing moves it but
//     Advance, so a race test opens its window at an exact instant and an
//     expiry falls where the test put it.
//
// It is also what the backend's broker calls wait on (upstream.Clock): the
// offset clock's waits are real, the frozen one's move it at once.
type harnessClock interface {
	upstream.Clock
	Advance(d time.Duration)
}

// offsetClock is real time moved on by every Advance.
type offsetClock struct{ offset atomic.Int64 }

func (c *offsetClock) Now() time.Time          { return time.Now().Add(time.Duration(c.offset.Load())) }
func (c *offsetClock) Advance(d time.Duration) { c.offset.Add(int64(d)) }
func (c *offsetClock) Sleep(ctx context.Context, d time.Duration) error {
	return upstream.SystemClock{}.Sleep(ctx, d)
}

// gatedHarness returns a harness on fresh gated storage, with no backend yet.
func gatedHarness(t testing.TB, clock harnessClock) *harness {
	h := &harness{t: t, clock: clock, raw: &logical.InmemStorage{}}
	h.storage = &gateStorage{Storage: h.raw}
	return h
}

// newSandboxHarness starts a sandbox on loopback and a backend with the
// built-in providers, both on the harness clock (real time plus offset).
func newSandboxHarness(t testing.TB, opts sandbox.Options) *harness {
	t.Helper()
	return sandboxHarnessOn(t, &offsetClock{}, opts)
}

// sandboxHarnessOn is newSandboxHarness on a given clock: a frozen one for
// a test that must see each wait of the backend's broker calls (the
// sandbox's own rate windows then move only when the test or a wait
// moves the clock).
func sandboxHarnessOn(t testing.TB, clock harnessClock, opts sandbox.Options) *harness {
	t.Helper()
	h := gatedHarness(t, clock)
	opts.Now = h.clock.Now
	h.sb = sandbox.New(opts)
	srv := httptest.NewServer(h.sb)
	t.Cleanup(srv.Close)
	h.url = srv.URL
	h.b = h.newBackend(nil)
	return h
}

// newFakeHarness builds a backend whose only providers are brokers, all on
// the harness clock (a frozen fakeClock). It takes a testing.TB so that
// benchmarks (periodic_bench_test.go) build the same backend as the tests.
func newFakeHarness(t testing.TB, brokers ...*fakeBroker) *harness {
	t.Helper()
	clock := newFakeClock()
	h := gatedHarness(t, clock)
	h.brokers = map[string]*fakeBroker{}
	for _, f := range brokers {
		f.clock = clock
		h.brokers[f.name] = f
	}
	h.b = h.newBackend(nil)
	return h
}

// newBackend builds another backend on the same storage (a restart, a
// reload, another node); sys overrides the system view when set.
func (h *harness) newBackend(sys logical.SystemView) *backend {
	h.t.Helper()
	return h.backendOn(h.storage, sys)
}

// freshBackend builds a backend on fresh storage of its own, sharing only
// the harness's clock and providers (the sandbox or the fakes).
func (h *harness) freshBackend() *backend {
	h.t.Helper()
	return h.backendOn(&logical.InmemStorage{}, nil)
}

func (h *harness) backendOn(s logical.Storage, sys logical.SystemView) *backend {
	h.t.Helper()
	conf := logical.TestBackendConfig()
	conf.StorageView = s
	if sys != nil {
		conf.System = sys
	}
	opts := Options{Version: "v0.0.0-test", Clock: h.clock}
	if h.brokers != nil {
		opts.Providers = map[string]provider.Provider{}
		for n, f := range h.brokers {
			opts.Providers[n] = f
		}
	}
	lb, err := FactoryWith(opts)(context.Background(), conf)
	if err != nil {
		h.t.Fatal(err)
	}
	b := lb.(*backend)
	h.t.Cleanup(func() { b.Clean(context.Background()) })
	// As Vault does on the active node before the mount serves: a failure
	// is logged and the mount serves anyway (the migration runs again at
	// the next start; the schedule scans storage meanwhile). A test expects
	// that only from a failure it injected; any other fails the test.
	if err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: s}); err != nil {
		if !errors.Is(err, errInjected) {
			h.t.Fatalf("initialize: %v", err)
		}
		h.t.Logf("initialize: %v", err)
	}
	return b
}

// setSchema rewrites the stored schema version (to replay an upgrade).
func (h *harness) setSchema(v int) {
	h.t.Helper()
	e, _ := logical.StorageEntryJSON(schemaKey, schemaRecord{Version: v})
	if err := h.raw.Put(context.Background(), e); err != nil {
		h.t.Fatal(err)
	}
}

func (h *harness) do(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	h.t.Helper()
	return h.doOn(h.b, op, path, data)
}

func (h *harness) doOn(b *backend, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	h.t.Helper()
	return request(b, h.storage, op, path, data)
}

// ok fails the test unless the request succeeded.
func (h *harness) ok(op logical.Operation, path string, data map[string]any) *logical.Response {
	h.t.Helper()
	resp, err := h.do(op, path, data)
	if err != nil || (resp != nil && resp.IsError()) {
		h.t.Fatalf("%s %s: err=%v resp=%v", op, path, err, resp)
	}
	return resp
}

// token reads path (creds/<name>) and returns the access token handed out.
func (h *harness) token(path string) string {
	h.t.Helper()
	return h.ok(logical.ReadOperation, path, nil).Data["access_token"].(string)
}

// stored reads the token record as storage holds it.
func (h *harness) stored(name string) (tokenRecord, bool) {
	h.t.Helper()
	e, err := h.raw.Get(context.Background(), tokenPrefix+name)
	if err != nil {
		h.t.Fatal(err)
	}
	if e == nil {
		return tokenRecord{}, false
	}
	var rec tokenRecord
	if err := e.DecodeJSON(&rec); err != nil {
		h.t.Fatal(err)
	}
	return rec, true
}

// queued waits until a goroutine is blocked on name's upstream or owner
// lock, or done is closed: either way the writer under test has reached the
// point the race is about. It polls a counter, never a timer.
func (h *harness) queued(name string, done <-chan struct{}) {
	h.t.Helper()
	until(h.t, "the writer neither finished nor queued on the config", func() bool {
		select {
		case <-done:
			return true
		default:
		}
		h.b.mu.RLock()
		st := h.b.states[name]
		h.b.mu.RUnlock()
		return st != nil && st.waiting.Load() > 0
	})
}

// waitIdle waits for the backend's background mints of name to finish.
func (h *harness) waitIdle(name string) {
	h.t.Helper()
	waitIdle(h.t, h.b, name)
}

// inState runs fn on a config's in-memory state, under its mutex.
func (h *harness) inState(name string, fn func(st *configState)) {
	h.t.Helper()
	h.b.mu.RLock()
	st := h.b.states[name]
	h.b.mu.RUnlock()
	if st == nil {
		h.t.Fatalf("config %q has no in-memory state", name)
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	fn(st)
}

// writeFinam writes config/<name> for the sandbox's trading secret.
func (h *harness) writeFinam(name string, extra map[string]any) *logical.Response {
	h.t.Helper()
	if h.sb == nil {
		h.t.Fatal("writeFinam needs the sandbox: build the harness with newSandboxHarness")
	}
	data := map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url}
	for k, v := range extra {
		data[k] = v
	}
	return h.ok(logical.UpdateOperation, "config/"+name, data)
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
func rotatingConfig(t *testing.T) (*fakeBroker, *harness) {
	t.Helper()
	f := chatLike()
	h := newFakeHarness(t, f)
	h.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
	return f, h
}
