package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

const (
	// pluginVersion is what the broker plugin is built and registered as.
	pluginVersion = "v0.1.0-bench"
	// kvPluginName is the external kv engine's catalog name.
	kvPluginName = "vault-plugin-secrets-kv"
	kvModule     = "github.com/hashicorp/vault-plugin-secrets-kv"

	// Mount paths.
	brokerMount = "broker"
	kvExtMount  = "kvext" // HashiCorp's kv as an external plugin (kv v1: passthrough)
	kvV2Mount   = "kvv2"  // Vault's built-in kv, version 2
)

// env is one running bench setup: the sandbox in this process, a dev Vault
// with the broker plugin and the external kv plugin registered through the
// catalog, and a keep-alive HTTP client.
type env struct {
	v      *vaulttest.Vault
	sb     *sandbox.Server
	sbSrv  *httptest.Server
	sbURL  string
	c      *client
	dir    string
	keep   bool
	logf   func(string, ...any)
	plugin string // the broker plugin's binary in the plugin dir

	// shortLeasesUntil is when the last short lease (60 s tokens) issued
	// so far expires: until then Vault revokes leases through the plugin.
	shortLeasesUntil time.Time

	kvExe     string
	kvVersion string
	kvSHA     string
	vaultVer  string
}

// setup starts everything. kvBin is the external kv plugin binary built by
// scripts/build-kvplugin.sh.
func setup(ctx context.Context, kvBin string, keep bool, logf func(string, ...any)) (*env, error) {
	e := &env{keep: keep, logf: logf}
	kvVersion, err := kvPluginVersion()
	if err != nil {
		return nil, err
	}
	e.kvVersion = kvVersion
	if _, err := os.Stat(kvBin); err != nil {
		return nil, fmt.Errorf("no kv plugin binary at %s: run scripts/build-kvplugin.sh (make bench does)", kvBin)
	}

	// The sandbox in-process, so its counters are read directly. Finam's
	// per-minute limit is lifted: P4 mints 10,000 tokens.
	e.sb = sandbox.New(sandbox.Options{FinamTokenLifetime: 24 * time.Hour, FinamRateLimit: 1 << 30})
	e.sb.SetTInvestRateLimit(1 << 30)
	e.sbSrv = httptest.NewServer(e.sb)
	e.sbURL = e.sbSrv.URL

	if e.dir, err = os.MkdirTemp("", "broker-bench-"); err != nil {
		return nil, err
	}
	logf("starting Vault dev server (%s)", e.dir)
	if e.v, err = vaulttest.StartDev(ctx, vaulttest.Options{Dir: e.dir}); err != nil {
		e.close()
		return nil, err
	}
	e.c = newClient(e.v.Addr, e.v.Token)
	if r := e.v.CLI("version"); r.OK() {
		e.vaultVer = strings.TrimSpace(r.Stdout)
	}

	logf("building and registering the broker plugin %s", pluginVersion)
	if err := e.v.Register(pluginVersion, brokerMount); err != nil {
		e.close()
		return nil, err
	}
	e.plugin = filepath.Join(e.v.PluginDir, vaulttest.PluginName)

	logf("registering %s %s and mounting it at %s/", kvPluginName, kvVersion, kvExtMount)
	if err := e.mountKV(ctx, kvBin); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

// mountKV registers the external kv plugin in the catalog and mounts it as a
// plain kv (Vault allows version 2 only for its built-in kv), and mounts the
// built-in kv-v2.
func (e *env) mountKV(ctx context.Context, kvBin string) error {
	// The catalog runs only binaries inside the plugin directory: copy it.
	e.kvExe = filepath.Join(e.v.PluginDir, kvPluginName)
	if err := vaulttest.CopyFile(kvBin, e.kvExe); err != nil {
		return err
	}
	sum, err := vaulttest.FileSHA256(e.kvExe)
	if err != nil {
		return err
	}
	e.kvSHA = sum
	if err := e.c.apiJSON(ctx, "PUT", "sys/plugins/catalog/secret/"+kvPluginName,
		map[string]any{"sha256": sum, "command": kvPluginName, "version": e.kvVersion}, nil); err != nil {
		return err
	}
	if err := e.c.apiJSON(ctx, "POST", "sys/mounts/"+kvExtMount,
		map[string]any{"type": kvPluginName, "plugin_version": e.kvVersion}, nil); err != nil {
		return err
	}
	return e.c.apiJSON(ctx, "POST", "sys/mounts/"+kvV2Mount,
		map[string]any{"type": "kv", "options": map[string]string{"version": "2"}}, nil)
}

// writeKV stores data under name in both kv mounts. A fresh kv-v2 mount
// answers 400 while it upgrades its storage: retry for a while.
func (e *env) writeKV(ctx context.Context, name string, data map[string]any) error {
	if err := e.c.apiJSON(ctx, "POST", kvExtMount+"/"+name, data, nil); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := e.c.apiJSON(ctx, "POST", kvV2Mount+"/data/"+name, map[string]any{"data": data}, nil)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// writeFinamConfig writes broker/config/<name> for the sandbox's Finam;
// ttl, when set, bounds its leases (default: the token's remaining life).
func (e *env) writeFinamConfig(ctx context.Context, name string, verify bool, ttl time.Duration) error {
	body := map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": e.sbURL, "verify": verify}
	if ttl > 0 {
		body["ttl"] = int(ttl.Seconds())
	}
	return e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+name, body, nil)
}

// pluginPID finds the broker plugin's process (one for all its mounts:
// the plugin is multiplexed).
func (e *env) pluginPID() (int, error) { return findProcess(e.plugin) }

func (e *env) close() {
	if e.v != nil {
		e.v.Stop()
	}
	if e.sbSrv != nil {
		e.sbSrv.CloseClientConnections()
		e.sbSrv.Close()
	}
	if e.dir != "" && !e.keep {
		os.RemoveAll(e.dir)
	}
}

// kvPluginVersion reads the kv module's version from tools/kvplugin/go.mod.
func kvPluginVersion() (string, error) {
	p := filepath.Join(vaulttest.RepoRoot(), "tools", "kvplugin", "go.mod")
	b, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(regexp.QuoteMeta(kvModule) + ` (v\S+)`).FindSubmatch(b)
	if m == nil {
		return "", fmt.Errorf("%s does not require %s", p, kvModule)
	}
	return string(m[1]), nil
}

// gitInfo describes the checkout the numbers belong to.
type gitInfo struct {
	Commit  string `json:"commit"`
	Subject string `json:"subject,omitempty"`
	// Dirty: the tree differed from the commit at the start or the end of
	// the run (tracked files modified, or untracked files that are not
	// ignored: a new .go file changes what is built). DirtyFiles says which.
	Dirty      bool     `json:"dirty"`
	DirtyFiles []string `json:"dirty_files,omitempty"`
}

func readGit() gitInfo {
	root := vaulttest.RepoRoot()
	raw := func(args ...string) string {
		cmd := exec.Command("git", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			return ""
		}
		return string(out)
	}
	run := func(args ...string) string { return strings.TrimSpace(raw(args...)) }
	g := gitInfo{
		Commit:  run("rev-parse", "HEAD"),
		Subject: run("log", "-1", "--format=%s"),
	}
	// Ignored files (bench-results/, bin/) do not make the tree dirty.
	// Not trimmed: a line starts with its two status columns (" M path").
	for _, l := range strings.Split(raw("status", "--porcelain"), "\n") {
		if len(l) > 3 {
			g.DirtyFiles = append(g.DirtyFiles, l[3:])
		}
	}
	g.Dirty = len(g.DirtyFiles) > 0
	if g.Commit == "" {
		// An exported tree (git archive) is not a repository: take the
		// commit from the environment.
		g.Commit, g.Subject = os.Getenv("BENCH_GIT_COMMIT"), os.Getenv("BENCH_GIT_SUBJECT")
	}
	return g
}

// stillAt marks g dirty when the tree at the end of the run is not the one
// it started from: the in-process benchmark compiles the backend at the
// end, the plugin was built at the start.
func (g *gitInfo) stillAt(end gitInfo) {
	if end.Commit != g.Commit {
		g.Dirty = true
		g.DirtyFiles = append(g.DirtyFiles, "(HEAD moved to "+short(end.Commit)+" during the run)")
	}
	for _, f := range end.DirtyFiles {
		if !slices.Contains(g.DirtyFiles, f) {
			g.Dirty = true
			g.DirtyFiles = append(g.DirtyFiles, f)
		}
	}
}
