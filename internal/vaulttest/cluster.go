package vaulttest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// ClusterOptions configure a Vault cluster with integrated storage.
type ClusterOptions struct {
	// Dir is a scratch directory (required): one subdirectory per node.
	Dir string
	// Nodes is the cluster size (default 3).
	Nodes int
	// PluginVersion, when set, builds the plugin once, puts the same binary
	// (same SHA-256) into every node's plugin directory and registers it
	// through the catalog of the active node (the catalog is replicated).
	PluginVersion string
	// Mount, when set with PluginVersion, enables the plugin at this path.
	Mount string
	// LogLevel of the servers (default "info").
	LogLevel string
}

// Cluster is a Vault cluster with integrated storage (raft) on loopback:
// distinct API and cluster ports per node, retry_join to the first node,
// every node initialised once and unsealed with the one key share.
type Cluster struct {
	Nodes     []*Node
	Token     string
	UnsealKey string
	// PluginSHA256 is the checksum registered in the catalog.
	PluginSHA256 string
}

// Node is one server of a Cluster. Its embedded Vault talks to this node's
// API (a standby forwards requests to the active node).
type Node struct {
	*Vault
	ID          string
	Port        int // API port; the cluster port is Port+1
	ClusterAddr string

	mu     sync.Mutex
	killed bool
}

// StartCluster starts the nodes, initialises the first, unseals every node
// (the others join it through retry_join), waits until every node is a raft
// voter, and registers and mounts the plugin when asked to.
func StartCluster(ctx context.Context, opts ClusterOptions) (*Cluster, error) {
	bin, err := VaultBin()
	if err != nil {
		return nil, err
	}
	n := opts.Nodes
	if n == 0 {
		n = 3
	}
	level := opts.LogLevel
	if level == "" {
		level = "info"
	}
	c := &Cluster{}
	ports := make([]int, n)
	for i := range ports {
		for {
			p, err := freePort()
			if err != nil {
				return nil, err
			}
			// Pairs must not overlap: a node's cluster port is Port+1.
			clash := false
			for _, q := range ports[:i] {
				if p == q || p == q+1 || p+1 == q {
					clash = true
				}
			}
			if !clash {
				ports[i] = p
				break
			}
		}
	}
	var pluginPath string
	if opts.PluginVersion != "" {
		buildDir := filepath.Join(opts.Dir, "build")
		if err := os.MkdirAll(buildDir, 0o755); err != nil {
			return nil, err
		}
		if c.PluginSHA256, err = BuildPlugin(buildDir, opts.PluginVersion); err != nil {
			return nil, err
		}
		pluginPath = filepath.Join(buildDir, PluginName)
	}
	for i := range n {
		id := fmt.Sprintf("node%d", i+1)
		dir := filepath.Join(opts.Dir, id)
		nd := &Node{ID: id, Port: ports[i], ClusterAddr: fmt.Sprintf("https://127.0.0.1:%d", ports[i]+1), Vault: &Vault{
			Bin: bin, Dir: dir,
			Addr:      fmt.Sprintf("http://127.0.0.1:%d", ports[i]),
			PluginDir: filepath.Join(dir, "plugins"),
			LogPath:   filepath.Join(dir, "vault.log"),
			// A standby must forward requests to the active node, not
			// redirect the client there: a redirect is returned as is.
			http: &http.Client{Timeout: 60 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse
			}},
			done: make(chan error, 1),
		}}
		for _, d := range []string{nd.PluginDir, filepath.Join(dir, "raft")} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return nil, err
			}
		}
		if pluginPath != "" {
			if err := CopyFile(pluginPath, filepath.Join(nd.PluginDir, PluginName)); err != nil {
				return nil, err
			}
			if sum, err := FileSHA256(filepath.Join(nd.PluginDir, PluginName)); err != nil || sum != c.PluginSHA256 {
				return nil, fmt.Errorf("plugin copy on %s: sha256 %s (%v), want %s", id, sum, err, c.PluginSHA256)
			}
		}
		var join strings.Builder
		for j, p := range ports {
			if j != i {
				fmt.Fprintf(&join, "  retry_join {\n    leader_api_addr = \"http://127.0.0.1:%d\"\n  }\n", p)
			}
		}
		hcl := fmt.Sprintf(`
storage "raft" {
  path    = %q
  node_id = %q
  # Fastest timing: elections in about a second on loopback.
  performance_multiplier = 1
%s}
listener "tcp" {
  address         = "127.0.0.1:%d"
  cluster_address = "127.0.0.1:%d"
  tls_disable     = true
}
api_addr         = "http://127.0.0.1:%d"
cluster_addr     = %q
plugin_directory = %q
disable_mlock    = true
log_level        = %q
`, filepath.Join(dir, "raft"), id, join.String(), ports[i], ports[i]+1, ports[i], nd.ClusterAddr, nd.PluginDir, level)
		if err := os.WriteFile(filepath.Join(dir, "vault.hcl"), []byte(hcl), 0o600); err != nil {
			return nil, err
		}
		c.Nodes = append(c.Nodes, nd)
	}

	fail := func(err error) (*Cluster, error) {
		var logs strings.Builder
		for _, nd := range c.Nodes {
			fmt.Fprintf(&logs, "\n--- %s log ---\n%s", nd.ID, nd.LogTail(30))
		}
		c.Stop()
		return nil, fmt.Errorf("%w%s", err, logs.String())
	}

	// The first node: start, initialise, unseal, wait until active.
	first := c.Nodes[0]
	if err := first.start(ctx); err != nil {
		return fail(err)
	}
	var initOut struct {
		Keys      []string `json:"unseal_keys_b64"`
		RootToken string   `json:"root_token"`
	}
	if r := first.CLIJSON(&initOut, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"); !r.OK() {
		return fail(fmt.Errorf("operator init: %s", r))
	}
	c.Token, c.UnsealKey = initOut.RootToken, initOut.Keys[0]
	for _, nd := range c.Nodes {
		nd.Token = c.Token
	}
	if err := first.unseal(ctx, c.UnsealKey); err != nil {
		return fail(err)
	}
	if _, err := c.WaitActive(ctx, 60*time.Second); err != nil {
		return fail(err)
	}
	// New servers become voters once stable; a second is enough here.
	if r := first.CLI("operator", "raft", "autopilot", "set-config", "-server-stabilization-time=1s", "-cleanup-dead-servers=false"); !r.OK() {
		return fail(fmt.Errorf("autopilot set-config: %s", r))
	}
	// The others join the first through retry_join once unsealed.
	for _, nd := range c.Nodes[1:] {
		if err := nd.start(ctx); err != nil {
			return fail(err)
		}
	}
	for _, nd := range c.Nodes[1:] {
		if err := nd.unseal(ctx, c.UnsealKey); err != nil {
			return fail(err)
		}
	}
	if err := c.waitVoters(ctx, n, 90*time.Second); err != nil {
		return fail(err)
	}
	if opts.PluginVersion != "" {
		active, err := c.WaitActive(ctx, 30*time.Second)
		if err != nil {
			return fail(err)
		}
		if r := active.CLI("plugin", "register", "-sha256="+c.PluginSHA256, "-version="+opts.PluginVersion, "secret", PluginName); !r.OK() {
			return fail(fmt.Errorf("plugin register: %s", r))
		}
		if opts.Mount != "" {
			if r := active.CLI("secrets", "enable", "-path="+opts.Mount, PluginName); !r.OK() {
				return fail(fmt.Errorf("secrets enable: %s", r))
			}
		}
	}
	return c, nil
}

