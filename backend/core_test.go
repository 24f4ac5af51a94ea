package backend

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/helper/consts"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// Each test here opens one race window of the token core on purpose (a
// held storage write or a held broker call) and checks that the config's
// serialized owner keeps its state sound.

func finamLike() *fakeBroker { return newFakeBroker("fake", provider.Minted, false, nil) }
func chatLike() *fakeBroker  { return newFakeBroker("fakerot", provider.Minted, true, nil) }
func tinvestLike() *fakeBroker {
	return newFakeBroker("fakepass", provider.Passthrough, false, nil)
}

// dueRefresh moves the clock to where the token is due for a refresh ahead
// and reads once, which starts the background refresh.
func (h *harness) dueRefresh(path string) string {
	h.t.Helper()
	h.clock.Advance(11 * time.Minute) // 4 of 15 minutes left
	return h.token(path)
}

func TestRetireDuringMintPersistIsNotUndone(t *testing.T) {
	c := newFakeHarness(t, finamLike())
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	first := c.token("creds/x")

	hit, release := c.storage.holdNextPut(tokenPrefix + "x")
	if got := c.dueRefresh("creds/x"); got != first {
		t.Fatal("a valid token was not served while the refresh was due")
	}
	waitFor(t, hit, "the refresh never wrote its token record") // the refresh is writing its token record
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ok(logical.UpdateOperation, "config/x/retire", nil)
	}()
	c.queued("x", done)
	release()
	waitFor(t, done, "the retire never returned")
	c.waitIdle("x")

	rec, _ := c.stored("x")
	if rec.RetireEpoch == 0 || rec.RetiredBefore.IsZero() {
		t.Fatalf("the retire was undone in storage: %+v", rec)
	}
	refreshed := c.brokers["fake"].callCount()
	got := c.token("creds/x")
	if got == first || c.brokers["fake"].callCount() != refreshed+1 {
		t.Fatalf("after retire a read got a token minted before it (%q; %d mints)", got, c.brokers["fake"].callCount())
	}
	// A restart honours it too.
	b2 := c.newBackend(nil)
	resp, err := c.doOn(b2, logical.ReadOperation, "creds/x", nil)
	if err != nil || resp.IsError() || resp.Data["access_token"] != got {
		t.Fatalf("restart: %v %v", resp, err)
	}
}

func TestConfigWriteDuringRefreshPersistWins(t *testing.T) {
	for _, tc := range []struct {
		name   string
		broker func() *fakeBroker
		create map[string]any
		write  map[string]any
		check  func(t *testing.T, c *harness, rec tokenRecord)
	}{
		{
			name: "new secret", broker: finamLike,
			create: map[string]any{"provider": "fake", "secret": "s1"},
			write:  map[string]any{"secret": "s2", "require_readonly": true},
			check: func(t *testing.T, c *harness, rec tokenRecord) {
				if rec.Token == nil || c.brokers["fake"].secretOf[rec.Token.AccessToken] != "s2" {
					t.Fatalf("storage holds a token minted from the old secret: %+v", rec.Token)
				}
			},
		},
		{
			name: "new chatapp seed", broker: chatLike,
			create: map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"},
			write:  map[string]any{"secret": "s2", "refresh_token": "seed-2"},
			check: func(t *testing.T, c *harness, rec tokenRecord) {
				f := c.brokers["fakerot"]
				if last := f.presented[len(f.presented)-1]; last != "seed-2" {
					t.Fatalf("the write verified with %q, not its new seed", last)
				}
				if rec.Rotated["refresh_token"] != f.refresh {
					t.Fatalf("storage holds refresh token %q, the broker's current one is %q", rec.Rotated["refresh_token"], f.refresh)
				}
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.broker()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", tc.create)
			c.token("creds/x")

			hit, release := c.storage.holdNextPut(tokenPrefix + "x")
			c.dueRefresh("creds/x")
			waitFor(t, hit, "the refresh under the old settings never persisted") // the refresh under the old settings is persisting
			done := make(chan struct{})
			go func() {
				defer close(done)
				c.ok(logical.UpdateOperation, "config/x", tc.write)
			}()
			c.queued("x", done)
			release()
			waitFor(t, done, "the config write never returned")
			c.waitIdle("x")

			rec, _ := c.stored("x")
			tc.check(t, c, rec)
			// What standbys, a restart or a failover load is the same.
			b2 := c.newBackend(nil)
			resp, err := c.doOn(b2, logical.ReadOperation, "creds/x", nil)
			if err != nil || resp.IsError() {
				t.Fatalf("restart: %v %v", resp, err)
			}
			if got := resp.Data["access_token"]; got != rec.Token.AccessToken || f.secretOf[got.(string)] != "s2" {
				t.Fatalf("after a restart the token served came from secret %q", f.secretOf[got.(string)])
			}
		})
	}
}

