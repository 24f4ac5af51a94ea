package backend

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"

	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// The token core's guarantees, each with its race window opened on purpose:
// storage that holds or fails one call, a broker that holds its answer, the
// hand-moved clock. No test here sleeps.

// wait fails the test unless ch is closed within a few seconds.
func wait(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out: %s", what)
	}
}

// goDo runs one request in the background; the returned channel is closed
// when it has answered, with its outcome in *resp and *err.
func (h *harness) goDo(op logical.Operation, path string, data map[string]any, resp **logical.Response, err *error) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		*resp, *err = h.do(op, path, data)
	}()
	return done
}

// exists reports whether storage holds key.
func (h *harness) exists(key string) bool {
	h.t.Helper()
	e, err := h.raw.Get(context.Background(), key)
	if err != nil {
		h.t.Fatal(err)
	}
	return e != nil
}

// A delete owns the config's name until both storage deletes are done: an
// update or a retire landing in between waits, and finds nothing; a read
// there is served (it came before the delete finished) but nothing of the
// config survives the delete's return.
func TestDeleteOwnsTheNameUntilStorageIsDone(t *testing.T) {
	for _, racer := range []struct {
		name string
		op   logical.Operation
		path string
		data map[string]any
	}{
		{"creds read", logical.ReadOperation, "creds/x", nil},
		{"config update", logical.UpdateOperation, "config/x", map[string]any{"ttl": "10m"}},
		{"retire", logical.UpdateOperation, "config/x/retire", nil},
	} {
		t.Run(racer.name, func(t *testing.T) {
			f := finamLike()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
			c.token("creds/x")

			hit, release := c.storage.holdNextDelete()
			var (
				delResp *logical.Response
				delErr  error
			)
			deleted := c.goDo(logical.DeleteOperation, "config/x", nil, &delResp, &delErr)
			wait(t, hit, "the delete never reached storage")
			var (
				resp *logical.Response
				err  error
			)
			raced := c.goDo(racer.op, racer.path, racer.data, &resp, &err)
			c.queued("x", raced) // answered already, or waiting on the name
			release()
			wait(t, deleted, "the delete did not finish")
			wait(t, raced, "the "+racer.name+" did not finish")
			if delErr != nil || delResp.IsError() {
				t.Fatalf("delete: %v %v", delErr, delResp)
			}
			if racer.op != logical.ReadOperation && err == nil && !resp.IsError() {
				t.Errorf("a %s racing the delete succeeded: %v", racer.name, resp.Data)
			}
			c.waitIdle("x")
			calls := f.callCount()
			if resp, err := c.do(logical.ReadOperation, "creds/x", nil); err == nil && !resp.IsError() {
				t.Errorf("after the delete returned, creds/x served %q", resp.Data["access_token"])
			}
			if c.exists(configPrefix+"x") || c.exists(tokenPrefix+"x") {
				t.Errorf("storage after the delete: config %v, token record %v", c.exists(configPrefix+"x"), c.exists(tokenPrefix+"x"))
			}
			if n := f.callCount() - calls; n != 0 {
				t.Errorf("the deleted config's secret went to the broker %d more times", n)
			}
		})
	}
}

