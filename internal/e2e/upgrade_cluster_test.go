package e2e

import (
	"context"
	"fmt"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// TestUpgradeClusterThenFailover upgrades a 3-node raft cluster the way
// docs/install.md says for HA: v0.1.0 and then v0.2.0 from their release
// zips into every node's plugin directory, register, enable, tune and
// reload once, through the active node; then the active node is killed
// right after. The new active node must run v0.2.0, serve the cached
// tokens without a mint and keep the rotated ChatApp pair.
func TestUpgradeClusterThenFailover(t *testing.T) {
	doc := readInstallDoc(t)
	sb := sandbox.New(sandbox.Options{})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	ctx := context.Background()
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	c, err := vaulttest.StartCluster(sctx, vaulttest.ClusterOptions{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, nd := range c.Nodes {
				t.Logf("--- %s log tail ---\n%s", nd.ID, nd.LogTail(40))
			}
		}
		c.Stop()
	})
	active, err := c.WaitActive(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, vault: active.Vault, sb: sb, sbURL: srv.URL}

	// install puts a release on every node and registers it once.
	install := func(version string) release {
		r := buildRelease(t, doc, active.Vault, version)
		for _, nd := range c.Nodes {
			r.install(t, doc, nd.Vault)
		}
		doc.run(t, active.Vault, "register", r.dir, r.version)
		return r
	}
	relA := install("v0.1.0")
	doc.run(t, active.Vault, "enable", relA.dir, relA.version)

	e.cli("write", "broker/config/finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+srv.URL)
	e.cli("write", "broker/config/chat", "provider=chatapp", "email="+sandbox.ChatAppEmail, "password="+sandbox.ChatAppPassword,
		"app_id="+sandbox.ChatAppAppID, "base_url="+srv.URL)
	// The pair rotates once under v0.1.0: the stored refresh token is no
	// longer the one tokens.make gave, so only storage knows the live one.
	e.cli("write", "-f", "broker/rotate-root/chat")
	tokens := map[string]string{}
	for _, name := range []string{"finam", "chat"} {
		var cred secretResponse
		e.cliJSON(&cred, "read", "-format=json", "broker/creds/"+name)
		tokens[name] = fmt.Sprint(cred.Data["access_token"])
	}
	callsBefore, makesBefore := sb.AllCalls(), sb.ChatAppMakes()

	relB := install("v0.2.0")
	doc.run(t, active.Vault, "upgrade", relB.dir, relB.version)
	if m, _ := e.mount("broker/"); m.RunningPluginVersion != relB.version {
		t.Fatalf("the active node runs %q after the reload, want %s", m.RunningPluginVersion, relB.version)
	}
	killed := time.Now()
	active.Kill()
	next, err := c.WaitActive(ctx, 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s killed right after the reload; %s active %s later", active.ID, next.ID, time.Since(killed).Round(10*time.Millisecond))
	e.vault = next.Vault

	// The mount runs on the new active node once a request reaches it;
	// until then running_plugin_version may be empty.
	var m mountInfo
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		var cred secretResponse
		if r := next.CLIJSON(&cred, "read", "-format=json", "broker/creds/finam"); r.OK() {
			if got := fmt.Sprint(cred.Data["access_token"]); got != tokens["finam"] {
				t.Errorf("creds/finam on %s: a different token after the failover", next.ID)
			}
			if m, _ = e.mount("broker/"); m.RunningPluginVersion != "" {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new active node serves no creds read within 30 s")
		}
	}
	if m.RunningPluginVersion != relB.version || m.RunningSha256 != relB.sum {
		t.Errorf("the new active node runs %q (sha %s), want %s (sha %s)", m.RunningPluginVersion, m.RunningSha256, relB.version, relB.sum)
	}
	for _, nd := range c.Alive() {
		for _, name := range []string{"finam", "chat"} {
			var cred secretResponse
			if r := nd.CLIJSON(&cred, "read", "-format=json", "broker/creds/"+name); !r.OK() {
				t.Errorf("creds/%s through %s: %s", name, nd.ID, r)
			} else if fmt.Sprint(cred.Data["access_token"]) != tokens[name] {
				t.Errorf("creds/%s through %s: a different token after the upgrade and failover", name, nd.ID)
			}
		}
	}
	if got := sb.AllCalls(); fmt.Sprint(got) != fmt.Sprint(callsBefore) {
		t.Errorf("the upgrade and failover called the brokers: before %v, after %v", callsBefore, got)
	}
	t.Logf("upstream calls %v before and after the upgrade and failover; ChatApp makes %d, %d after", callsBefore, makesBefore, sb.ChatAppMakes())
	// The new active node rotates with the pair v0.1.0 stored: a make
	// would mean it was lost.
	e.cli("write", "-f", "broker/rotate-root/chat")
	if sb.ChatAppMakes() != makesBefore {
		t.Errorf("ChatApp makes %d, want %d: the rotated pair was lost", sb.ChatAppMakes(), makesBefore)
	}
}