// CopyFile copies the file src to dst as an executable: the plugin
// directory of a Vault under test takes copies of built binaries.
func CopyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// start runs the node's server and waits until its API listens.
func (nd *Node) start(ctx context.Context) error {
	logf, err := os.OpenFile(nd.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	nd.cmd = exec.Command(nd.Bin, "server", "-config="+filepath.Join(nd.Dir, "vault.hcl"))
	nd.cmd.Env = cleanEnv()
	nd.cmd.Stdout, nd.cmd.Stderr = logf, logf
	if err := nd.cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("starting %s: %w", nd.ID, err)
	}
	go func() { nd.done <- nd.cmd.Wait(); logf.Close() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := nd.http.Get(nd.Addr + "/v1/sys/seal-status")
		if err == nil {
			resp.Body.Close()
			return nil
		}
		select {
		case err := <-nd.done:
			nd.done <- err
			return fmt.Errorf("%s exited: %v", nd.ID, err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not listen in 60s", nd.ID)
		}
	}
}

// unseal gives the node the key share until it reports unsealed (a joining
// node needs the key to answer the leader's challenge, which it may not have
// received yet on the first try).
func (nd *Node) unseal(ctx context.Context, key string) error {
	deadline := time.Now().Add(60 * time.Second)
	var last CLIResult
	for time.Now().Before(deadline) {
		if st, err := nd.SealStatus(ctx); err == nil && st.Initialized && !st.Sealed {
			return nil
		}
		last = nd.CLI("operator", "unseal", key)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s did not unseal in 60s: %s", nd.ID, last)
}

// SealStatus is sys/seal-status of a node.
type SealStatus struct {
	Initialized bool `json:"initialized"`
	Sealed      bool `json:"sealed"`
}

// SealStatus reads the node's seal status (unauthenticated).
func (nd *Node) SealStatus(ctx context.Context) (SealStatus, error) {
	var st SealStatus
	err := nd.getJSON(ctx, "sys/seal-status", &st)
	return st, err
}

// Leader is sys/leader of a node.
type Leader struct {
	HAEnabled     bool   `json:"ha_enabled"`
	IsSelf        bool   `json:"is_self"`
	LeaderAddress string `json:"leader_address"`
	ActiveTime    string `json:"active_time"`
}

// Leader reads who the node thinks is active (unauthenticated).
func (nd *Node) Leader(ctx context.Context) (Leader, error) {
	var l Leader
	err := nd.getJSON(ctx, "sys/leader", &l)
	return l, err
}

func (nd *Node) getJSON(ctx context.Context, path string, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", nd.Addr+"/v1/"+path, nil)
	if err != nil {
		return err
	}
	resp, err := nd.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s %s: HTTP %d %s", nd.ID, path, resp.StatusCode, b)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Killed reports whether Kill was called.
func (nd *Node) Killed() bool {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	return nd.killed
}

// Kill ends the node with SIGKILL, as a crash would, and kills the plugin
// processes it started (a killed Vault leaves them orphaned). It returns
// when both are gone.
func (nd *Node) Kill() {
	nd.mu.Lock()
	nd.killed = true
	nd.mu.Unlock()
	nd.once.Do(func() {
		if nd.cmd == nil || nd.cmd.Process == nil {
			return
		}
		_ = nd.cmd.Process.Kill()
		<-nd.done
		killPlugins(nd.PluginDir)
	})
}

// Stop ends every node still running, and any plugin process left behind.
func (c *Cluster) Stop() {
	var wg sync.WaitGroup
	for _, nd := range c.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if nd.cmd != nil && nd.cmd.Process != nil {
				nd.Vault.Stop()
			}
			killPlugins(nd.PluginDir)
		}()
	}
	wg.Wait()
}

// Alive returns the nodes not killed.
func (c *Cluster) Alive() []*Node {
	var out []*Node
	for _, nd := range c.Nodes {
		if !nd.Killed() {
			out = append(out, nd)
		}
	}
	return out
}

// Active returns the node that is active now, or an error.
func (c *Cluster) Active(ctx context.Context) (*Node, error) {
	for _, nd := range c.Alive() {
		if l, err := nd.Leader(ctx); err == nil && l.HAEnabled && l.IsSelf {
			return nd, nil
		}
	}
	return nil, errors.New("no active node")
}

// WaitActive waits until a live node is active and answers sys/health 200.
func (c *Cluster) WaitActive(ctx context.Context, within time.Duration) (*Node, error) {
	deadline := time.Now().Add(within)
	for {
		if nd, err := c.Active(ctx); err == nil {
			if r, err := nd.API(ctx, "GET", "sys/health", nil); err == nil && r.Status == 200 {
				return nd, nil
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("no active node within %s", within)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// RaftPeer is one server of `vault operator raft list-peers`.
type RaftPeer struct {
	NodeID  string `json:"node_id"`
	Address string `json:"address"`
	Leader  bool   `json:"leader"`
	Voter   bool   `json:"voter"`
}

// Peers lists the raft configuration, asked of the active node.
func (c *Cluster) Peers(ctx context.Context) ([]RaftPeer, error) {
	nd, err := c.Active(ctx)
	if err != nil {
		return nil, err
	}
	var out struct {
		Data struct {
			Config struct {
				Servers []RaftPeer `json:"servers"`
			} `json:"config"`
		} `json:"data"`
	}
	if r := nd.CLIJSON(&out, "operator", "raft", "list-peers", "-format=json"); !r.OK() {
		return nil, fmt.Errorf("list-peers: %s", r)
	}
	return out.Data.Config.Servers, nil
}

// waitVoters waits until the raft configuration has n voters and every node
// is unsealed.
func (c *Cluster) waitVoters(ctx context.Context, n int, within time.Duration) error {
	deadline := time.Now().Add(within)
	var last []RaftPeer
	for time.Now().Before(deadline) {
		peers, err := c.Peers(ctx)
		if err == nil {
			last = peers
			voters := 0
			for _, p := range peers {
				if p.Voter {
					voters++
				}
			}
			if voters == n {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
	return fmt.Errorf("raft has not %d voters within %s: %+v", n, within, last)
}