// A rotated secret goes only to the endpoint that issued it. A write moving
// a rotating config from A to B stores its record (holding B's rotation)
// and then fails to store the config: the config stays at A and must present
// A's own rotated secret, never B's, on this node and after a restart.
func TestRotatedSecretStaysWithTheEndpointThatIssuedIt(t *testing.T) {
	const endpointA, endpointB = "http://127.0.0.1:1", "http://127.0.0.2:1"
	for _, tc := range []struct {
		name    string
		restart bool
		// resend: the refresh token the moving write sends ("" = a new seed;
		// "current" = the value A's broker issued, which the write's caller
		// may well hold).
		resend string
	}{
		{"same node, new seed", false, ""},
		{"same node, A's current token re-sent", false, "current"},
		{"after a restart, new seed", true, ""},
		{"after a restart, A's current token re-sent", true, "current"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			restart := tc.restart
			f := chatLike()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fakerot", "secret": "s1", "refresh_token": "seed-a", "base_url": endpointA})
			c.token("creds/x")
			rotatedAtA := f.refresh

			seed := "seed-b"
			if tc.resend == "current" {
				seed = rotatedAtA
			}
			c.storage.setFailKey(configPrefix + "x")
			_, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"secret": "s1", "refresh_token": seed, "base_url": endpointB})
			if err == nil {
				t.Fatal("the config write did not fail")
			}
			c.storage.setFailKey("")
			rotatedAtB := f.refresh
			if rotatedAtA == rotatedAtB {
				t.Fatal("the write's verifying call did not rotate")
			}
			if got := c.storedConfig("x").BaseURL; got != endpointA {
				t.Fatalf("the stored config moved to %q", got)
			}
			b := c.b
			if restart {
				b = c.newBackend(nil)
			}
			f.mu.Lock()
			f.sent = nil
			f.refresh = rotatedAtA // A's broker still accepts A's token
			f.mu.Unlock()
			if resp, err := c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
				t.Fatalf("rotate-root at A: %v %v", err, resp)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			for _, s := range f.sent {
				if s.refreshToken == rotatedAtB {
					t.Errorf("B's rotated refresh token was sent to %s", s.baseURL)
				}
				if s.baseURL == endpointA && s.refreshToken != rotatedAtA {
					t.Errorf("A was sent %q, not its own rotated token %q", s.refreshToken, rotatedAtA)
				}
			}
			if len(f.sent) == 0 {
				t.Error("rotate-root made no call")
			}
		})
	}
}

// A storage error reading the token record is an error, not an unreadable
// record: the record is kept, the next read serves its token, and nothing
// is minted or overwritten. Only an undecodable record is given up.
func TestTransientRecordReadErrorKeepsTheRecord(t *testing.T) {
	f, c := rotatingConfig(t)
	first := c.token("creds/x")
	before, _ := c.stored("x")
	calls := f.callCount()

	b := c.newBackend(nil) // a reload: nothing in memory
	c.storage.failGets(tokenPrefix+"x", 1)
	if resp, err := c.doOn(b, logical.ReadOperation, "creds/x", nil); err == nil && !resp.IsError() {
		t.Fatalf("a read whose record could not be read succeeded: %v", resp.Data)
	}
	resp, err := c.doOn(b, logical.ReadOperation, "creds/x", nil)
	if err != nil || resp.IsError() {
		t.Fatalf("the next read failed: %v %v", err, resp)
	}
	if got := resp.Data["access_token"]; got != first {
		t.Errorf("the next read got %q, not the stored token %q", got, first)
	}
	after, _ := c.stored("x")
	if n := f.callCount() - calls; n != 0 || after.Rotated["refresh_token"] != before.Rotated["refresh_token"] {
		t.Errorf("one failed read cost %d broker calls; rotated token %q -> %q", n, before.Rotated["refresh_token"], after.Rotated["refresh_token"])
	}

	// A tick cut short as the first touch after a reload keeps the config
	// scheduled.
	b2 := c.newBackend(nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	b2.keepAlive(ctx, c.storage, "x")
	b2.sched.mu.Lock()
	_, scheduled := b2.sched.items["x"]
	b2.sched.mu.Unlock()
	if !scheduled {
		t.Error("a tick cut short while loading the config dropped it from the schedule")
	}
}

// Unloading the mount (reload, step-down, seal) lets a refresh the broker
// is answering finish and be stored before the backend's context ends: a
// rotation the broker applied is never dropped there.
func TestCleanupLetsAnAnsweredRotationBeStored(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	f.loseAnswerOnCancel = true
	entered, release := f.holdNext()
	c.dueRefresh("creds/x")
	wait(t, entered, "the background refresh never reached the broker")
	cleaned := make(chan struct{})
	go func() {
		defer close(cleaned)
		c.b.Clean(context.Background())
	}()
	until(t, "cleanup never started", func() bool { return c.b.closing.Load() })
	release() // the broker rotates and answers
	wait(t, cleaned, "cleanup did not return")

	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the rotation the broker applied was dropped: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	calls := f.callCount()
	b := c.newBackend(nil)
	if resp, err := c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
		t.Fatalf("after the reload the stored refresh token did not work: %v %v", err, resp)
	}
	if f.refused != 0 || f.callCount()-calls != 1 {
		t.Errorf("after the reload: %d refused refresh tokens, %d calls", f.refused, f.callCount()-calls)
	}
}