func TestDeleteDuringPersistDoesNotResurrect(t *testing.T) {
	c := newFakeHarness(t, chatLike())
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
	c.token("creds/x")

	hit, release := c.storage.holdNextPut(tokenPrefix + "x")
	c.dueRefresh("creds/x")
	waitFor(t, hit, "the refresh never wrote its token record")
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ok(logical.DeleteOperation, "config/x", nil)
	}()
	c.queued("x", done)
	release()
	waitFor(t, done, "the queued writer never returned")
	c.waitIdle("x")

	if rec, ok := c.stored("x"); ok {
		t.Fatalf("token/x came back after the delete: rotated=%v token=%v", len(rec.Rotated) > 0, rec.Token != nil)
	}
	resp, err := c.do(logical.ReadOperation, "creds/x", nil)
	if statusOf(resp, err) != 404 || !strings.Contains(errText(resp, err), "no config or role named") {
		t.Fatalf("a deleted config still serves: %v %v", resp, err)
	}
}

func TestConfigWriteVerifiesAfterTheRefreshUnderARotationRecord(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	// Every call to the broker must find its rotation record in storage.
	f.onIssue = func(ctx context.Context, _ provider.Request) {
		keys, err := c.raw.List(ctx, framework.WALPrefix)
		if err != nil || len(keys) == 0 {
			t.Errorf("the broker was called with no rotation record in storage (%v)", err)
		}
	}
	entered, release := f.holdNext()
	c.dueRefresh("creds/x")
	waitFor(t, entered, "the refresh ahead never reached the broker") // a refresh-ahead is at the broker
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}) // same upstream, verified
	}()
	c.queued("x", done)
	release()
	waitFor(t, done, "the queued writer never returned")
	c.waitIdle("x")

	if f.maxFlight != 1 {
		t.Fatalf("the config write called the broker beside the refresh (%d at once)", f.maxFlight)
	}
	seen := map[string]bool{}
	for _, rt := range f.presented {
		if seen[rt] {
			t.Fatalf("refresh token %q was presented twice: %v", rt, f.presented)
		}
		seen[rt] = true
	}
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("storage holds %q, the broker's current refresh token is %q", rec.Rotated["refresh_token"], f.refresh)
	}
	if keys, _ := c.raw.List(context.Background(), framework.WALPrefix); len(keys) != 0 {
		t.Fatalf("%d rotation records left after stored rotations", len(keys))
	}
}

func TestCleanupPersistsAnsweredRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	f.ignoreCtx = true // the broker answers although the plugin is being unloaded
	entered, release := f.holdNext()
	c.dueRefresh("creds/x")
	waitFor(t, entered, "the refresh ahead never reached the broker")
	cleaned := make(chan struct{})
	go func() {
		defer close(cleaned)
		c.b.Clean(context.Background()) // reload, step-down or seal
	}()
	// Clean waits for the mint before it cancels anything.
	until(t, "cleanup never started", func() bool { return c.b.closing.Load() })
	release()
	waitFor(t, cleaned, "Clean never returned after the held rotation was answered")

	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the rotation ChatApp applied was dropped: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
}

