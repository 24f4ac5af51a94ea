package backend

import (
	"context"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// The token core's failure paths: a storage call that fails or a broker
// answer that is lost at each step of a delete, a config write, a rotation
// and the schedule. Each opens its window deterministically with the
// doubles of fakes_test.go; none sleeps. The comment over each test
// names the window; the test name, the guarantee.

func (h *harness) walKeys() []string {
	h.t.Helper()
	keys, err := h.raw.List(context.Background(), "wal/")
	if err != nil {
		h.t.Fatal(err)
	}
	return keys
}

// renewOn renews lease on b, as issued now.
func (h *harness) renewOn(b *backend, lease *logical.Secret) (*logical.Response, error) {
	sec := *lease
	sec.IssueTime = h.clock.Now()
	return b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: h.storage, Secret: &sec})
}

// A ChatApp refresh is at the broker (holding upstream, not owner) when a
// delete runs and its config Delete fails. The delete changes memory only
// after storage succeeds, so the refresh's answer still finds its
// generation current and stores the rotation for the surviving config.
func TestFailedDeleteDuringRefreshKeepsTheRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	entered, release := f.holdNext()
	c.dueRefresh("creds/x") // starts the background refresh
	wait(t, entered, "the background refresh never reached the broker")
	c.storage.setFailDelete(configPrefix + "x")
	if resp, err := c.do(logical.DeleteOperation, "config/x", nil); err == nil && !resp.IsError() {
		t.Fatal("the delete did not fail")
	}
	c.storage.setFailDelete("")
	release() // the broker rotates and answers
	c.waitIdle("x")

	if !c.exists(configPrefix + "x") {
		t.Fatal("the config did not survive the failed delete")
	}
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Errorf("the surviving config lost the rotation the broker applied: storage %q, broker %q (wal records left: %v)", rec.Rotated["refresh_token"], f.refresh, c.walKeys())
	}
	c.do(logical.UpdateOperation, "rotate-root/x", nil)
	if f.refused != 0 {
		t.Errorf("%d refresh tokens presented after the broker retired them", f.refused)
	}
}

// A rotation whose token Put failed lives only in memory (unstored), and
// then a delete's config Delete fails. The delete leaves memory as it was
// when storage fails, so unload still stores the rotation for the surviving
// config and the next instance presents it.
func TestFailedDeleteKeepsAnUnstoredRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	c.storage.setFailKey(tokenPrefix + "x")
	if resp, err := c.do(logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
		t.Fatalf("rotate-root: %v %v", err, resp)
	}
	c.storage.setFailKey("")
	c.storage.setFailDelete(configPrefix + "x")
	if resp, err := c.do(logical.DeleteOperation, "config/x", nil); err == nil && !resp.IsError() {
		t.Fatal("the delete did not fail")
	}
	c.storage.setFailDelete("")
	c.b.Clean(context.Background()) // unload: stores what only memory holds

	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Errorf("the surviving config lost its unstored rotation: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	b := c.newBackend(nil)
	c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil)
	if f.refused != 0 {
		t.Errorf("%d refresh tokens presented after the broker retired them", f.refused)
	}
}

// A same-endpoint config write (ttl only, verified) is at the broker
// presenting the stored rotated refresh token, which the broker rotates,
// when a delete runs and its config Delete fails. The failed delete changes
// nothing in memory, so the write still finds its generation and stores the
// rotation with the surviving config.
func TestFailedDeleteDuringConfigWriteKeepsTheRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	entered, release := f.holdNext()
	var (
		resp *logical.Response
		err  error
	)
	written := c.goDo(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}, &resp, &err)
	wait(t, entered, "the write's verifying call never reached the broker")
	c.storage.setFailDelete(configPrefix + "x")
	if dr, derr := c.do(logical.DeleteOperation, "config/x", nil); derr == nil && !dr.IsError() {
		t.Fatal("the delete did not fail")
	}
	c.storage.setFailDelete("")
	release()
	wait(t, written, "the write did not finish")
	t.Logf("the write answered %d: %v", statusOf(resp, err), err)

	if !c.exists(configPrefix + "x") {
		t.Fatal("the config did not survive the failed delete")
	}
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Errorf("the surviving config lost the rotation the write's verifying call caused: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	c.do(logical.UpdateOperation, "rotate-root/x", nil)
	if f.refused != 0 {
		t.Errorf("%d refresh tokens presented after the broker retired them", f.refused)
	}
}