// A rotated secret whose storage write failed is stored at unload, and its
// rotation record is kept until then: the next instance presents it and
// spends nothing.
func TestRotationWhoseWriteFailedIsStoredAtUnload(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")

	c.storage.setFailKey(tokenPrefix + "x")
	if resp, err := c.do(logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
		t.Fatalf("rotate-root: %v %v", err, resp)
	}
	c.storage.setFailKey("")
	if rec, _ := c.stored("x"); rec.Rotated["refresh_token"] == f.refresh {
		t.Fatal("the failed write was stored after all")
	}
	if keys, _ := c.raw.List(context.Background(), "wal/"); len(keys) == 0 {
		t.Error("the rotation record was deleted though the rotation is not stored")
	}
	c.b.Clean(context.Background())
	if rec, _ := c.stored("x"); rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("unload did not store the rotation: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	if keys, _ := c.raw.List(context.Background(), "wal/"); len(keys) != 0 {
		t.Errorf("rotation records left after the rotation was stored: %v", keys)
	}
	b := c.newBackend(nil)
	if resp, err := c.doOn(b, logical.UpdateOperation, "rotate-root/x", nil); err != nil || resp.IsError() {
		t.Fatalf("the next instance's refresh failed: %v %v", err, resp)
	}
	if f.refused != 0 {
		t.Errorf("%d refresh tokens presented after the broker retired them", f.refused)
	}
}

// A delete that fails half way leaves the config whole: the config and its
// token record (and rotated secret) survive together, and nothing is spent.
func TestFailedDeleteLeavesTheConfigWhole(t *testing.T) {
	f, c := rotatingConfig(t)
	tok := c.token("creds/x")
	c.storage.setFailDelete(configPrefix + "x")
	if resp, err := c.do(logical.DeleteOperation, "config/x", nil); err == nil && !resp.IsError() {
		t.Fatal("the delete did not fail")
	}
	c.storage.setFailDelete("")
	rec, ok := c.stored("x")
	if !ok || rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the surviving config lost its pair: record stored %v, rotated %q, broker %q", ok, rec.Rotated["refresh_token"], f.refresh)
	}
	calls := f.callCount()
	if got := c.token("creds/x"); got != tok {
		t.Errorf("after the failed delete creds/x served %q, not the cached %q", got, tok)
	}
	if n := f.callCount() - calls; n != 0 {
		t.Errorf("the failed delete cost %d broker calls", n)
	}
}

// A config write that a guard refuses after the broker rotated the stored
// config's secret keeps (and stores) the rotation: the old value is spent.
func TestGuardRefusedWriteKeepsTheRotationItCaused(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")
	f.mu.Lock()
	f.readOnly = false
	f.mu.Unlock()
	resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"require_readonly": true})
	if statusOf(resp, err) != 400 {
		t.Fatalf("a write refused by its guard answered %d: %v %v", statusOf(resp, err), err, resp)
	}
	if rec, _ := c.stored("x"); rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the rotation the refused write caused is not stored: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	c.ok(logical.UpdateOperation, "rotate-root/x", nil)
	if f.refused != 0 {
		t.Errorf("%d refresh tokens presented after the broker retired them", f.refused)
	}
}

// Refused writes leave no connection pool behind: a pool lives as long as
// a client uses it.
func TestRefusedWritesLeaveNoConnectionPools(t *testing.T) {
	f := finamLike()
	f.fail = &upstream.Error{Broker: "Fake", Op: "mint", Failure: upstream.Unauthorized, Status: 401, Message: "no"}
	c := newFakeHarness(t, f)
	pools := func() int {
		c.b.trMu.Lock()
		defer c.b.trMu.Unlock()
		return len(c.b.transports)
	}
	before := pools()
	for i := range 5 {
		resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1", "ca_cert": testCA(t, i)})
		if statusOf(resp, err) != 400 {
			t.Fatalf("write %d was not refused: %v %v", i, err, resp)
		}
	}
	if got := pools(); got != before {
		t.Errorf("5 refused writes with their own CAs left %d pools (before: %d)", got, before)
	}
	f.fail = nil
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1", "ca_cert": testCA(t, 9)})
	if got := pools(); got != before+1 {
		t.Errorf("a stored config with its own CA: %d pools, want %d", got, before+1)
	}
	c.ok(logical.DeleteOperation, "config/x", nil)
	if got := pools(); got != before {
		t.Errorf("after the delete: %d pools, want %d", got, before)
	}
}

