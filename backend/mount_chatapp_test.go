package backend

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func (h *harness) writeChatApp(name string, extra map[string]any) (*logical.Response, error) {
	h.t.Helper()
	data := map[string]any{"provider": "chatapp", "email": sandbox.ChatAppEmail, "password": sandbox.ChatAppPassword,
		"app_id": sandbox.ChatAppAppID, "base_url": h.url}
	for k, v := range extra {
		data[k] = v
	}
	return h.do(logical.UpdateOperation, "config/"+name, data)
}

// storedRefresh is the refresh token the plugin holds for a config.
func (h *harness) storedRefresh(name string) string {
	h.t.Helper()
	rec, err := readTokenRecord(context.Background(), h.storage, name)
	if err != nil {
		h.t.Fatal(err)
	}
	return rec.Rotated["refresh_token"]
}

func TestMountChatAppCredsAndForcedRotation(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	resp, err := h.writeChatApp("chat", nil)
	if errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	if h.sb.ChatAppMakes() != 1 {
		t.Fatalf("makes = %d, want 1 (the first pair)", h.sb.ChatAppMakes())
	}
	rt1 := h.storedRefresh("chat")
	if !h.sb.ChatAppRefreshValid(rt1) {
		t.Fatal("the stored refresh token is not the live one")
	}
	creds := h.ok(logical.ReadOperation, "creds/chat", nil)
	if !h.sb.ChatAppAccessValid(creds.Data["access_token"].(string)) || creds.Data["cabinet_user_id"] == nil {
		t.Fatalf("creds: %v", creds.Data)
	}
	// 24h access token: the lease ends where its refresh is due (two
	// fifths, 9h36m, left: 14h24m... minus up to 30 s of spread).
	if want := 14*time.Hour + 24*time.Minute; creds.Secret.TTL > want || creds.Secret.TTL < want-time.Minute {
		t.Fatalf("lease TTL %v", creds.Secret.TTL)
	}

	rot := h.ok(logical.UpdateOperation, "rotate-root/chat", nil)
	for k, v := range rot.Data {
		if s, _ := v.(string); strings.Contains(s, rt1) || (len(s) > 30 && !strings.Contains(k, "_at")) {
			t.Fatalf("rotate-root shows a token in %s", k)
		}
	}
	if rot.Data["refresh_token_expires_at"] == "" || rot.Data["access_token_expires_at"] == "" {
		t.Fatalf("rotate-root: %v", rot.Data)
	}
	rt2 := h.storedRefresh("chat")
	if rt2 == rt1 || !h.sb.ChatAppRefreshValid(rt2) || h.sb.ChatAppRefreshValid(rt1) {
		t.Fatal("rotation did not store the new refresh token")
	}
	if h.sb.ChatAppMakes() != 1 {
		t.Fatalf("rotation made (%d makes)", h.sb.ChatAppMakes())
	}
	if n := h.sb.Calls(sandbox.ChatAppRefreshEP); n != 1 {
		t.Fatalf("refresh calls = %d", n)
	}

	// Restart: the pair survives, nothing is made or refreshed.
	b2 := h.newBackend(nil)
	r, err := h.doOn(b2, logical.ReadOperation, "creds/chat", nil)
	if errText(r, err) != "" || h.sb.ChatAppMakes() != 1 || h.sb.Calls(sandbox.ChatAppRefreshEP) != 1 {
		t.Fatalf("restart: %s makes=%d", errText(r, err), h.sb.ChatAppMakes())
	}

	// Finam cannot rotate through an API: a clear 400.
	h.writeFinam("finam", nil)
	r, err = h.do(logical.UpdateOperation, "rotate-root/finam", nil)
	if statusOf(r, err) != 400 || !strings.Contains(errText(r, err), "portal") {
		t.Fatalf("rotate-root of finam: %d %q", statusOf(r, err), errText(r, err))
	}
}

