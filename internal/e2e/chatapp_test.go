package e2e

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
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

// TestChatAppCrashAfterAnswerRecoversThroughRecord kills Vault at the worst
// moment of a rotation: ChatApp has applied the refresh (the stored refresh
// token is dead) and its answer never reached storage. Only the rotation
// record written before the call tells. Vault replays it by itself (the
// plugin is registered with a short record age so the replay comes at the
// next rollback tick, within a minute): exactly one tokens.make, no human,
// no read needed.
func TestChatAppCrashAfterAnswerRecoversThroughRecord(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	// The proxy forwards to the sandbox and, when armed, swallows the
	// answer of a refresh that ChatApp has already applied.
	var armed atomic.Bool
	answered := make(chan struct{}, 1)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !armed.Load() || r.Method+" "+r.URL.Path != sandbox.ChatAppRefreshEP {
			sb.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		sb.ServeHTTP(rec, r)
		armed.Store(false)
		answered <- struct{}{}
		<-r.Context().Done() // Vault dies waiting
	}))
	defer proxy.Close()
	dir := t.TempDir()
	ctx := context.Background()
	v, err := vaulttest.StartServer(ctx, vaulttest.ServerOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { v.Kill() }()
	sum, err := vaulttest.BuildPlugin(v.PluginDir, pluginVersion)
	if err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"plugin", "register", "-sha256=" + sum, "-version=" + pluginVersion, "-env=BROKER_WAL_ROLLBACK_MIN_AGE=1s", "secret", vaulttest.PluginName},
		{"secrets", "enable", "-path=broker", vaulttest.PluginName},
		chatArgs(proxy.URL),
	} {
		if r := v.CLI(args...); !r.OK() {
			t.Fatal(r)
		}
	}
	makes := sb.ChatAppMakes()
	issued := sb.ChatAppIssuedRefreshTokens()
	stored := issued[len(issued)-1]

	armed.Store(true)
	go func() {
		c, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		_, _ = v.API(c, "POST", "broker/rotate-root/chat", map[string]any{})
	}()
	select {
	case <-answered:
	case <-time.After(30 * time.Second):
		t.Fatal("the rotation never reached ChatApp")
	}
	v.Kill()
	if sb.ChatAppRefreshValid(stored) {
		t.Fatal("ChatApp did not rotate: the crash window was not hit")
	}

	crashedAt := time.Now()
	if v, err = vaulttest.StartServer(ctx, vaulttest.ServerOptions{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	// Nobody reads: recovery must come from the record alone.
	deadline := time.Now().Add(100 * time.Second)
	for sb.ChatAppMakes() == makes && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("recovered through the rotation record %s after the crash; makes %d -> %d", time.Since(crashedAt).Round(time.Second), makes, sb.ChatAppMakes())
	if got := sb.ChatAppMakes() - makes; got != 1 {
		t.Fatalf("recovery spent %d tokens.make, want exactly 1", got)
	}
	if !strings.Contains(v.Log(), "recovering an interrupted rotation") {
		t.Fatal("the make did not come from the record's replay")
	}
	var cred secretResponse
	if r := v.CLIJSON(&cred, "read", "-format=json", "broker/creds/chat"); !r.OK() || !sb.ChatAppAccessValid(cred.Data["access_token"].(string)) {
		t.Fatalf("creds after recovery: %s", r)
	}
	if r := v.CLI("write", "-f", "broker/rotate-root/chat"); !r.OK() {
		t.Fatalf("rotation after recovery: %s", r)
	}
	if got := sb.ChatAppMakes() - makes; got != 1 {
		t.Fatalf("reads and rotations after recovery spent more makes: %d", got)
	}
}
