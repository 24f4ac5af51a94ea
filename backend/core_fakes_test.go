package backend

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream/clocktest"
)

// Test doubles for the token core: a clock moved by hand, a broker that can
// hold a call until the test releases it, and storage that can hold or fail
// a chosen write. With them every race window is opened on purpose, never
// by sleeping.

type fakeClock = clocktest.Clock

func newFakeClock() *fakeClock {
	return clocktest.New(time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC))
}

// fakeBroker is a provider whose tokens live on a fakeClock. Rotating: every
// Issue needs the current refresh token and replaces it, as ChatApp does.
type fakeBroker struct {
	name     string
	kind     provider.Issuance
	rotating bool
	// narrows: the broker narrows a token to Request.AllowedAccounts (ALOR).
	narrows bool
	clock   *fakeClock
	life    time.Duration

	mu        sync.Mutex
	calls     int
	inFlight  int
	maxFlight int
	presented []string // refresh tokens presented, in order
	refresh   string   // the refresh token the broker accepts now
	secretOf  map[string]string
	readOnly  bool
	accounts  []string
	fail      error
	// hold, when set, makes the next Issue announce itself on entered and
	// wait for release (or its context when ignoreCtx is false).
	hold      bool
	entered   chan struct{}
	release   chan struct{}
	ignoreCtx bool
	// loseAnswerOnCancel: a held call rotates at the broker, and its answer
	// is lost when the caller's context ended meanwhile (as an HTTP answer
	// read after a cancel is).
	loseAnswerOnCancel bool
	// refused counts refresh tokens presented that the broker had already
	// retired: each is a rotation the plugin lost.
	refused int
	// failAfterRotating: the next answer rotates and is then refused by
	// the provider for another field (provider.RotatedError).
	failAfterRotating error
	// sent records, per call, the endpoint and the refresh token presented.
	sent    []sentCall
	onIssue func(ctx context.Context, req provider.Request)
}

type sentCall struct{ baseURL, refreshToken string }

func newFakeBroker(name string, kind provider.Issuance, rotating bool, clock *fakeClock) *fakeBroker {
	return &fakeBroker{name: name, kind: kind, rotating: rotating, clock: clock, life: 15 * time.Minute,
		secretOf: map[string]string{}, readOnly: true, accounts: []string{"A1"}}
}

func (f *fakeBroker) Spec() provider.Spec {
	fields := []provider.Field{{Name: "secret", Secret: true, Required: true, Description: "the fake's secret"}}
	if f.rotating {
		fields = append(fields, provider.Field{Name: "refresh_token", Secret: true, Description: "seed"})
	}
	return provider.Spec{
		Name: f.name, Display: "Fake" + f.name, Issuance: f.kind, Fields: fields,
		Environments:    map[string]string{"production": "https://" + f.name + ".example"},
		RotatesSecret:   f.rotating,
		NarrowsAccounts: f.narrows,
		DefaultTTL: func() time.Duration {
			if f.kind == provider.Passthrough {
				return time.Hour
			}
			return 0
		}(),
	}
}

// holdNext makes the next Issue block until the returned release is called.
func (f *fakeBroker) holdNext() (entered <-chan struct{}, release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hold = true
	f.entered = make(chan struct{})
	f.release = make(chan struct{})
	rel := f.release
	return f.entered, sync.OnceFunc(func() { close(rel) })
}