func TestMountChatAppSeededRefreshNeverMakes(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	// Get a live refresh token from the fake to seed with.
	if resp, err := h.writeChatApp("seed", nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	seed := h.storedRefresh("seed")
	h.ok(logical.DeleteOperation, "config/seed", nil)
	makes := h.sb.ChatAppMakes()
	if resp, err := h.writeChatApp("chat", map[string]any{"refresh_token": seed}); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	if h.sb.ChatAppMakes() != makes || h.sb.ChatAppRefreshValid(seed) {
		t.Fatal("a seeded config made a new pair or kept the old refresh token alive")
	}
	// Re-writing the config (same seed) must not reuse the stale seed.
	h.ok(logical.UpdateOperation, "config/chat", map[string]any{"ttl": "1h"})
	if h.sb.ChatAppMakes() != makes {
		t.Fatal("re-writing the config fell back to make: it reused the rotated-away seed")
	}
}

func TestMountChatAppMakeBudget(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeChatApp("chat", map[string]any{"make_budget": 2}); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	// Each revoked refresh token forces a make: the second is the last allowed.
	for i := range 3 {
		h.sb.RevokeChatAppRefresh(h.storedRefresh("chat"))
		r, err := h.do(logical.UpdateOperation, "rotate-root/chat", nil)
		msg := errText(r, err)
		switch i {
		case 0:
			if msg != "" {
				t.Fatalf("rotation %d: %s", i, msg)
			}
		default:
			if statusOf(r, err) != 429 || !containsAll(msg, "budget", "make_budget") {
				t.Fatalf("rotation %d: %d %q", i, statusOf(r, err), msg)
			}
		}
	}
	if h.sb.ChatAppMakes() != 2 {
		t.Fatalf("makes = %d, want the budget of 2", h.sb.ChatAppMakes())
	}
	r, err := h.do(logical.UpdateOperation, "config/chat", map[string]any{"make_budget": 101})
	if !strings.Contains(errText(r, err), "make_budget") {
		t.Fatalf("budget over 100 accepted: %q", errText(r, err))
	}
}

func TestMountChatAppTransientFailureNeverMakes(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeChatApp("chat", nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	h.sb.InjectFault(sandbox.ChatAppRefreshEP, 503, -1)
	r, err := h.do(logical.UpdateOperation, "rotate-root/chat", nil)
	if statusOf(r, err) != 502 {
		t.Fatalf("%d %q", statusOf(r, err), errText(r, err))
	}
	if h.sb.ChatAppMakes() != 1 {
		t.Fatal("a failing refresh fell back to make")
	}
	// The still-valid access token keeps being served.
	h.ok(logical.ReadOperation, "creds/chat", nil)
}

func TestMountChatAppPeriodicRotationAtHalfLife(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetChatAppLifetimes(24*time.Hour, 14*24*time.Hour)
	if resp, err := h.writeChatApp("chat", nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	rt := h.storedRefresh("chat")
	var moved time.Duration
	tick := func(at time.Duration) {
		h.clock.Advance(at - moved) // to at after the write, on both sides
		moved = at
		if err := h.b.periodicFunc(context.Background(), &logical.Request{Storage: h.storage}); err != nil {
			t.Fatal(err)
		}
	}
	tick(6 * 24 * time.Hour)
	if h.storedRefresh("chat") != rt {
		t.Fatal("rotated before half the refresh token's life")
	}
	tick(7*24*time.Hour + time.Minute)
	if got := h.storedRefresh("chat"); got == rt || !h.sb.ChatAppRefreshValid(got) {
		t.Fatal("not rotated at half life")
	}
	// Counted over every day: the broker's day moved on with the clock.
	if n := h.sb.Calls(sandbox.ChatAppMakeEP); n != 1 {
		t.Fatalf("periodic rotation made a new pair (%d tokens.make calls in all)", n)
	}
}

func TestMountChatAppRecoversInterruptedRotation(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeChatApp("chat", nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	// Simulate a crash after the broker rotated but before the write: the
	// broker moved on (the stored refresh token is dead) and an intent
	// record is left behind.
	h.sb.RevokeChatAppRefresh(h.storedRefresh("chat"))
	id, err := framework.PutWAL(context.Background(), h.storage, walRotation, &rotationWAL{Config: "chat", Started: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	entry, err := framework.GetWAL(context.Background(), h.storage, id)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(entry.Data)
	var data any
	json.Unmarshal(raw, &data)
	if err := h.b.walRollback(context.Background(), &logical.Request{Storage: h.storage}, walRotation, data); err != nil {
		t.Fatal(err)
	}
	if rt := h.storedRefresh("chat"); !h.sb.ChatAppRefreshValid(rt) {
		t.Fatal("recovery did not leave a live refresh token")
	}
	if h.sb.ChatAppMakes() != 2 {
		t.Fatalf("makes = %d: recovery should refresh, be refused, then make once", h.sb.ChatAppMakes())
	}
}

func TestMountChatAppRefusesGuardsItCannotCheck(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	for _, extra := range []map[string]any{{"require_readonly": true}, {"allowed_accounts": "1"}} {
		resp, err := h.writeChatApp("chat", extra)
		if statusOf(resp, err) != 400 || !strings.Contains(errText(resp, err), "cannot be checked") {
			t.Fatalf("%v: %d %q", extra, statusOf(resp, err), errText(resp, err))
		}
	}
	if h.sb.ChatAppMakes() != 0 {
		t.Fatal("a refused config spent a make")
	}
}

// A crash between ChatApp's answer and the storage write: ChatApp has
// retired the old refresh token, storage still holds it, and the rotation
// record written before the call is all that tells. Recovery through the
// record costs exactly one tokens.make, and never loops.
func TestMountChatAppCrashAfterAnswerRecoversThroughRecord(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	if resp, err := h.writeChatApp("chat", nil); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	old := h.storedRefresh("chat")
	makes := h.sb.ChatAppMakes()

	// The node that crashes: its write of the rotated pair never lands.
	h.storage.setFailKey(tokenPrefix + "chat")
	b1 := h.newBackend(nil)
	req := &logical.Request{Operation: logical.UpdateOperation, Path: "rotate-root/chat", Storage: h.storage}
	if _, err := b1.HandleRequest(context.Background(), req); err != nil {
		t.Fatalf("rotate-root: %v", err)
	}
	// The crashed node is gone: stopped while its write still fails, so
	// it can never store the pair later on storage that works again.
	b1.Clean(context.Background())
	h.storage.setFailKey("")
	if h.sb.ChatAppRefreshValid(old) || h.storedRefresh("chat") != old {
		t.Fatal("the crash was not simulated: ChatApp did not rotate, or the new pair reached storage")
	}
	ids, err := framework.ListWAL(context.Background(), h.storage)
	if err != nil || len(ids) != 1 {
		t.Fatalf("rotation records after the crash: %v %v, want 1", ids, err)
	}

	// The restarted node: Vault's rollback replays the record.
	b2 := h.newBackend(nil)
	rollback := &logical.Request{Operation: logical.RollbackOperation, Storage: h.storage, Data: map[string]any{"immediate": true}}
	for i := range 2 { // a second pass finds nothing to do
		if _, err := b2.HandleRequest(context.Background(), rollback); err != nil {
			t.Fatalf("rollback %d: %v", i+1, err)
		}
	}
	if got := h.sb.ChatAppMakes() - makes; got != 1 {
		t.Fatalf("recovery spent %d tokens.make, want exactly 1", got)
	}
	if rt := h.storedRefresh("chat"); !h.sb.ChatAppRefreshValid(rt) {
		t.Fatal("recovery did not store a live refresh token")
	}
	if ids, _ := framework.ListWAL(context.Background(), h.storage); len(ids) != 0 {
		t.Fatalf("%d rotation records left after recovery", len(ids))
	}
	if r, err := h.doOn(b2, logical.ReadOperation, "creds/chat", nil); errText(r, err) != "" {
		t.Fatal(errText(r, err))
	}
	if got := h.sb.ChatAppMakes() - makes; got != 1 {
		t.Fatalf("reads after recovery spent more makes: %d", got)
	}
}
