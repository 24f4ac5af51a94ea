package backend

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
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
		return nil, fmt.Errorf("%w reading %s", errInjected, key)
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
		return fmt.Errorf("%w deleting %s", errInjected, key)
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
		return fmt.Errorf("%w for %s", errInjected, e.Key)
	}
	return g.Storage.Put(ctx, e)
}

// errNeverReleased: a test double held a call the test never released (a
// slip made the test stop early or wait for the wrong thing); the call fails
// after brokertest.WaitBound instead of hanging its goroutine.
// errInjected is every failure gateStorage was told to give.
var errInjected = errors.New("injected storage failure")

var errNeverReleased = errors.New("test double: the held call was never released")