func TestMakeAtRefreshDeadlineStillPersists(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	c.b.refreshTimeout = 50 * time.Millisecond
	// A refused refresh and a make used the whole mint timeout: the answer
	// arrives as the mint's context ends.
	f.onIssue = func(ctx context.Context, _ provider.Request) { brokertest.Held(ctx.Done()) }
	c.dueRefresh("creds/x")
	c.waitIdle("x")

	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("a rotation answered at the mint deadline was not stored: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
}

func TestTickCutShortKeepsTheRest(t *testing.T) {
	f := tinvestLike()
	c := newFakeHarness(t, f)
	for i := range 3 {
		c.ok(logical.UpdateOperation, fmt.Sprintf("config/p%d", i), map[string]any{"provider": "fakepass", "secret": fmt.Sprintf("t%d", i)})
	}
	c.clock.Advance(25 * time.Hour) // all three due for their keep-alive
	ctx, cancel := context.WithCancel(context.Background())
	f.onIssue = func(context.Context, provider.Request) { cancel() } // the tick ends during the first call
	before := f.callCount()
	if err := c.b.periodicFunc(ctx, &logical.Request{Storage: c.storage}); !errors.Is(err, context.Canceled) {
		t.Fatalf("tick: %v", err)
	}
	f.onIssue = nil
	if n := c.b.sched.size(); n != 3 {
		t.Fatalf("after a tick cut short %d of 3 configs are scheduled", n)
	}
	if err := c.b.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
		t.Fatal(err)
	}
	if got := f.callCount() - before; got < 3 {
		t.Fatalf("the next tick validated %d configs, want all 3", got)
	}
}

func TestLoadScheduleSkipsUndecodableEntry(t *testing.T) {
	f := tinvestLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/a", map[string]any{"provider": "fakepass", "secret": "t1"})
	c.ok(logical.UpdateOperation, "config/c", map[string]any{"provider": "fakepass", "secret": "t2"})
	if err := c.raw.Put(context.Background(), &logical.StorageEntry{Key: configPrefix + "b", Value: []byte("{not json")}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		prep func()
	}{
		// An upgrade: the migration that builds the index meets the entry.
		{"index built on upgrade", func() { c.setSchema(1) }},
		// A Vault that never ran the migration: the full scan meets it.
		{"full scan", func() { c.setSchema(1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c.clock.Advance(25 * time.Hour) // both due again
			tc.prep()
			var b2 *backend
			if tc.name == "full scan" {
				b2 = New(Options{Providers: map[string]provider.Provider{"fakepass": f}, Clock: c.clock})
				conf := logical.TestBackendConfig()
				conf.StorageView = c.storage
				if err := b2.Setup(context.Background(), conf); err != nil {
					t.Fatal(err)
				}
				b2.storage = c.storage
				t.Cleanup(func() { b2.Clean(context.Background()) })
			} else {
				b2 = c.newBackend(nil)
			}
			calls := f.callCount()
			if err := b2.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
				t.Fatalf("one unreadable entry failed the schedule: %v", err)
			}
			if got := f.callCount() - calls; got != 2 || !b2.sched.loaded {
				t.Fatalf("validated %d (loaded=%v), want the 2 readable configs", got, b2.sched.loaded)
			}
		})
	}
}

func TestUnknownNamesLeaveNoState(t *testing.T) {
	c := newFakeHarness(t, chatLike())
	lease := &logical.Secret{InternalData: map[string]any{"secret_type": secretTokenType}}
	for i := range 1000 {
		name := fmt.Sprintf("nope%d", i)
		c.do(logical.ReadOperation, "config/"+name, nil)
		c.do(logical.ReadOperation, "creds/"+name, nil)
		c.do(logical.UpdateOperation, "rotate-root/"+name, nil)
		c.do(logical.UpdateOperation, "config/"+name+"/retire", nil)
		c.do(logical.DeleteOperation, "config/"+name, nil)
		c.do(logical.UpdateOperation, "config/"+name, map[string]any{"provider": "nope"}) // refused create
		lease.InternalData["config"] = name
		c.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: c.storage, Secret: lease})
		c.b.walRollback(context.Background(), &logical.Request{Storage: c.storage}, walRotation, map[string]any{"config": name})
	}
	c.b.mu.RLock()
	n := len(c.b.states)
	c.b.mu.RUnlock()
	if n != 0 {
		t.Fatalf("1,000 unknown names left %d states in memory", n)
	}
}