func testCA(t *testing.T, serial int) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(serial + 1)), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// A deleted config's metric series go with it.
func TestDeletedConfigDropsItsMetricSeries(t *testing.T) {
	c := newFakeHarness(t, finamLike())
	for _, name := range []string{"gone", "kept"} {
		c.ok(logical.UpdateOperation, "config/"+name, map[string]any{"provider": "fake", "secret": "s1"})
		c.token("creds/" + name)
	}
	c.ok(logical.DeleteOperation, "config/gone", nil)
	body, err := c.b.metrics.expose(c.b)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(body), `config="gone"`) {
		t.Errorf("the deleted config still has series:\n%s", grepLines(string(body), `config="gone"`))
	}
	if !strings.Contains(string(body), `config="kept"`) {
		t.Error("the kept config lost its series")
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// After the incident switch no lease keeps renewing the retired token: a
// renew ends the lease now (a second) and says why, so its holder reads
// again and gets a token minted after the retire.
func TestRenewOfRetiredTokenEndsTheLease(t *testing.T) {
	c := newFakeHarness(t, finamLike())
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	lease := c.ok(logical.ReadOperation, "creds/x", nil).Secret
	renew := func() *logical.Response {
		t.Helper()
		sec := *lease
		sec.IssueTime = c.clock.Now()
		resp, err := c.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: c.storage, Secret: &sec})
		if err != nil || resp.IsError() {
			t.Fatalf("renew: %v %v", err, resp)
		}
		return resp
	}
	if ttl := renew().Secret.TTL; ttl < time.Minute {
		t.Fatalf("before the retire a renew gave %s", ttl)
	}
	c.ok(logical.UpdateOperation, "config/x/retire", nil)
	resp := renew()
	if resp.Secret.TTL > time.Second {
		t.Errorf("a lease on the retired token renewed for %s", resp.Secret.TTL)
	}
	if !strings.Contains(strings.Join(resp.Warnings, " "), "retired") {
		t.Errorf("the renew did not say the token was retired: %v", resp.Warnings)
	}
	// A lease on the new token renews as usual.
	lease = c.ok(logical.ReadOperation, "creds/x", nil).Secret
	if ttl := renew().Secret.TTL; ttl < time.Minute {
		t.Errorf("a lease on the token minted after the retire renewed for %s", ttl)
	}
}

// An answer that rotates the secret but is refused for another field (a
// missing end time, say) still has its rotation stored: the old refresh
// token is spent, and the next refresh presents the new one.
func TestRefreshFailingAfterRotationKeepsTheRotation(t *testing.T) {
	f, c := rotatingConfig(t)
	c.token("creds/x")
	f.failAfterRotating = &upstream.Error{Broker: "Fake", Op: "refresh", Failure: upstream.BadResponse, Message: "response lacks refreshTokenEndTime"}
	resp, err := c.do(logical.UpdateOperation, "rotate-root/x", nil)
	if err == nil && !resp.IsError() {
		t.Fatal("rotate-root succeeded on a refused answer")
	}
	rec, _ := c.stored("x")
	if rec.Rotated["refresh_token"] != f.refresh {
		t.Fatalf("the rotation in a refused answer was dropped: storage %q, broker %q", rec.Rotated["refresh_token"], f.refresh)
	}
	if rec.SecretExpiresAt.IsZero() {
		t.Error("an answer without the new end time erased the known one (the next rotation would never be scheduled)")
	}
	c.ok(logical.UpdateOperation, "rotate-root/x", nil)
	if f.refused != 0 {
		t.Errorf("%d refresh tokens presented after the broker retired them", f.refused)
	}
}