// Two refreshes in a row whose token Put fails each leave an unstored
// rotation. Every such rotation's record is kept (pendingWALs) until a
// record is stored, and all are deleted then: rollback never replays a
// rotation that was stored.
func TestEveryUnstoredRotationKeepsItsRecordUntilStored(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	c.storage.setFailKey(tokenPrefix + "x")
	for i := 0; i < 2; i++ {
		if resp, err := c.do(logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
			t.Fatalf("rotate-root: %v %v", err, resp)
		}
	}
	c.storage.setFailKey("")
	c.ok(logical.UpdateOperation, "rotate-root/x", nil)
	if rec, _ := c.stored("x"); rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the rotation was not stored: %q vs %q", rec.Rotated["refresh_token"], f.refresh)
	}
	if keys := c.walKeys(); len(keys) != 0 {
		t.Errorf("rotation records left after the rotation was stored: %v", keys)
	}
}

// A config write stores its token record (holding its verifying call's
// rotation) and then fails to store the config. The rotation is in
// storage, so the write deletes its rotation record and any pending one:
// none is left for rollback to replay.
func TestConfigPutFailureLeavesNoRotationRecord(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	c.storage.setFailKey(configPrefix + "x")
	if resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}); err == nil && !resp.IsError() {
		t.Fatal("the write did not fail")
	}
	c.storage.setFailKey("")
	if rec, _ := c.stored("x"); rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the rotation was not stored: %q vs %q", rec.Rotated["refresh_token"], f.refresh)
	}
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"})
	if keys := c.walKeys(); len(keys) != 0 {
		t.Errorf("rotation records left after every rotation was stored: %v", keys)
	}
}

// The incident switch, then delete and re-create under the same name (an
// operator replacing a leaked secret); the re-created config starts at
// retire epoch 0. A lease carries the instance of the config that issued
// it, and a re-created config has a new one, so the retired lease never
// renews under it.
func TestLeaseOfADeletedConfigNeverRenewsUnderARecreatedOne(t *testing.T) {
	c := newFakeHarness(t, finamLike())
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	lease := c.ok(logical.ReadOperation, "creds/x", nil).Secret
	c.ok(logical.UpdateOperation, "config/x/retire", nil)
	if resp, err := c.renewOn(c.b, lease); err == nil && !resp.IsError() && resp.Secret.TTL > time.Second {
		t.Fatalf("the retired lease renewed for %s before the delete", resp.Secret.TTL)
	}
	c.ok(logical.DeleteOperation, "config/x", nil)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s2"})
	resp, err := c.renewOn(c.b, lease)
	if err == nil && !resp.IsError() && resp.Secret.TTL > time.Second {
		t.Errorf("a lease on the deleted config's retired token (secret s1) renewed for %s under the re-created config", resp.Secret.TTL)
	}
}

// A refresh is at the broker when a delete succeeds and resets the config's
// counters. The refresh's answer finds the config gone and counts nothing
// (it counts only for a current config), so no series comes back.
func TestRefreshFinishingAfterDeleteBringsNoSeriesBack(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/gone", map[string]any{"provider": "fake", "secret": "s1"})
	c.token("creds/gone")

	entered, release := f.holdNext()
	c.dueRefresh("creds/gone")
	wait(t, entered, "the background refresh never reached the broker")
	c.ok(logical.DeleteOperation, "config/gone", nil)
	release()
	c.waitIdle("gone")

	body, err := c.b.metrics.expose(c.b)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(body), `config="gone"`) {
		t.Errorf("the deleted config has series again:\n%s", grepLines(string(body), `config="gone"`))
	}
}

