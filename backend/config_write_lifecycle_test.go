package backend

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// storedConfig reads config/<name> as storage holds it.
func (h *harness) storedConfig(name string) *brokerConfig {
	h.t.Helper()
	cfg, err := readConfig(context.Background(), h.raw, name)
	if err != nil {
		h.t.Fatal(err)
	}
	return cfg
}

// A config update whose verification fails (broker refusal, then a guard)
// stores nothing and leaves the in-memory config, its secrets and its cached
// token exactly as they were.
func TestFailedVerifyLeavesEverythingAsItWas(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(f *fakeBroker)
		write map[string]any
		want  int
	}{
		{"broker refuses", func(f *fakeBroker) {
			f.fail = &upstream.Error{Broker: "Fake", Op: "mint", Failure: upstream.Unauthorized, Status: 401}
		}, map[string]any{"secret": "s2", "ttl": 60}, 400},
		{"broker rejects other 4xx", func(f *fakeBroker) {
			f.fail = &upstream.Error{Broker: "Fake", Op: "mint", Failure: upstream.Rejected, Status: 422}
		}, map[string]any{"secret": "s2", "ttl": 60}, 400},
		{"broker down", func(f *fakeBroker) {
			f.fail = &upstream.Error{Broker: "Fake", Op: "mint", Failure: upstream.Unavailable, Status: 503}
		}, map[string]any{"secret": "s2", "ttl": 60}, 502},
		{"guard", func(f *fakeBroker) { f.readOnly = false },
			map[string]any{"secret": "s2", "ttl": 60, "require_readonly": true}, 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := finamLike()
			c := newFakeHarness(t, f)
			c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1", "ttl": 30})
			tok := c.token("creds/x")
			recBefore, _ := c.stored("x")
			calls := f.callCount()

			f.mu.Lock()
			tc.setup(f)
			f.mu.Unlock()
			resp, err := c.do(logical.UpdateOperation, "config/x", tc.write)
			if got := statusOf(resp, err); got != tc.want {
				t.Fatalf("status %d, want %d: %v %v", got, tc.want, resp, err)
			}
			f.mu.Lock()
			f.fail, f.readOnly = nil, true
			f.mu.Unlock()

			if cfg := c.storedConfig("x"); cfg.Secrets["secret"] != "s1" || cfg.TTL != 30*time.Second || cfg.RequireReadOnly {
				t.Fatalf("storage changed by a failed write: %+v", cfg)
			}
			if rec, _ := c.stored("x"); rec.Token == nil || rec.Token.ID != recBefore.Token.ID || rec.ConfigHash != recBefore.ConfigHash {
				t.Fatalf("token record changed by a failed write: %+v", rec)
			}
			var mem *brokerConfig
			c.inState("x", func(st *configState) { mem = st.cfg })
			if mem.Secrets["secret"] != "s1" || mem.TTL != 30*time.Second || mem.RequireReadOnly {
				t.Fatalf("in-memory config changed by a failed write: %+v", mem)
			}
			if got := c.token("creds/x"); got != tok {
				t.Fatalf("cached token replaced: %q, was %q", got, tok)
			}
			if f.callCount() != calls+1 {
				t.Fatalf("creds after the failed write called the broker (%d calls, want %d)", f.callCount(), calls+1)
			}
			// The next refresh still presents the stored secret.
			c.dueRefresh("creds/x")
			c.waitIdle("x")
			rec, _ := c.stored("x")
			if rec.Token == nil || f.secretOf[rec.Token.AccessToken] != "s1" {
				t.Fatalf("refresh after the failed write used another secret: %+v", rec.Token)
			}
		})
	}
}

// A delete that lands while a config write verifies its secret wins: the
// write stores nothing (409) and the config stays gone, in storage and in
// memory.
func TestDeleteDuringVerifyingWriteStoresNothing(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	c.token("creds/x")

	entered, release := f.holdNext()
	type result struct {
		resp *logical.Response
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := c.do(logical.UpdateOperation, "config/x", map[string]any{"secret": "s2"})
		done <- result{resp, err}
	}()
	waitFor(t, entered, "the write's verifying call never reached the broker")
	c.ok(logical.DeleteOperation, "config/x", nil)
	release()
	r := waitFor(t, done, "the config write never returned after the delete")
	if got := statusOf(r.resp, r.err); got != http.StatusConflict {
		t.Fatalf("status %d, want 409: %v %v", got, r.resp, r.err)
	}
	if cfg := c.storedConfig("x"); cfg != nil {
		t.Fatalf("a write that lost to a delete stored the config: %+v", cfg)
	}
	if _, ok := c.stored("x"); ok {
		t.Fatal("a write that lost to a delete stored a token record")
	}
	resp, err := c.do(logical.ReadOperation, "creds/x", nil)
	if statusOf(resp, err) != 404 || !strings.Contains(errText(resp, err), "no config or role named") {
		t.Fatalf("creds after the delete: %v %v", resp, err)
	}
}

// A config write that queues behind a refresh running at the broker waits
// for it, and what it stores (the new secret's token) is what stays.
func TestConfigWriteQueuedBehindRefreshAtBroker(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	c.token("creds/x")

	entered, release := f.holdNext()
	c.dueRefresh("creds/x")
	waitFor(t, entered, "the background refresh never reached the broker") // the background refresh under s1 is at the broker
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.ok(logical.UpdateOperation, "config/x", map[string]any{"secret": "s2"})
	}()
	c.queued("x", done)
	release()
	waitFor(t, done, "the config write queued behind the refresh never returned")
	c.waitIdle("x")
	rec, _ := c.stored("x")
	if rec.Token == nil || f.secretOf[rec.Token.AccessToken] != "s2" {
		t.Fatalf("storage holds a token of the old secret: %+v", rec.Token)
	}
	if got := c.token("creds/x"); f.secretOf[got] != "s2" {
		t.Fatalf("creds serve a token of the old secret: %q", got)
	}
}

// expiringBroker is a fake whose Spec takes refresh_token_expires_at.
type expiringBroker struct{ *fakeBroker }

func (d expiringBroker) Spec() provider.Spec {
	s := d.fakeBroker.Spec()
	s.DeclaredExpiry = true
	return s
}

// An update (verify=true by default) of a config whose declared
// refresh_token_expires_at has passed.
func TestUpdateAfterDeclaredExpiryIsRefused(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	conf := logical.TestBackendConfig()
	conf.StorageView = c.storage
	lb, err := FactoryWith(Options{Version: "test", Providers: map[string]provider.Provider{"fake": expiringBroker{f}}, Clock: c.clock})(context.Background(), conf)
	if err != nil {
		t.Fatal(err)
	}
	b := lb.(*backend)
	t.Cleanup(func() { b.Clean(context.Background()) })
	c.b = b
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1", "refresh_token_expires_at": c.clock.Now().Add(48 * time.Hour).Format(time.RFC3339)})
	c.clock.Advance(72 * time.Hour)
	// The update keeps the passed date: the stored secret is not used, and
	// that is the caller's to fix (400), as it is for creds.
	for _, r := range []struct {
		op   logical.Operation
		path string
		data map[string]any
	}{{logical.UpdateOperation, "config/x", map[string]any{"ttl": 60}}, {logical.ReadOperation, "creds/x", nil}} {
		resp, err := c.do(r.op, r.path, r.data)
		if got := statusOf(resp, err); got != http.StatusBadRequest || !strings.Contains(errText(resp, err), "long-lived secret expired") {
			t.Errorf("%s after the declared expiry: status %d, want 400 naming the expiry: %v", r.path, got, errText(resp, err))
		}
	}
}
