package e2e

import (
	"context"
	"math/rand/v2"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/cmd/broker-sandbox/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/scripts/vaulttest"
)

func chatArgs(sbURL string, extra ...string) []string {
	return append([]string{"write", "broker/config/chat", "provider=chatapp", "email=" + sandbox.ChatAppEmail,
		"password=" + sandbox.ChatAppPassword, "app_id=" + sandbox.ChatAppAppID, "base_url=" + sbURL}, extra...)
}

func TestChatAppEndToEnd(t *testing.T) {
	e := start(t, sandbox.Options{})
	e.cli(chatArgs(e.sbURL)...)
	if e.sb.ChatAppMakes() != 1 {
		t.Fatalf("makes = %d", e.sb.ChatAppMakes())
	}
	var cred secretResponse
	e.cliJSON(&cred, "read", "-format=json", "broker/creds/chat")
	if !e.sb.ChatAppAccessValid(cred.Data["access_token"].(string)) || cred.Data["cabinet_user_id"] == nil {
		t.Fatalf("creds: %v", cred.Data)
	}
	r := e.cli("write", "-format=json", "-f", "broker/rotate-root/chat")
	if !strings.Contains(r.Stdout, "refresh_token_expires_at") || e.sb.Calls(sandbox.ChatAppRefreshEP) != 1 {
		t.Fatalf("rotate-root: %s (refreshes %d)", r.Stdout, e.sb.Calls(sandbox.ChatAppRefreshEP))
	}
	out := e.cli("read", "-format=json", "broker/config/chat").Stdout
	for _, secret := range []string{sandbox.ChatAppPassword, sandbox.ChatAppEmail} {
		if strings.Contains(out, secret) || strings.Contains(e.vault.Log(), secret) {
			t.Fatalf("%q shows in a config read or the server log", secret)
		}
	}
	if e.sb.ChatAppMakes() != 1 {
		t.Fatalf("rotation made a new pair (makes = %d)", e.sb.ChatAppMakes())
	}
}

// TestChatAppSurvivesRestartAndCrashes runs a non-dev Vault on file storage.
// A clean restart must keep the pair (no make). Then, many times, the Vault
// server is killed with SIGKILL at a random moment while rotations run; each
// time it restarts and must recover without a human: creds are served, a
// rotation succeeds, and makes stay within one per crash and the budget.
func TestChatAppSurvivesRestartAndCrashes(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	srv := httptest.NewServer(sb)
	defer srv.Close()
	dir := t.TempDir()
	ctx := context.Background()

	startVault := func() *vaulttest.Server {
		t.Helper()
		s, err := vaulttest.StartServer(ctx, vaulttest.ServerOptions{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	v := startVault()
	defer func() { v.Kill() }()
	if err := v.Register(pluginVersion, "broker"); err != nil {
		t.Fatal(err)
	}
	const budget = 40
	if r := v.CLI(chatArgs(srv.URL, "make_budget=40")...); !r.OK() {
		t.Fatal(r)
	}

	// A clean restart keeps the pair: no make, no refresh.
	v.Stop()
	v = startVault()
	makes, refreshes := sb.ChatAppMakes(), sb.Calls(sandbox.ChatAppRefreshEP)
	if r := v.CLI("read", "broker/creds/chat"); !r.OK() {
		t.Fatalf("creds after restart: %s", r)
	}
	if sb.ChatAppMakes() != makes || sb.Calls(sandbox.ChatAppRefreshEP) != refreshes {
		t.Fatal("a restart made or refreshed the pair")
	}

	const crashes = 12
	for i := range crashes {
		var wg sync.WaitGroup
		stop := make(chan struct{})
		wg.Add(1)
		go func() { // rotations, back to back, until the crash
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, _ = v.API(c, "POST", "broker/rotate-root/chat", map[string]any{})
				cancel()
			}
		}()
		time.Sleep(time.Duration(50+rand.IntN(400)) * time.Millisecond)
		v.Kill()
		close(stop)
		wg.Wait()

		v = startVault()
		// No human: the first read and a rotation just work.
		var cred secretResponse
		if r := v.CLIJSON(&cred, "read", "-format=json", "broker/creds/chat"); !r.OK() {
			t.Fatalf("crash %d: creds after restart: %s", i, r)
		}
		if r := v.CLI("write", "-f", "broker/rotate-root/chat"); !r.OK() {
			t.Fatalf("crash %d: rotation after restart: %s", i, r)
		}
		if !sb.ChatAppAccessValid(cred.Data["access_token"].(string)) {
			t.Fatalf("crash %d: a dead access token was served", i)
		}
	}
	total := sb.ChatAppMakes()
	t.Logf("%d crashes during rotations: %d refreshes, %d makes in all (budget %d)", crashes, sb.Calls(sandbox.ChatAppRefreshEP), total, budget)
	if total > 1+crashes || total > budget {
		t.Fatalf("makes = %d: more than one per crash (%d) or over the budget", total, crashes)
	}
}
