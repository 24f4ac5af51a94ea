package backend

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// A ChatApp pair made on the read path (the config stored with
// verify=false, then one creds read) is rotated in the background like any
// other: the read's refresh schedules the pair's rotation at half the
// refresh token's life, a tick then rotates it, and the schedule index
// still holds the config afterwards (a restart finds it). The config write
// schedules nothing here (there is no pair yet), so only the refresh can.
func TestReadPathPairIsRotatedAtHalfLife(t *testing.T) {
	const refreshLife = 14 * 24 * time.Hour
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetChatAppLifetimes(24*time.Hour, refreshLife)
	if resp, err := h.writeChatApp("chat", map[string]any{"verify": false}); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	if idx := dueEntries(t, h.storage, "chat"); len(idx) != 0 {
		t.Fatalf("a config without a pair is in the schedule index: %v", idx)
	}
	h.ok(logical.ReadOperation, "creds/chat", nil) // makes the pair
	rt := h.storedRefresh("chat")
	if rt == "" {
		t.Fatal("the creds read stored no refresh token")
	}
	if idx := dueEntries(t, h.storage, "chat"); len(idx) != 1 {
		t.Fatalf("the read's refresh did not schedule the pair's rotation: index %v", idx)
	}

	tick := func() {
		t.Helper()
		if err := h.b.periodicFunc(context.Background(), &logical.Request{Storage: h.storage}); err != nil {
			t.Fatal(err)
		}
	}
	h.clock.Advance(refreshLife/2 - time.Hour)
	tick()
	if h.storedRefresh("chat") != rt {
		t.Fatal("rotated before half the refresh token's life")
	}
	h.clock.Advance(time.Hour + time.Minute)
	tick()
	got := h.storedRefresh("chat")
	if got == rt || !h.sb.ChatAppRefreshValid(got) {
		t.Fatalf("a tick at half the refresh token's life did not rotate it (stored %q, was %q)", got, rt)
	}
	if n := h.sb.Calls(sandbox.ChatAppMakeEP); n != 1 {
		t.Fatalf("the rotation made a new pair (%d makes in all, want the read's one)", n)
	}
	if idx := dueEntries(t, h.storage, "chat"); len(idx) != 1 {
		t.Fatalf("after the rotation the schedule index holds %v, want the config's next rotation", idx)
	}
}