func TestRevokeEndsTheLeaseOnly(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	for _, tc := range []struct {
		name    string
		advance time.Duration
	}{
		{"operator revoke at once", 0},
		{"reader's Vault token revoked mid-lease", 2 * time.Minute},
		{"short login expiring", 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := c.ok(logical.ReadOperation, "creds/x", nil)
			mints := f.callCount()
			c.clock.Advance(tc.advance)
			if _, err := c.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RevokeOperation, Storage: c.storage, Secret: resp.Secret}); err != nil {
				t.Fatal(err)
			}
			if got := c.token("creds/x"); got != resp.Data["access_token"] || f.callCount() != mints {
				t.Fatalf("a lease revoke evicted the shared token (%d -> %d mints)", mints, f.callCount())
			}
		})
	}
}

// A retire holds for a mint already at the broker, and across a reload or
// on another node. The restart half restarts straight after the retire: a
// read on the retiring node would store a new record first, and the new
// backend would then pass even if the retire itself were never stored.
func TestRetireHoldsAcrossRestartAndInFlightMint(t *testing.T) {
	t.Run("in-flight mint", func(t *testing.T) {
		f := finamLike()
		c := newFakeHarness(t, f)
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
		first := c.token("creds/x")

		// A mint already at the broker when the retire lands is not handed out.
		entered, release := f.holdNext()
		c.dueRefresh("creds/x")
		waitFor(t, entered, "the refresh ahead never reached the broker")
		c.ok(logical.UpdateOperation, "config/x/retire", nil)
		release()
		c.waitIdle("x")
		inflight := fmt.Sprintf("fake-token-%d", f.callCount())
		if got := c.token("creds/x"); got == first || got == inflight {
			t.Fatalf("after retire a read got a token minted before it: %q", got)
		}
	})
	t.Run("restart straight after the retire", func(t *testing.T) {
		f := finamLike()
		c := newFakeHarness(t, f)
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
		first := c.token("creds/x")
		c.ok(logical.UpdateOperation, "config/x/retire", nil)
		// A reload and a new node load the same rule from storage, with
		// nothing stored since the retire.
		for i := range 2 {
			b := c.newBackend(nil)
			resp, err := c.doOn(b, logical.ReadOperation, "creds/x", nil)
			if err != nil || resp.IsError() || resp.Data["access_token"] == first {
				t.Fatalf("backend %d after the retire: %v %v (first token %q)", i, resp, err, first)
			}
		}
	})
}

func TestPerformanceStandbyNeverRotates(t *testing.T) {
	f := chatLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1", "verify": false})
	standby := c.newBackend(&logical.StaticSystemView{ReplicationStateVal: consts.ReplicationPerformanceStandby})
	calls := f.callCount()
	_, err := c.doOn(standby, logical.ReadOperation, "creds/x", nil)
	if !errors.Is(err, logical.ErrReadOnly) {
		t.Fatalf("a standby needing a rotation answered %v, want ErrReadOnly (forwarded by Vault)", err)
	}
	if f.callCount() != calls {
		t.Fatal("a standby called the broker for a rotation it cannot store")
	}
	// Paths that change something upstream before storage are forwarded.
	for _, p := range standby.Paths {
		for op, h := range p.Operations {
			if op == logical.ReadOperation || op == logical.ListOperation {
				continue
			}
			props := h.Properties()
			if !props.ForwardPerformanceStandby || !props.ForwardPerformanceSecondary {
				if strings.HasPrefix(p.Pattern, "config/") || strings.HasPrefix(p.Pattern, "rotate-root/") {
					t.Errorf("%s %s is not forwarded from performance standbys", op, p.Pattern)
				}
			}
		}
	}
}