func (f *fakeBroker) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	f.mu.Lock()
	f.calls++
	f.inFlight++
	f.maxFlight = max(f.maxFlight, f.inFlight)
	hold, entered, release := f.hold, f.entered, f.release
	f.hold = false
	hook := f.onIssue
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.inFlight--
		f.mu.Unlock()
	}()
	if hook != nil {
		hook(ctx, req)
	}
	if hold {
		close(entered)
		if f.loseAnswerOnCancel {
			<-release
			f.mu.Lock()
			defer f.mu.Unlock()
			tok, err := f.answerLocked(req)
			if err == nil && ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return tok, err
		}
		if f.ignoreCtx {
			if !brokertest.Held(release) {
				return nil, errNeverReleased
			}
		} else {
			select {
			case <-release:
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-time.After(brokertest.WaitBound):
				return nil, errNeverReleased
			}
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.answerLocked(req)
}

// answerLocked is the broker's answer to one call; f.mu must be held.
func (f *fakeBroker) answerLocked(req provider.Request) (*provider.Token, error) {
	f.sent = append(f.sent, sentCall{req.BaseURL, req.Secrets["refresh_token"]})
	if f.fail != nil {
		return nil, f.fail
	}
	tok := &provider.Token{
		AccessToken: fmt.Sprintf("%s-token-%d", f.name, f.calls),
		IssuedAt:    f.clock.Now(),
		AccountIDs:  f.accounts,
		ReadOnly:    f.readOnly,
	}
	if f.narrows && len(req.AllowedAccounts) > 0 {
		tok.AccountIDs = req.AllowedAccounts
	}
	if f.kind == provider.Passthrough {
		tok.AccessToken = req.Secrets["secret"]
	} else {
		tok.ExpiresAt = tok.IssuedAt.Add(f.life)
	}
	f.secretOf[tok.AccessToken] = req.Secrets["secret"]
	if f.rotating {
		rt := req.Secrets["refresh_token"]
		f.presented = append(f.presented, rt)
		// A seed is accepted once; after that only the current one.
		if rt != f.refresh && !strings.HasPrefix(rt, "seed-") {
			f.refused++
			return nil, &upstream.Error{Broker: "Fake", Op: "refresh", Failure: upstream.Unauthorized, Status: 401, Message: "refresh token is not valid"}
		}
		f.refresh = fmt.Sprintf("rt-%d", f.calls)
		tok.Rotated = map[string]string{"refresh_token": f.refresh}
		tok.SecretExpiresAt = f.clock.Now().Add(14 * 24 * time.Hour)
		if err := f.failAfterRotating; err != nil {
			f.failAfterRotating = nil
			return nil, &provider.RotatedError{Rotated: tok.Rotated, Err: err}
		}
	}
	return tok, nil
}

func (f *fakeBroker) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

// gateStorage wraps storage: it can hold the next Put of a key until
// released, fail Puts of a key, and honours a cancelled context as Vault's
// real storage does.
type gateStorage struct {
	logical.Storage
	mu      sync.Mutex
	holdKey string
	hit     chan struct{}
	release chan struct{}
	failKey string

	holdDel            bool
	delHit, delRelease chan struct{}
	failDelKey         string
	failGetKey         string
	failGetN           int
}

func (g *gateStorage) holdNextPut(key string) (hit <-chan struct{}, release func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.holdKey = key
	g.hit = make(chan struct{})
	g.release = make(chan struct{})
	rel := g.release
	return g.hit, sync.OnceFunc(func() { close(rel) })
}

// holdNextDelete holds the next Delete (of any key) until released.
func (g *gateStorage) holdNextDelete() (hit <-chan struct{}, release func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.holdDel = true
	g.delHit = make(chan struct{})
	g.delRelease = make(chan struct{})
	rel := g.delRelease
	return g.delHit, sync.OnceFunc(func() { close(rel) })
}

// failGets makes the next n Gets of key fail.
func (g *gateStorage) failGets(key string, n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failGetKey, g.failGetN = key, n
}

func (g *gateStorage) setFailKey(key string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failKey = key
}

func (g *gateStorage) setFailDelete(key string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failDelKey = key
}

func (g *gateStorage) Get(ctx context.Context, key string) (*logical.StorageEntry, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	g.mu.Lock()
	fail := g.failGetN > 0 && key == g.failGetKey
	if fail {
		g.failGetN--
	}
	g.mu.Unlock()
	if fail {
		return nil, fmt.Errorf("injected storage failure reading %s", key)
	}
	return g.Storage.Get(ctx, key)
}

func (g *gateStorage) Delete(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	g.mu.Lock()
	var wait chan struct{}
	if g.holdDel {
		g.holdDel = false
		close(g.delHit)
		wait = g.delRelease
	}
	fail := g.failDelKey != "" && key == g.failDelKey
	g.mu.Unlock()
	if wait != nil {
		<-wait
	}
	if fail {
		return fmt.Errorf("injected storage failure deleting %s", key)
	}
	return g.Storage.Delete(ctx, key)
}

func (g *gateStorage) Put(ctx context.Context, e *logical.StorageEntry) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	g.mu.Lock()
	var wait chan struct{}
	if g.holdKey != "" && e.Key == g.holdKey {
		g.holdKey = ""
		close(g.hit)
		wait = g.release
	}
	fail := g.failKey != "" && e.Key == g.failKey
	g.mu.Unlock()
	if wait != nil && !brokertest.Held(wait) {
		return errNeverReleased
	}
	if fail {
		return fmt.Errorf("injected storage failure for %s", e.Key)
	}
	return g.Storage.Put(ctx, e)
}

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

// errNeverReleased: a test double held a call the test never released (a
// slip made the test stop early or wait for the wrong thing); the call fails
// after brokertest.WaitBound instead of hanging its goroutine.
var errNeverReleased = errors.New("test double: the held call was never released")

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
