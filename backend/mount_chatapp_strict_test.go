package backend

import (
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// TestMountChatAppAccessDiesAtRefresh runs the plugin against the strict variant
// of an UNCONFIRMED fact: a refresh kills the old access token. The plugin
// must then refresh only when the access token nears its end (never
// mid-life), hand out the new token after every refresh it makes (the
// refresh ahead, a read past the usable life, rotate-root), and never serve
// the token a refresh killed.
func TestMountChatAppAccessDiesAtRefresh(t *testing.T) {
	steps := []struct {
		name string
		// act moves time or asks for a rotation; the read follows.
		act func(h *harness)
		// refreshes is how many tokens.refresh calls the step may cost.
		refreshes int
	}{
		{"reads at mid-life refresh nothing", func(h *harness) { h.clock.Advance(12 * time.Hour) }, 0},
		{"a read past the usable life refreshes once", func(h *harness) { h.clock.Advance(12*time.Hour - 30*time.Second) }, 1},
		{"rotate-root refreshes once", func(h *harness) { h.ok(logical.UpdateOperation, "rotate-root/chat", nil) }, 1},
	}
	h := newSandboxHarness(t, sandbox.Options{})
	h.sb.SetChatAppAccessDiesAtRefresh(true)
	if resp, err := h.do(logical.UpdateOperation, "config/chat", map[string]any{"provider": "chatapp", "email": sandbox.ChatAppEmail,
		"password": sandbox.ChatAppPassword, "app_id": sandbox.ChatAppAppID, "base_url": h.url}); errText(resp, err) != "" {
		t.Fatal(errText(resp, err))
	}
	read := func() string {
		t.Helper()
		return h.ok(logical.ReadOperation, "creds/chat", nil).Data["access_token"].(string)
	}
	current := read()
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := h.sb.Calls(sandbox.ChatAppRefreshEP)
			makes := h.sb.Calls(sandbox.ChatAppMakeEP)
			st.act(h)
			got := read()
			if n := h.sb.Calls(sandbox.ChatAppRefreshEP) - before; n != st.refreshes {
				t.Fatalf("%d refreshes, want %d", n, st.refreshes)
			}
			if h.sb.Calls(sandbox.ChatAppMakeEP) != makes {
				t.Fatal("tokens.make was spent")
			}
			if !h.sb.ChatAppAccessValid(got) {
				t.Fatal("the plugin handed out an access token ChatApp no longer accepts")
			}
			if st.refreshes == 0 {
				if got != current {
					t.Fatal("the access token changed without a refresh")
				}
				return
			}
			if got == current || h.sb.ChatAppAccessValid(current) {
				t.Fatalf("after a refresh: new token served = %v, old token alive = %v", got != current, h.sb.ChatAppAccessValid(current))
			}
			current = got
		})
	}
}