func TestPassthroughRenewsShareOneCall(t *testing.T) {
	f := tinvestLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/p", map[string]any{"provider": "fakepass", "secret": "t1"})
	lease := c.ok(logical.ReadOperation, "creds/p", nil).Secret
	renew := func() error {
		sec := *lease
		sec.InternalData = map[string]any{}
		for k, v := range lease.InternalData {
			sec.InternalData[k] = v
		}
		sec.IssueTime = c.clock.Now()
		resp, err := c.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: c.storage, Secret: &sec})
		if err == nil && resp.IsError() {
			err = resp.Error()
		}
		return err
	}
	calls := f.callCount()
	entered, release := f.holdNext()
	const n = 50
	errs := make(chan error, n)
	go func() { errs <- renew() }()
	waitFor(t, entered, "no renew reached the broker") // one renew is asking the broker
	for range n - 1 {
		go func() { errs <- renew() }()
	}
	var fl *flight
	c.inState("p", func(st *configState) { fl = st.own.flight })
	until(t, "the renews never all waited on the one call", func() bool { return fl.waiters.Load() >= n })
	release()
	for range n {
		if err := waitFor(t, errs, "a renew waiting on the shared call never returned"); err != nil {
			t.Fatal(err)
		}
	}
	if got := f.callCount() - calls; got != 1 {
		t.Fatalf("%d concurrent renews made %d calls, want 1 shared", n, got)
	}
	// A renew after them asks again: no validation is reused for a renew.
	if err := renew(); err != nil || f.callCount()-calls != 2 {
		t.Fatalf("a later renew did not ask the broker (%v, %d calls)", err, f.callCount()-calls)
	}
}

func TestLeasesAreShapedToSwapWithLifeToSpare(t *testing.T) {
	life := 40 * time.Second
	issued := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tok := &storedToken{IssuedAt: issued, ExpiresAt: issued.Add(life)}
	for _, tc := range []struct {
		age      time.Duration
		min, max time.Duration
	}{
		{0, 21 * time.Second, 24 * time.Second},              // ends at two fifths left, up to a tenth early
		{20 * time.Second, 3 * time.Second, 4 * time.Second}, // still before the refresh point
		{22 * time.Second, minLease, minLease},               // a moment before it: due already, come back shortly
		{26 * time.Second, minLease, minLease},               // due: come back shortly, but never within Agent's one-second index
		{35 * time.Second, minLease, minLease},
		{39 * time.Second, time.Second, time.Second}, // never past the token's end
	} {
		for range 20 { // the spread is random
			got := shapedTTL(tok, issued.Add(tc.age))
			if got < tc.min || got > tc.max {
				t.Fatalf("age %v: lease %v, want %v..%v", tc.age, got, tc.min, tc.max)
			}
			// A client re-reading at 85-95% of its lease (Agent) swaps
			// with at least a quarter of the token's life left.
			if left := tok.ExpiresAt.Sub(issued.Add(tc.age + got*95/100)); tc.age < 22*time.Second && left < life/4 {
				t.Fatalf("age %v: the holder re-reads with %v of %v left", tc.age, left, life)
			}
		}
	}
	// A 15-minute JWT: the lease ends with 6 minutes left (minus spread).
	jwt := &storedToken{IssuedAt: issued, ExpiresAt: issued.Add(15 * time.Minute)}
	if got := shapedTTL(jwt, issued); got > 9*time.Minute || got < 9*time.Minute-30*time.Second {
		t.Fatalf("15-minute JWT: lease %v", got)
	}
}

func TestClientAtLeaseEndMovesToNewTokenWithLifeToSpare(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	first := c.ok(logical.ReadOperation, "creds/x", nil)
	exp, err := time.Parse(time.RFC3339, first.Data["expires_at"].(string))
	if err != nil {
		t.Fatal(err)
	}
	// A client that re-reads when its lease ends (Agent re-reads a little
	// earlier still), as long as it gets the same token.
	lease := first
	for rounds := 1; ; rounds++ {
		c.clock.Advance(lease.Secret.TTL)
		c.waitIdle("x")
		lease = c.ok(logical.ReadOperation, "creds/x", nil)
		if lease.Secret.TTL < shortLease && lease.Secret.Renewable {
			t.Fatalf("a %v lease is renewable: clients would renew it instead of reading the next token", lease.Secret.TTL)
		}
		if lease.Data["access_token"] != first.Data["access_token"] {
			if left := exp.Sub(c.clock.Now()); left < 15*time.Minute/4 {
				t.Fatalf("moved to the new token with %v of the old one's 15m left", left)
			}
			break
		}
		if rounds == 5 {
			t.Fatalf("still the old token after %d re-reads", rounds)
		}
	}
	if f.callCount() != 2 {
		t.Fatalf("%d mints, want 2", f.callCount())
	}
}

