package backend

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
)

// Races of the token core, each window opened deterministically.

// A retire lands while a config write's verifying call is at the broker.
// The write takes the retire epoch from the record current when it stores,
// and drops a token from before it, so the retire holds and the verifying
// token is never served.
func TestRetireDuringConfigWriteVerifyHolds(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	first := c.token("creds/x")

	entered, release := f.holdNext()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}) // same upstream, verified
	}()
	waitFor(t, entered, "the write's verifying call never reached the broker") // the write's verifying mint is at the broker
	c.ok(logical.UpdateOperation, "config/x/retire", nil)
	verifyTok := fmt.Sprintf("fake-token-%d", f.callCount())
	release()
	waitFor(t, done, "the config write never returned")

	rec, _ := c.stored("x")
	if rec.RetireEpoch == 0 || rec.RetiredBefore.IsZero() {
		t.Errorf("the retire was undone in storage by the config write: epoch=%d retired_before=%v", rec.RetireEpoch, rec.RetiredBefore)
	}
	if got := c.token("creds/x"); got == first || got == verifyTok {
		t.Errorf("after retire a read got %q, minted before the retire (first=%q, in-flight verify=%q)", got, first, verifyTok)
	}
}

// A retire, then a node whose clock is behind the retiring one's (failover,
// or an NTP step back) serves. Once a retire epoch is recorded, only the
// epoch decides what is servable, not RetiredBefore against the local
// clock: one read mints once and succeeds.
func TestRetireHoldsOnANodeWhoseClockIsBehind(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	c.token("creds/x")
	c.ok(logical.UpdateOperation, "config/x/retire", nil)

	// The new active node's clock is 30 s behind the node that retired.
	c.clock.Advance(-30 * time.Second)
	b2 := c.newBackend(nil)
	calls := f.callCount()
	resp, err := c.doOn(b2, logical.ReadOperation, "creds/x", nil)
	if err != nil || resp.IsError() {
		t.Errorf("after a retire on a node 30 s ahead, a read failed (%v %v) and cost %d mints", err, resp.Error(), f.callCount()-calls)
	} else if n := f.callCount() - calls; n != 1 {
		t.Errorf("one read cost %d mints", n)
	}
}

// A ChatApp config write changes a secret other than the refresh token
// (e.g. the cabinet password, as the retire note tells operators to do).
// The token is dropped, but the broker's rotated refresh token is carried
// over (the write does not supply that field anew), so the spent seed is
// never presented again.
func TestOtherSecretChangeKeepsTheRotatedRefreshToken(t *testing.T) {
	for _, verify := range []bool{true, false} {
		t.Run(fmt.Sprintf("verify=%v", verify), func(t *testing.T) {
			f := chatLike()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1"})
			c.token("creds/x") // seed-1 spent, rt-1 current
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"secret": "s2", "verify": verify})
			if !verify {
				rec, _ := c.stored("x")
				if rec.Rotated["refresh_token"] != f.refresh {
					t.Errorf("after the write storage holds refresh token %q; the broker's current one is %q (lost)", rec.Rotated["refresh_token"], f.refresh)
				}
				c.token("creds/x")
			}
			seen := map[string]int{}
			for _, rt := range f.presented {
				seen[rt]++
			}
			if seen["seed-1"] > 1 {
				t.Errorf("the spent seed was presented again: %v", f.presented)
			}
		})
	}
}

// A config write whose token record Put fails. The record is stored before
// the config, so nothing of the write is stored: a restart (or a standby,
// or the new active node) serves a token of the stored config's secret.
func TestConfigWriteFailingAtTheRecordKeepsTheStoredSecret(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	c.token("creds/x")

	c.storage.mu.Lock()
	c.storage.failKey = tokenPrefix + "x"
	c.storage.mu.Unlock()
	resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"secret": "s2"})
	if err == nil && (resp == nil || !resp.IsError()) {
		t.Fatal("the write did not fail")
	}
	c.storage.mu.Lock()
	c.storage.failKey = ""
	c.storage.mu.Unlock()

	cfg, _ := readConfig(context.Background(), c.raw, "x")
	b2 := c.newBackend(nil)
	resp, err = c.doOn(b2, logical.ReadOperation, "creds/x", nil)
	if err != nil || resp.IsError() {
		t.Fatalf("restart: %v %v", resp, err)
	}
	got := resp.Data["access_token"].(string)
	if f.secretOf[got] != cfg.Secrets["secret"] {
		t.Errorf("storage holds config secret %q but a restart serves a token minted from %q", cfg.Secrets["secret"], f.secretOf[got])
	}
}

