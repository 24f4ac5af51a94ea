package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/cmd/broker-sandbox/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/scripts/vaulttest"
)

// mountInfo is one entry of `vault secrets list -detailed -format=json`.
type mountInfo struct {
	Type                 string `json:"type"`
	PluginVersion        string `json:"plugin_version"`
	RunningPluginVersion string `json:"running_plugin_version"`
	RunningSha256        string `json:"running_sha256"`
}

func (e *env) mount(path string) (mountInfo, bool) {
	e.t.Helper()
	var mounts map[string]mountInfo
	e.cliJSON(&mounts, "secrets", "list", "-detailed", "-format=json")
	m, ok := mounts[path]
	return m, ok
}

// pluginProcesses lists the running processes whose executable is binary.
func pluginProcesses(binary string) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, d := range entries {
		var pid int
		if _, err := fmt.Sscanf(d.Name(), "%d", &pid); err != nil {
			continue
		}
		if exe, err := os.Readlink(filepath.Join("/proc", d.Name(), "exe")); err == nil && exe == binary {
			pids = append(pids, pid)
		}
	}
	return pids
}

// cliWithin runs the vault CLI and kills it after limit.
func cliWithin(v *vaulttest.Vault, limit time.Duration, args ...string) (vaulttest.CLIResult, time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, v.Bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+v.Token)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	began := time.Now()
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("still running after %s: %w", limit, ctx.Err())
	}
	return vaulttest.CLIResult{Stdout: out.String(), Stderr: errb.String(), Err: err}, time.Since(began)
}