func TestKeepAliveCanBeTurnedOff(t *testing.T) {
	f := tinvestLike()
	c := newFakeHarness(t, f, finamLike())
	c.ok(logical.UpdateOperation, "config/on", map[string]any{"provider": "fakepass", "secret": "t1"})
	c.ok(logical.UpdateOperation, "config/off", map[string]any{"provider": "fakepass", "secret": "t2", "keep_alive": false})
	if got := c.ok(logical.ReadOperation, "config/off", nil).Data["keep_alive"]; got != false {
		t.Fatalf("config read shows keep_alive=%v", got)
	}
	calls := f.callCount()
	c.clock.Advance(25 * time.Hour)
	if err := c.b.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
		t.Fatal(err)
	}
	if got := f.callCount() - calls; got != 1 {
		t.Fatalf("a day later the tick validated %d configs, want only the one with keep_alive on", got)
	}
	// Restarted: the schedule built from storage honours it too.
	b2 := c.newBackend(nil)
	c.clock.Advance(25 * time.Hour)
	calls = f.callCount()
	if err := b2.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
		t.Fatal(err)
	}
	if got := f.callCount() - calls; got != 1 {
		t.Fatalf("after a restart the tick validated %d configs, want 1", got)
	}
	resp, err := c.do(logical.UpdateOperation, "config/on2", map[string]any{"provider": "fake", "secret": "s", "keep_alive": false})
	if err == nil && (resp == nil || !resp.IsError() || !strings.Contains(resp.Error().Error(), "keep_alive: does not apply")) {
		t.Fatalf("keep_alive on a minted provider: %v", resp)
	}
}

// countingStorage counts reads, for restart-cost assertions.
type countingStorage struct {
	logical.Storage
	gets, lists atomic.Int64
}

func (s *countingStorage) Get(ctx context.Context, k string) (*logical.StorageEntry, error) {
	s.gets.Add(1)
	return s.Storage.Get(ctx, k)
}

func (s *countingStorage) List(ctx context.Context, p string) ([]string, error) {
	s.lists.Add(1)
	return s.Storage.List(ctx, p)
}

func TestRestartScheduleCostFollowsWhatIsDue(t *testing.T) {
	f := tinvestLike()
	c := newFakeHarness(t, f)
	const early, late = 10, 990
	for i := range early {
		c.ok(logical.UpdateOperation, fmt.Sprintf("config/early%d", i), map[string]any{"provider": "fakepass", "secret": "e"})
	}
	c.clock.Advance(12 * time.Hour)
	for i := range late {
		c.ok(logical.UpdateOperation, fmt.Sprintf("config/late%d", i), map[string]any{"provider": "fakepass", "secret": "l"})
	}
	c.clock.Advance(12*time.Hour + time.Hour) // the early ones are due, the late ones in 11 hours

	// A reload: a new backend on the same storage, counting its reads.
	counted := &countingStorage{Storage: c.storage}
	conf := logical.TestBackendConfig()
	conf.StorageView = counted
	lb, err := FactoryWith(Options{Providers: map[string]provider.Provider{"fakepass": f}, Clock: c.clock})(context.Background(), conf)
	if err != nil {
		t.Fatal(err)
	}
	b2 := lb.(*backend)
	t.Cleanup(func() { b2.Clean(context.Background()) })
	calls := f.callCount()
	if err := b2.periodicFunc(context.Background(), &logical.Request{Storage: counted}); err != nil {
		t.Fatal(err)
	}
	gets, lists := counted.gets.Load(), counted.lists.Load()
	t.Logf("first tick after a reload with %d configs, %d due: %d storage reads, %d lists, %d validations", early+late, early, gets, lists, f.callCount()-calls)
	if got := f.callCount() - calls; got != early {
		t.Fatalf("the first tick validated %d configs, want the %d due", got, early)
	}
	if gets > 10*early || lists > 10 {
		t.Fatalf("the first tick read %d entries and listed %d times for %d due configs: its cost follows the number of configs", gets, lists, early)
	}
	// Eleven hours on, the late ones come due and are found.
	c.clock.Advance(12 * time.Hour)
	calls = f.callCount()
	if err := b2.periodicFunc(context.Background(), &logical.Request{Storage: counted}); err != nil {
		t.Fatal(err)
	}
	if got := f.callCount() - calls; got != maxDuePerTick {
		t.Fatalf("when the late hour came the tick validated %d, want a full tick of %d", got, maxDuePerTick)
	}
}