// A ChatApp config write whose verifying refresh rotated the pair stores its
// token record and then fails to store the config. The stored record holds
// the rotation, so the next refresh presents the refresh token ChatApp
// issued last, not a retired one.
func TestConfigWriteStoreFailureKeepsTheVerifiedRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	c.storage.mu.Lock()
	c.storage.failKey = configPrefix + "x"
	c.storage.mu.Unlock()
	resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}) // verified: rotates
	if err == nil && (resp == nil || !resp.IsError()) {
		t.Fatal("the write did not fail")
	}
	c.storage.mu.Lock()
	c.storage.failKey = ""
	c.storage.mu.Unlock()

	resp, err = c.do(logical.UpdateOperation, "rotate-root/x", nil)
	if err != nil || resp.IsError() {
		t.Errorf("after a failed config write the next refresh presented a dead refresh token: %v %v (presented %v)", err, resp.Error(), f.presented)
	}
}

// delFailStorage fails Deletes of one key.
type delFailStorage struct {
	logical.Storage
	key string
}

func (s *delFailStorage) Delete(ctx context.Context, k string) error {
	if k == s.key {
		return fmt.Errorf("injected delete failure for %s", k)
	}
	return s.Storage.Delete(ctx, k)
}

// A delete that fails half way returns the error and leaves storage and
// this node consistent: the config is deleted before its token record, so a
// failure leaves either the whole config (record and rotated secret with
// it, still served) or a record without a config, which nothing serves and
// a retried delete removes.
func TestDeleteThatFailsHalfWayServesExactlyWhatStorageHolds(t *testing.T) {
	cases := []struct {
		name       string
		failKey    string
		wantConfig bool // config/x still stored after the failed delete
	}{
		{"config delete fails: both stay", configPrefix + "x", true},
		{"token delete fails: the config is gone, the record stays", tokenPrefix + "x", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := finamLike()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
			first := c.token("creds/x")
			c.storage.Storage = &delFailStorage{Storage: c.raw, key: tc.failKey}

			resp, err := c.do(logical.DeleteOperation, "config/x", nil)
			if err == nil && (resp == nil || !resp.IsError()) {
				t.Fatal("a delete whose storage delete failed reported success")
			}
			if e, _ := c.raw.Get(context.Background(), configPrefix+"x"); (e != nil) != tc.wantConfig {
				t.Fatalf("config/x stored = %v after the failed delete, want %v", e != nil, tc.wantConfig)
			}
			if _, ok := c.stored("x"); !ok {
				t.Fatal("token/x is gone although its delete failed or never ran")
			}
			calls := f.callCount()
			resp, err = c.do(logical.ReadOperation, "creds/x", nil)
			switch {
			case tc.wantConfig && (err != nil || resp.IsError() || resp.Data["access_token"] != first):
				t.Errorf("the surviving config did not serve its stored token: %v %v", err, resp)
			case !tc.wantConfig && statusOf(resp, err) != 404:
				t.Errorf("a record without its config was served: %v %v", err, resp)
			}
			if n := f.callCount() - calls; n != 0 {
				t.Errorf("the read after a failed delete cost %d mints", n)
			}
			// Once storage works again the delete completes and nothing is served.
			c.storage.Storage = c.raw
			c.ok(logical.DeleteOperation, "config/x", nil)
			if resp, err := c.do(logical.ReadOperation, "creds/x", nil); err == nil && resp != nil && !resp.IsError() {
				t.Errorf("creds/x still serves %v after the delete succeeded", resp.Data["access_token"])
			}
		})
	}
}

// A rotation record's replay meets a refused refresh token. Replaying cannot
// cure a refusal, so walRollback drops the record at once instead of
// presenting the dead refresh token (and spending a make) every rollback
// interval.
func TestRefusedRecoveryDropsItsRecord(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")
	stored := f.refresh
	// A crash after ChatApp rotated: the broker holds a refresh token storage never got.
	f.mu.Lock()
	f.refresh = "rt-lost"
	f.mu.Unlock()
	data := map[string]any{"config": "x", "started": c.clock.Now().Format(time.RFC3339)}
	// Vault keeps a record whose rollback returns an error and replays it
	// every interval; a refusal cannot be cured by replaying, so the
	// record must go at the first one.
	if err := c.b.walRollback(context.Background(), &logical.Request{Storage: c.storage}, walRotation, data); err != nil {
		t.Errorf("a refused recovery kept the record for another replay: %v", err)
	}
	n := 0
	for _, rt := range f.presented {
		if rt == stored {
			n++
		}
	}
	if n != 1 { // once, by the recovery
		t.Errorf("the stored refresh token was presented %d times, want 1", n)
	}
}