// TestUpgradeInPlaceAndDisable registers v0.1.0, stores configs and tokens,
// then upgrades the mount to v0.2.0 the way docs/operations.md says: new
// binary under its own name, register, tune, reload. Nothing may be lost and
// nothing minted or made again. Then the mount is disabled with leases of
// all four providers outstanding and every broker failing: the disable must
// not hang on them.
func TestUpgradeInPlaceAndDisable(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	v, err := vaulttest.StartDev(ctx, vaulttest.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		v.Stop()
		if t.Failed() {
			t.Logf("--- vault log tail ---\n%s", v.LogTail(60))
		}
	})
	e := &env{t: t, vault: v, sb: sb, sbURL: srv.URL}

	const v1, v2 = "v0.1.0", "v0.2.0"
	if err := v.Register(v1, "broker"); err != nil {
		t.Fatal(err)
	}
	oldBin := filepath.Join(v.PluginDir, vaulttest.PluginName)
	if m, _ := e.mount("broker/"); m.RunningPluginVersion != v1 {
		t.Fatalf("running %q before the upgrade, want %s", m.RunningPluginVersion, v1)
	}

	e.writeSandboxConfigs()
	creds := map[string]secretResponse{}
	for _, name := range []string{"finam", "chat"} {
		var c secretResponse
		e.cliJSON(&c, "read", "-format=json", "broker/creds/"+name)
		creds[name] = c
	}
	configsBefore := map[string]map[string]any{}
	for _, name := range []string{"finam", "chat"} {
		var c secretResponse
		e.cliJSON(&c, "read", "-format=json", "broker/config/"+name)
		configsBefore[name] = c.Data
	}
	callsBefore := sb.AllCalls()
	makesBefore := sb.ChatAppMakes()

	// The new version, built with its own version string, beside the old.
	buildDir := t.TempDir()
	sum, err := vaulttest.BuildPlugin(buildDir, v2)
	if err != nil {
		t.Fatal(err)
	}
	newName := vaulttest.PluginName + "-" + v2
	newBin := filepath.Join(v.PluginDir, newName)
	if err := vaulttest.CopyFile(filepath.Join(buildDir, vaulttest.PluginName), newBin); err != nil {
		t.Fatal(err)
	}
	e.cli("plugin", "register", "-sha256="+sum, "-version="+v2, "-command="+newName, "secret", vaulttest.PluginName)
	for _, ver := range []string{v1, v2} {
		e.cli("plugin", "info", "-version="+ver, "secret", vaulttest.PluginName)
	}

	e.cli("secrets", "tune", "-plugin-version="+v2, "broker/")
	m, _ := e.mount("broker/")
	if m.PluginVersion != v2 || m.RunningPluginVersion != v1 {
		t.Fatalf("after tune: plugin_version %q, running %q; want %s pinned and %s still running until the reload", m.PluginVersion, m.RunningPluginVersion, v2, v1)
	}

	reloaded := time.Now()
	e.cli("plugin", "reload", "-plugin="+vaulttest.PluginName)
	deadline := time.Now().Add(30 * time.Second)
	for {
		m, _ = e.mount("broker/")
		if m.RunningPluginVersion == v2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("reload to %s took %s", v2, time.Since(reloaded).Round(time.Millisecond))

	t.Run("the mount runs v0.2.0, from the new binary", func(t *testing.T) {
		if m.RunningPluginVersion != v2 || m.RunningSha256 != sum {
			t.Fatalf("running %q (sha %s), want %s (sha %s)", m.RunningPluginVersion, m.RunningSha256, v2, sum)
		}
		// The new binary serves; the old process is gone.
		var cred secretResponse
		e.cliJSON(&cred, "read", "-format=json", "broker/creds/finam")
		if n := len(pluginProcesses(newBin)); n != 1 {
			t.Errorf("%d processes of the v0.2.0 binary, want 1", n)
		}
		deadline := time.Now().Add(10 * time.Second)
		for len(pluginProcesses(oldBin)) > 0 && time.Now().Before(deadline) {
			time.Sleep(200 * time.Millisecond)
		}
		if pids := pluginProcesses(oldBin); len(pids) > 0 {
			t.Errorf("the v0.1.0 plugin process still runs: %v", pids)
		}
	})

	t.Run("no state was lost and nothing was minted or made again", func(t *testing.T) {
		var names []string
		e.cliJSON(&names, "list", "-format=json", "broker/config")
		if strings.Join(names, ",") != "alor,chat,finam,tbank" {
			t.Errorf("configs after the upgrade: %v", names)
		}
		for _, name := range []string{"finam", "chat"} {
			var c secretResponse
			e.cliJSON(&c, "read", "-format=json", "broker/config/"+name)
			for _, k := range []string{"provider", "token_expires_at", "last_refresh", "endpoint", "updated_at", "secret_expires_at"} {
				if fmt.Sprint(c.Data[k]) != fmt.Sprint(configsBefore[name][k]) {
					t.Errorf("config %s: %s was %v, is %v after the upgrade", name, k, configsBefore[name][k], c.Data[k])
				}
			}
			var after secretResponse
			e.cliJSON(&after, "read", "-format=json", "broker/creds/"+name)
			if after.Data["access_token"] != creds[name].Data["access_token"] {
				t.Errorf("creds/%s: a different token after the upgrade (the cached one was lost)", name)
			}
		}
		if got := sb.AllCalls(); fmt.Sprint(got) != fmt.Sprint(callsBefore) {
			t.Errorf("the upgrade called the brokers: before %v, after %v", callsBefore, got)
		}
		if sb.ChatAppMakes() != makesBefore {
			t.Errorf("the upgrade spent a ChatApp make (%d before, %d after)", makesBefore, sb.ChatAppMakes())
		}
	})

	t.Run("leases issued by v0.1.0 renew under v0.2.0, and the rotated pair carries over", func(t *testing.T) {
		for _, name := range []string{"finam", "chat"} {
			e.cli("lease", "renew", creds[name].LeaseID)
		}
		e.cli("write", "-f", "broker/rotate-root/chat")
		if sb.ChatAppMakes() != makesBefore {
			t.Errorf("rotation after the upgrade spent a make: the stored refresh token was lost")
		}
	})

	t.Run("disable with outstanding leases of every provider, brokers down, is prompt", func(t *testing.T) {
		for _, name := range []string{"finam", "tbank", "alor", "chat"} {
			e.cli("read", "broker/creds/"+name)
			var leases []string
			e.cliJSON(&leases, "list", "-format=json", "sys/leases/lookup/broker/creds/"+name)
			if len(leases) == 0 {
				t.Fatalf("no outstanding lease for %s", name)
			}
		}
		// Every broker answers 503 from now on: revocation must not need them.
		for _, ep := range sb.Endpoints() {
			sb.InjectFault(ep, 503, -1)
		}
		sb.ResetCalls()
		r, took := cliWithin(v, 30*time.Second, "secrets", "disable", "broker/")
		t.Logf("vault secrets disable broker/ with outstanding leases: %s", took.Round(time.Millisecond))
		if !r.OK() {
			t.Fatalf("disable failed or hung: %s", r)
		}
		if _, ok := e.mount("broker/"); ok {
			t.Fatal("broker/ is still mounted")
		}
		if r := v.CLI("list", "sys/leases/lookup/broker/creds/finam"); r.OK() && strings.TrimSpace(r.Stdout) != "" {
			t.Errorf("leases survive the disable:\n%s", r.Stdout)
		}
		if calls := sb.AllCalls(); len(calls) > 0 {
			t.Logf("calls to brokers during the disable: %v", calls)
		}
		if strings.Contains(v.Log(), "failed to revoke") {
			t.Errorf("the server log shows failed revocations")
		}
	})
}