// Two moving writes in a row (A->B, then A->C), each storing its
// record and failing to store the config, leave A's own rotated secret for
// A (Prior), on this node and after a restart.
func TestPriorRotationSurvivesTwoFailedMoves(t *testing.T) {
	const endpointA, endpointB, endpointC = "http://127.0.0.1:1", "http://127.0.0.2:1", "http://127.0.0.3:1"
	for _, restart := range []bool{false, true} {
		f := chatLike()
		c := newFakeHarness(t, f)
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-a", "base_url": endpointA})
		c.token("creds/x")
		rotatedAtA := f.refresh
		c.storage.setFailKey(configPrefix + "x")
		for _, to := range []string{endpointB, endpointC} {
			if _, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"secret": "s1", "refresh_token": "seed-" + to, "base_url": to}); err == nil {
				t.Fatal("the moving write did not fail")
			}
		}
		c.storage.setFailKey("")
		b := c.b
		if restart {
			b = c.newBackend(nil)
		}
		f.mu.Lock()
		f.sent, f.refresh = nil, rotatedAtA
		f.mu.Unlock()
		if resp, err := c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
			t.Fatalf("restart=%v: rotate-root at A: %v %v", restart, err, resp)
		}
		f.mu.Lock()
		for _, s := range f.sent {
			if s.baseURL != endpointA || s.refreshToken != rotatedAtA {
				t.Errorf("restart=%v: sent %q to %s", restart, s.refreshToken, s.baseURL)
			}
		}
		f.mu.Unlock()
	}
}

// A retire while a rotation is at the broker, whose record write then
// fails: the rotation stays (unstored) and the pre-retire token is never
// served; the next retire stores both and clears the rotation record.
func TestRetireDuringRotationWhoseWriteFailsKeepsIt(t *testing.T) {
	f, c := rotatingConfig(t)
	first := c.token("creds/x")
	entered, release := f.holdNext()
	var (
		resp *logical.Response
		err  error
	)
	rotated := c.goDo(logical.UpdateOperation, "rotate-root/x", nil, &resp, &err)
	wait(t, entered, "rotate-root never reached the broker")
	c.ok(logical.UpdateOperation, "config/x/retire", nil)
	c.storage.setFailKey(tokenPrefix + "x")
	release()
	wait(t, rotated, "rotate-root did not finish")
	c.storage.setFailKey("")
	inFlight := "fakerot-token-" + strconv.Itoa(f.callCount())
	c.ok(logical.UpdateOperation, "config/x/retire", nil)
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Errorf("the rotation was lost: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	if got := c.token("creds/x"); got == first || got == inFlight {
		t.Errorf("a retired token was served: %q", got)
	}
	// (Its rotation records are not checked here; see
	// TestEveryUnstoredRotationKeepsItsRecordUntilStored.)
	if f.refused != 0 {
		t.Errorf("%d refused refresh tokens", f.refused)
	}
}

// Unloading leaves no goroutine behind (refresh goroutines, the
// cleanup waiter, the HTTP clients of every config).
func TestCleanLeavesNoGoroutines(t *testing.T) {
	base := runtime.NumGoroutine()
	f := chatLike()
	c := newFakeHarness(t, f, finamLike(), tinvestLike())
	c.ok(logical.UpdateOperation, "config/r", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
	c.ok(logical.UpdateOperation, "config/m", map[string]any{"provider": "fake", "secret": "s1"})
	c.ok(logical.UpdateOperation, "config/p", map[string]any{"provider": "fakepass", "secret": "s1"})
	for _, n := range []string{"r", "m", "p"} {
		c.token("creds/" + n)
	}
	entered, release := f.holdNext()
	c.dueRefresh("creds/r")
	wait(t, entered, "refresh never reached the broker")
	cleaned := make(chan struct{})
	go func() { defer close(cleaned); c.b.Clean(context.Background()) }()
	until(t, "cleanup never started", func() bool { return c.b.closing.Load() })
	release()
	wait(t, cleaned, "cleanup did not return")
	until(t, "goroutines left after Clean", func() bool { return runtime.NumGoroutine() <= base+1 })
}

// A token record an older version left (no rotated_at, no prior) when a
// write moving the config from A to B stored its record (B's rotated
// refresh token, B's config hash) and failed to store the config. On load a
// record without rotated_at counts as the stored config's endpoint's only
// when its config hash matches that config, so B's refresh token never goes
// to A.
func TestLegacyRecordNeverSendsAnotherEndpointsSecret(t *testing.T) {
	const endpointA, endpointB = "http://127.0.0.1:1", "http://127.0.0.2:1"
	f := chatLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-a", "base_url": endpointA})
	c.token("creds/x")
	rotatedAtA := f.refresh
	c.storage.setFailKey(configPrefix + "x")
	if _, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"secret": "s1", "refresh_token": "seed-b", "base_url": endpointB}); err == nil {
		t.Fatal("the moving write did not fail")
	}
	c.storage.setFailKey("")
	rotatedAtB := f.refresh
	// What the previous core stored there: the same record without the
	// fields this core added.
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != rotatedAtB || rec.ConfigHash == "" {
		t.Fatalf("unexpected record: %+v", rec)
	}
	rec.RotatedAt, rec.Prior = "", nil
	e, err := logical.StorageEntryJSON(tokenPrefix+"x", rec)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.raw.Put(context.Background(), e); err != nil {
		t.Fatal(err)
	}

	b := c.newBackend(nil) // the upgraded plugin
	f.mu.Lock()
	f.sent, f.refresh = nil, rotatedAtA
	f.mu.Unlock()
	c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.sent {
		if s.refreshToken == rotatedAtB {
			t.Errorf("B's rotated refresh token was sent to %s", s.baseURL)
		}
	}
}

