package e2e

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
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

// installDoc holds docs/install.md's blocks marked `<!-- e2e:<name> -->`,
// which the upgrade test runs as an operator would.
type installDoc map[string]string

var installBlock = regexp.MustCompile("(?s)<!-- e2e:([a-z]+) -->\n```sh\n(.*?)```")

func readInstallDoc(t *testing.T) installDoc {
	t.Helper()
	d := installDoc{}
	for _, m := range installBlock.FindAllStringSubmatch(readDoc(t, "install.md"), -1) {
		d[m[1]] = m[2]
	}
	for _, name := range []string{"verify", "install", "register", "enable", "upgrade"} {
		if d[name] == "" {
			t.Fatalf("docs/install.md has no block marked <!-- e2e:%s -->", name)
		}
	}
	return d
}

// run runs one block with bash in dir (where the release was downloaded),
// with the variables the doc's first block sets and the vault CLI on PATH,
// and returns its output.
func (d installDoc) run(t *testing.T, v *vaulttest.Vault, name, dir, version string) string {
	t.Helper()
	cmd := exec.Command("bash", "-euo", "pipefail", "-c", d[name])
	cmd.Dir = dir
	cmd.Env = append(cleanEnvForDoc(),
		"PATH="+filepath.Dir(v.Bin)+string(os.PathListSeparator)+os.Getenv("PATH"),
		"VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+v.Token,
		"VERSION="+strings.TrimPrefix(version, "v"), "PLATFORM="+vaulttest.Platform(), "PLUGIN_DIR="+v.PluginDir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("docs/install.md block %q (VERSION=%s) failed: %v\n%s\n--- block ---\n%s", name, version, err, out, d[name])
	}
	return string(out)
}

func cleanEnvForDoc() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") && !strings.HasPrefix(kv, "PATH=") {
			env = append(env, kv)
		}
	}
	return env
}

// release is one version's download directory.
type release struct {
	version, dir string
	sum          string // the binary's line in SHA256SUMS
}

// buildRelease builds version with `make release`'s tool into a fresh
// directory (the download) and runs the doc's verify block there; v is any
// server (for the vault CLI on PATH).
func buildRelease(t *testing.T, doc installDoc, v *vaulttest.Vault, version string) release {
	t.Helper()
	r := release{version: version, dir: t.TempDir()}
	began := time.Now()
	if err := vaulttest.BuildRelease(r.dir, version); err != nil {
		t.Fatal(err)
	}
	t.Logf("release %s for %s built in %s", version, vaulttest.Platform(), time.Since(began).Round(100*time.Millisecond))
	if out := doc.run(t, v, "verify", r.dir, version); !strings.Contains(out, r.zip()+": OK") {
		t.Fatalf("sha256sum -c does not pass %s:\n%s", r.zip(), out)
	}
	sums, err := os.ReadFile(filepath.Join(r.dir, "SHA256SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	bin := strings.TrimSuffix(r.zip(), ".zip")
	for _, line := range strings.Split(string(sums), "\n") {
		if sum, name, ok := strings.Cut(line, "  "); ok && name == bin {
			r.sum = sum
		}
	}
	if r.sum == "" {
		t.Fatalf("SHA256SUMS has no line for %s:\n%s", bin, sums)
	}
	return r
}

func (r release) zip() string {
	return fmt.Sprintf("%s_%s_%s.zip", vaulttest.PluginName, strings.TrimPrefix(r.version, "v"), vaulttest.Platform())
}

// install runs the doc's install block for the server (node) v: the
// binary lands in v's plugin directory, reports the version and has the
// SHA-256 that SHA256SUMS gives.
func (r release) install(t *testing.T, doc installDoc, v *vaulttest.Vault) {
	t.Helper()
	if out := doc.run(t, v, "install", r.dir, r.version); !strings.Contains(out, vaulttest.PluginName+" "+r.version+"\n") {
		t.Fatalf("the installed binary does not report %s:\n%s", r.version, out)
	}
	if got, _ := vaulttest.FileSHA256(r.binary(v)); got != r.sum {
		t.Fatalf("installed binary's SHA-256 %s; SHA256SUMS says %s", got, r.sum)
	}
}

// binary is where the install block put the release's binary.
func (r release) binary(v *vaulttest.Vault) string {
	return filepath.Join(v.PluginDir, vaulttest.PluginName+"-"+r.version)
}

// bots are clients reading creds over the HTTP API, as bots do, while the
// mount is upgraded: every read must answer with the cached token.
type bots struct {
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup

	mu      sync.Mutex
	ok      int
	failed  []string
	longest time.Duration // between two answered reads of one bot
}

// startBots starts n bots reading the given configs in turn, each every
// 10 ms; want is the token each config must answer with.
func startBots(v *vaulttest.Vault, n int, want map[string]string) *bots {
	b := &bots{stop: make(chan struct{})}
	names := slices.Sorted(maps.Keys(want))
	for i := range n {
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			last := time.Now()
			for j := i; ; j++ {
				select {
				case <-b.stop:
					return
				case <-tick.C:
				}
				name := names[j%len(names)]
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				resp, err := v.API(ctx, "GET", "broker/creds/"+name, nil)
				cancel()
				now := time.Now()
				b.mu.Lock()
				switch {
				case err != nil:
					b.failed = append(b.failed, fmt.Sprintf("%s: %v", name, err))
				case resp.Status != 200:
					b.failed = append(b.failed, fmt.Sprintf("%s: HTTP %d %s", name, resp.Status, strings.Join(resp.Errors, "; ")))
				case fmt.Sprint(resp.Data["access_token"]) != want[name]:
					b.failed = append(b.failed, fmt.Sprintf("%s: a token other than the cached one", name))
				default:
					b.ok++
					b.longest = max(b.longest, now.Sub(last))
					last = now
				}
				b.mu.Unlock()
			}
		}()
	}
	return b
}

// halt stops the bots (at once; end is the measured stop).
func (b *bots) halt() {
	b.once.Do(func() { close(b.stop) })
	b.wg.Wait()
}

func (b *bots) answered() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ok
}