func TestScheduleIndexBuiltOnceOnUpgrade(t *testing.T) {
	f := tinvestLike()
	c := newFakeHarness(t, f)
	for i := range 3 {
		c.ok(logical.UpdateOperation, fmt.Sprintf("config/p%d", i), map[string]any{"provider": "fakepass", "secret": "t"})
	}
	// Storage of the previous version: no index.
	hours, _ := c.raw.List(context.Background(), duePrefix)
	for _, h := range hours {
		names, _ := c.raw.List(context.Background(), duePrefix+h)
		for _, n := range names {
			c.raw.Delete(context.Background(), duePrefix+h+n)
		}
	}
	c.setSchema(1)
	b2 := c.newBackend(nil) // the upgraded plugin: Vault runs its migration
	if hours, _ := c.raw.List(context.Background(), duePrefix); len(hours) != 1 {
		t.Fatalf("index after the upgrade: %v, want one hour holding all 3", hours)
	}
	c.clock.Advance(25 * time.Hour)
	calls := f.callCount()
	if err := b2.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
		t.Fatal(err)
	}
	if got := f.callCount() - calls; got != 3 {
		t.Fatalf("after the upgrade the tick validated %d, want 3", got)
	}
	// Rescheduled a day on: the old hour's entries are gone.
	if hours, _ := c.raw.List(context.Background(), duePrefix); len(hours) != 1 {
		t.Fatalf("index hours after rescheduling: %v, want only tomorrow's", hours)
	}
}

func TestRenewIsShapedAndReadiesTheNextToken(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	first := c.ok(logical.ReadOperation, "creds/x", nil)
	renew := func() *logical.Response {
		t.Helper()
		sec := *first.Secret
		sec.IssueTime = c.clock.Now()
		resp, err := c.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: c.storage, Secret: &sec})
		if err != nil || resp.IsError() {
			t.Fatalf("renew: %v %v", resp, err)
		}
		return resp
	}
	// Before the refresh point a renew extends to it, not to the JWT's end.
	c.clock.Advance(5 * time.Minute)
	if ttl := renew().Secret.TTL; ttl > 4*time.Minute || ttl < 3*time.Minute {
		t.Fatalf("renew with 10m of 15m left: lease %v, want up to the refresh point (6m left, 4m away)", ttl)
	}
	if f.callCount() != 1 {
		t.Fatal("a renew before the refresh point minted")
	}
	// Past it, a renew gives one second (the lease stops growing, so the
	// client reads again) and starts the refresh, so that read finds the
	// new token.
	c.clock.Advance(6 * time.Minute)
	if ttl := renew().Secret.TTL; ttl != time.Second {
		t.Fatalf("renew past the refresh point: lease %v, want 1s", ttl)
	}
	c.waitIdle("x")
	if f.callCount() != 2 {
		t.Fatalf("a renew past the refresh point did not start it (%d mints)", f.callCount())
	}
	if got := c.token("creds/x"); got == first.Data["access_token"] {
		t.Fatal("the read after that renew got the old token")
	}
}

func TestRotationRecordsAreClusterLocal(t *testing.T) {
	f := chatLike()
	c := newFakeHarness(t, f)
	if !slices.Contains(c.b.Backend.PathsSpecial.LocalStorage, framework.WALPrefix) {
		t.Fatalf("PathsSpecial.LocalStorage = %v: rotation records would replicate to performance secondaries", c.b.Backend.PathsSpecial.LocalStorage)
	}
	// The declaration covers the records only if they live under it.
	var under []string
	f.onIssue = func(ctx context.Context, _ provider.Request) {
		under, _ = c.raw.List(ctx, framework.WALPrefix)
	}
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
	if len(under) != 1 {
		t.Fatalf("the rotation record is not under %q during the broker call: %v", framework.WALPrefix, under)
	}
}