// A config write whose verifying call the broker refuses (a wrong new
// password) has written a rotation record before the call. Nothing was
// rotated, so the write deletes the record on its way out: rollback has
// nothing to replay.
func TestRefusedConfigWriteLeavesNoRotationRecord(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")
	f.mu.Lock()
	f.fail = &upstream.Error{Broker: "Fake", Op: "refresh", Failure: upstream.Unauthorized, Status: 401, Message: "bad password"}
	f.mu.Unlock()
	if resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"secret": "wrong"}); err == nil && !resp.IsError() {
		t.Fatal("the refused write succeeded")
	}
	f.mu.Lock()
	f.fail = nil
	f.mu.Unlock()
	if keys := c.walKeys(); len(keys) != 0 {
		t.Errorf("a write refused by the broker left rotation records: %v", keys)
	}
}

// A refresh at the broker when the config is deleted and re-created:
// the re-create waits for it (upstream), its answer is discarded, and the
// re-created config serves a token of its own secret only.
func TestRefreshAcrossDeleteAndRecreateServesOnlyTheNewSecret(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")
	entered, release := f.holdNext()
	c.dueRefresh("creds/x")
	wait(t, entered, "the background refresh never reached the broker")
	c.ok(logical.DeleteOperation, "config/x", nil)
	var (
		resp *logical.Response
		err  error
	)
	created := c.goDo(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s2", "refresh_token": "seed-2"}, &resp, &err)
	c.queued("x", created)
	release()
	wait(t, created, "the re-create did not finish")
	if err != nil || resp.IsError() {
		t.Fatalf("re-create: %v %v", err, resp)
	}
	tok := c.token("creds/x")
	if f.secretOf[tok] != "s2" {
		t.Errorf("the re-created config served a token of secret %q", f.secretOf[tok])
	}
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Errorf("storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	if keys := c.walKeys(); len(keys) != 0 {
		t.Errorf("rotation records left: %v", keys)
	}
}

// An invalidation and an unload that land while a config write holds
// the name's owner across its storage write queue behind it (no deadlock:
// upstream -> owner -> mu everywhere), and what the write stored is what
// the next load sees.
func TestInvalidateAndCleanWaitForAConfigWritesPut(t *testing.T) {
	for _, racer := range []string{"invalidate", "clean"} {
		t.Run(racer, func(t *testing.T) {
			f := chatLike()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
			c.token("creds/x")
			hit, release := c.storage.holdNextPut(tokenPrefix + "x")
			var (
				resp *logical.Response
				err  error
			)
			written := c.goDo(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}, &resp, &err)
			wait(t, hit, "the write never reached storage")
			c.b.mu.RLock()
			st := c.b.states["x"]
			c.b.mu.RUnlock()
			raced := make(chan struct{})
			go func() {
				defer close(raced)
				if racer == "invalidate" {
					c.b.invalidate(context.Background(), tokenPrefix+"x")
				} else {
					c.b.Clean(context.Background())
				}
			}()
			// Clean empties b.states first, so watch the state itself.
			until(t, "the "+racer+" neither finished nor queued on the owner", func() bool {
				select {
				case <-raced:
					return true
				default:
				}
				return st.waiting.Load() > 0
			})
			release()
			wait(t, written, "the write did not finish")
			wait(t, raced, "the "+racer+" did not finish")
			if err != nil || resp.IsError() {
				t.Fatalf("write: %v %v", err, resp)
			}
			b := c.b
			if racer == "clean" {
				b = c.newBackend(nil)
			}
			c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil)
			if f.refused != 0 {
				t.Errorf("%d refused refresh tokens", f.refused)
			}
		})
	}
}