// end stops the bots after they have answered more more reads (so reads
// after the switch count), and reports the figures.
func (b *bots) end(t *testing.T, phase string, more int) {
	t.Helper()
	target := b.answered() + more
	deadline := time.Now().Add(30 * time.Second)
	for b.answered() < target && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	b.halt()
	t.Logf("%s: bots answered %d reads, %d failed; longest gap between answered reads of one bot: %s",
		phase, b.ok, len(b.failed), b.longest.Round(time.Millisecond))
	// Vault holds a mount's requests while its plugin reloads (the route
	// entry's lock), so a read waits through the reload instead of failing.
	if len(b.failed) > 0 {
		t.Errorf("%s: %d reads failed, want 0; first: %s", phase, len(b.failed), strings.Join(b.failed[:min(5, len(b.failed))], " | "))
	}
	if b.ok < more {
		t.Errorf("%s: only %d reads answered", phase, b.ok)
	}
}

// TestUpgradeInPlaceAndDisable installs v0.1.0 from its release zip with
// docs/install.md's commands (verify, install, register, enable), stores
// configs and tokens, then upgrades the mount to v0.2.0 with the doc's
// commands while bots read creds, and rolls back to v0.1.0 the same way.
// Neither move may fail a read, lose state, call a broker or spend a make,
// and leases from before each move renew after it. Then the mount is
// disabled with leases of all four providers outstanding and every broker
// failing: the disable must not hang on them.
func TestUpgradeInPlaceAndDisable(t *testing.T) {
	doc := readInstallDoc(t)
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

	relA := buildRelease(t, doc, v, "v0.1.0")
	relA.install(t, doc, v)
	doc.run(t, v, "register", relA.dir, relA.version)
	doc.run(t, v, "enable", relA.dir, relA.version)
	if m, _ := e.mount("broker/"); m.RunningPluginVersion != relA.version || m.RunningSha256 != relA.sum {
		t.Fatalf("running %q (sha %s) after the install, want %s (sha %s)", m.RunningPluginVersion, m.RunningSha256, relA.version, relA.sum)
	}

	e.writeSandboxConfigs()
	leases := map[string]string{} // issued by v0.1.0 before the upgrade
	tokens := map[string]string{}
	configsBefore := map[string]map[string]any{}
	for _, name := range []string{"finam", "chat"} {
		var c secretResponse
		e.cliJSON(&c, "read", "-format=json", "broker/creds/"+name)
		leases[name] = c.LeaseID
		tokens[name] = fmt.Sprint(c.Data["access_token"])
		var conf secretResponse
		e.cliJSON(&conf, "read", "-format=json", "broker/config/"+name)
		configsBefore[name] = conf.Data
	}

	relB := buildRelease(t, doc, v, "v0.2.0")
	relB.install(t, doc, v)
	doc.run(t, v, "register", relB.dir, relB.version)
	for _, r := range []release{relA, relB} {
		e.cli("plugin", "info", "-version="+r.version, "secret", vaulttest.PluginName)
	}

	// move runs the doc's upgrade block to rel with bots reading, and
	// checks the mount then runs rel's binary and nothing was lost, called
	// or spent.
	move := func(t *testing.T, from, to release) {
		callsBefore, makesBefore := sb.AllCalls(), sb.ChatAppMakes()
		b := startBots(v, 4, tokens)
		defer b.halt()
		// The bots are reading before the move starts.
		for deadline := time.Now().Add(30 * time.Second); b.answered() < 20 && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		began, readsBefore := time.Now(), b.answered()
		out := doc.run(t, v, "upgrade", to.dir, to.version)
		var m mountInfo
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			if m, _ = e.mount("broker/"); m.RunningPluginVersion == to.version || time.Now().After(deadline) {
				break
			}
		}
		during := b.answered() - readsBefore
		t.Logf("%s to %s: tune and reload took %s; %d reads answered meanwhile", from.version, to.version, time.Since(began).Round(time.Millisecond), during)
		if during == 0 {
			t.Errorf("no read was answered during the tune and reload: the bots did not read through it")
		}
		b.end(t, from.version+" to "+to.version, 200)
		if m.PluginVersion != to.version || m.RunningPluginVersion != to.version || m.RunningSha256 != to.sum {
			t.Fatalf("pinned %q, running %q (sha %s); want %s (sha %s)\n%s", m.PluginVersion, m.RunningPluginVersion, m.RunningSha256, to.version, to.sum, out)
		}
		if !strings.Contains(out, to.version) {
			t.Errorf("the doc's `vault secrets list -detailed` line does not show %s:\n%s", to.version, out)
		}
		if n := len(pluginProcesses(to.binary(v))); n != 1 {
			t.Errorf("%d processes of the %s binary, want 1", n, to.version)
		}
		for deadline := time.Now().Add(10 * time.Second); len(pluginProcesses(from.binary(v))) > 0 && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
		}
		if pids := pluginProcesses(from.binary(v)); len(pids) > 0 {
			t.Errorf("the %s plugin process still runs: %v", from.version, pids)
		}

		var names []string
		e.cliJSON(&names, "list", "-format=json", "broker/config")
		if strings.Join(names, ",") != "alor,bcs,chat,finam,tbank" {
			t.Errorf("configs after the move: %v", names)
		}
		for _, name := range []string{"finam", "chat"} {
			var c secretResponse
			e.cliJSON(&c, "read", "-format=json", "broker/config/"+name)
			for _, k := range []string{"provider", "token_expires_at", "last_refresh", "endpoint", "updated_at", "secret_expires_at"} {
				if fmt.Sprint(c.Data[k]) != fmt.Sprint(configsBefore[name][k]) {
					t.Errorf("config %s: %s was %v, is %v after the move", name, k, configsBefore[name][k], c.Data[k])
				}
			}
		}
		if got := sb.AllCalls(); fmt.Sprint(got) != fmt.Sprint(callsBefore) {
			t.Errorf("the move called the brokers: before %v, after %v", callsBefore, got)
		}
		if sb.ChatAppMakes() != makesBefore {
			t.Errorf("the move spent a ChatApp make (%d before, %d after)", makesBefore, sb.ChatAppMakes())
		}
		t.Logf("%s to %s: upstream calls %v before and after, ChatApp makes %d", from.version, to.version, callsBefore, makesBefore)
		// Leases issued before the move renew after it.
		for _, name := range []string{"finam", "chat"} {
			e.cli("lease", "renew", leases[name])
		}
	}

	t.Run("upgrade to v0.2.0 with bots reading", func(t *testing.T) { move(t, relA, relB) })
	if t.Failed() {
		t.FailNow()
	}

	t.Run("the rotated ChatApp pair of v0.2.0 carries on", func(t *testing.T) {
		makes := sb.ChatAppMakes()
		e.cli("write", "-f", "broker/rotate-root/chat")
		if sb.ChatAppMakes() != makes {
			t.Errorf("rotation after the upgrade spent a make: the stored refresh token was lost")
		}
		// The rotation replaces the token, and a lease of the replaced one
		// no longer renews (secret_token.go): the rollback's bots expect
		// the token served now, and renew a lease of it, issued by v0.2.0.
		var c, conf secretResponse
		e.cliJSON(&c, "read", "-format=json", "broker/creds/chat")
		tokens["chat"] = fmt.Sprint(c.Data["access_token"])
		leases["chat"] = c.LeaseID
		e.cliJSON(&conf, "read", "-format=json", "broker/config/chat")
		configsBefore["chat"] = conf.Data
	})

	t.Run("roll back to v0.1.0 with bots reading", func(t *testing.T) { move(t, relB, relA) })

	t.Run("after the rollback, rotation still needs no make", func(t *testing.T) {
		makes := sb.ChatAppMakes()
		e.cli("write", "-f", "broker/rotate-root/chat")
		if sb.ChatAppMakes() != makes {
			t.Errorf("rotation after the rollback spent a make: v0.1.0 lost v0.2.0's rotated refresh token")
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