// An undecodable token/<name> (a partial write, a bad migration). Loading
// gives up only that record and starts without a token, so a config write
// repairs the config; no delete and re-create is needed.
func TestUndecodableTokenRecordDoesNotBlockAConfigWrite(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	b2 := c.newBackend(nil)
	if err := c.raw.Put(context.Background(), &logical.StorageEntry{Key: tokenPrefix + "x", Value: []byte("{not json")}); err != nil {
		t.Fatal(err)
	}
	resp, err := c.doOn(b2, logical.UpdateOperation, "config/x", map[string]any{"secret": "s2"})
	if err != nil || resp.IsError() {
		t.Errorf("a config write cannot repair a config whose token record is unreadable: %v %v", err, resp.Error())
	}
}

// holdDelStorage holds the next Delete whose key has a prefix.
type holdDelStorage struct {
	logical.Storage
	prefix  string
	hit     chan struct{}
	release chan struct{}
	once    chan struct{}
}

func (s *holdDelStorage) Delete(ctx context.Context, k string) error {
	if strings.HasPrefix(k, s.prefix) {
		select {
		case <-s.once:
		default:
			close(s.once)
			close(s.hit)
			if !brokertest.Held(s.release) {
				return errNeverReleased
			}
		}
	}
	return s.Storage.Delete(ctx, k)
}

// A delete lands while a refresh that has stored its record deletes its
// rotation record. The refresh reschedules under the owner lock, before the
// delete can run, so the delete's unscheduling is never undone: nothing of
// the deleted config stays in the schedule or the due/ index.
func TestDeleteDuringMintLeavesNothingScheduled(t *testing.T) {
	f := chatLike()
	c := newFakeHarness(t, f)
	// verify=false: the write schedules nothing (no pair yet), so only the
	// refreshes below can have scheduled the config.
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-1", "verify": false})
	c.token("creds/x")
	hs := &holdDelStorage{Storage: c.raw, prefix: "wal/", hit: make(chan struct{}), release: make(chan struct{}), once: make(chan struct{})}
	c.storage.Storage = hs
	releaseDel := sync.OnceFunc(func() { close(hs.release) })
	t.Cleanup(releaseDel) // before the backend's Clean, also when the test fails
	c.dueRefresh("creds/x")
	waitFor(t, hs.hit, "the refresh never deleted its rotation record") // the refresh stored its record, released the owner, and deletes its rotation record
	// The positive case first: the refresh did schedule the config's next
	// rotation (else the check below passes when nothing is ever scheduled).
	if scheduled, idx := c.scheduled("x"); !scheduled || len(idx) != 1 {
		t.Fatalf("the refresh did not schedule the rotating config's next rotation (memory=%v, index=%v)", scheduled, idx)
	}
	c.ok(logical.DeleteOperation, "config/x", nil)
	releaseDel()
	c.waitIdle("x")
	waitGroup(t, &c.b.wg, "the backend's background work never finished")

	if scheduled, idx := c.scheduled("x"); scheduled || len(idx) > 0 {
		t.Errorf("a deleted config is scheduled again (memory=%v, index=%v)", scheduled, idx)
	}
}

// scheduled reports whether name is in the backend's in-memory schedule
// and which entries of the persisted due/ index name it.
func (h *harness) scheduled(name string) (bool, []string) {
	h.t.Helper()
	h.b.sched.mu.Lock()
	_, inMemory := h.b.sched.items[name]
	h.b.sched.mu.Unlock()
	return inMemory, dueEntries(h.t, h.raw, name)
}

// dueEntries lists the persisted schedule index's entries for name.
func dueEntries(t testing.TB, s logical.Storage, name string) []string {
	t.Helper()
	var idx []string
	hours, err := s.List(context.Background(), duePrefix)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hours {
		names, err := s.List(context.Background(), duePrefix+h)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if n == name {
				idx = append(idx, duePrefix+h+n)
			}
		}
	}
	return idx
}