// The caller of a config write gives up (a client timeout, Ctrl-C) after
// ChatApp has rotated the stored refresh token but before its answer is
// read. The verifying call runs on a context detached from the caller's, so
// the answer is still read and its rotation kept: the stored refresh token
// is never a spent one.
func TestCancelledConfigWriteKeepsTheRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	f.loseAnswerOnCancel = true
	entered, release := f.holdNext()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var (
		resp *logical.Response
		err  error
	)
	go func() {
		defer close(done)
		resp, err = c.b.HandleRequest(ctx, &logical.Request{Operation: logical.UpdateOperation, Path: "config/x", Storage: c.storage, Data: map[string]any{"ttl": "10m"}})
	}()
	wait(t, entered, "the write's verifying call never reached the broker")
	cancel()  // the caller gives up
	release() // the broker has rotated; its answer is read after the cancel
	wait(t, done, "the write did not finish")
	t.Logf("the write answered %d: %v", statusOf(resp, err), err)
	f.loseAnswerOnCancel = false

	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Errorf("the rotation of a write its caller abandoned is not stored: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	c.do(logical.UpdateOperation, "rotate-root/x", nil)
	if f.refused != 0 {
		t.Errorf("a config write its caller abandoned spent the stored refresh token: %d refused refresh tokens", f.refused)
	}
}

// A token record Get fails once while the migration to schema 2 builds the
// schedule's index. eachConfig skips only an undecodable record: a storage
// error fails the migration, the schema stays at 1 and the first tick builds
// the schedule from every config, so the config is rotated though nobody
// reads it.
func TestTransientReadDuringIndexMigrationKeepsTheConfigScheduled(t *testing.T) {
	f, c := rotatingConfig(t)
	// Storage of the previous version: no index.
	hours, _ := c.raw.List(context.Background(), duePrefix)
	if len(hours) == 0 {
		t.Fatal("the rotating config was never indexed")
	}
	for _, h := range hours {
		names, _ := c.raw.List(context.Background(), duePrefix+h)
		for _, n := range names {
			c.raw.Delete(context.Background(), duePrefix+h+n)
		}
	}
	c.setSchema(1)
	c.storage.failGets(tokenPrefix+"x", 1) // one storage hiccup during the migration
	b := c.newBackend(nil)

	c.clock.Advance(8 * 24 * time.Hour) // past half the refresh token's 14 days
	calls := f.callCount()
	for range 3 {
		if err := b.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.callCount() - calls; n == 0 {
		hours, _ := c.raw.List(context.Background(), duePrefix)
		t.Errorf("after one failed read during the upgrade the rotating config is never rotated (index hours %v)", hours)
	}
}

// The Put of a new config's due-time index entry fails once, and the node
// restarts. The failed write leaves a repair mark, so the restarted node
// rebuilds the index from every config and still rotates the config though
// nobody reads it.
func TestFailedIndexWriteIsRepairedAfterARestart(t *testing.T) {
	f := chatLike()
	c := newFakeHarness(t, f)
	// The write's verifying refresh makes the pair now; it is due half way
	// through the refresh token's 14 days.
	c.storage.setFailKey(dueKey(bucketOf(c.clock.Now().Add(7*24*time.Hour)), "x"))
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
	c.storage.setFailKey("")
	b := c.newBackend(nil) // a restart

	c.clock.Advance(8 * 24 * time.Hour)
	calls := f.callCount()
	for range 3 {
		if err := b.periodicFunc(context.Background(), &logical.Request{Storage: c.storage}); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.callCount() - calls; n == 0 {
		t.Error("after one failed index write and a restart the rotating config is never rotated")
	}
}
