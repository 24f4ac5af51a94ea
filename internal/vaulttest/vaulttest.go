// Package vaulttest runs the real Vault binary (built from tools/vault) with
// this plugin registered through the catalog, for end-to-end tests and
// benchmarks. It drives Vault the way an operator does: the `vault` CLI and
// the HTTP API.
package vaulttest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

// PluginName is the catalog name of the plugin.
const PluginName = "vault-plugin-secrets-broker"

// RepoRoot finds the module root from this source file's location.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// VaultBin returns the Vault binary: $VAULT_BIN, else bin/vault as
// `make vault` leaves it.
func VaultBin() (string, error) {
	p := os.Getenv("VAULT_BIN")
	if p == "" {
		p = filepath.Join(RepoRoot(), "bin", "vault")
	}
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("no Vault binary at %s: run `make vault` (or `make test`), or set VAULT_BIN", p)
	}
	return p, nil
}

// BuildPlugin compiles the plugin into dir with version set, and returns its
// SHA-256 for `vault plugin register -sha256`.
func BuildPlugin(dir, version string) (string, error) {
	out := filepath.Join(dir, PluginName)
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version="+version, "-o", out, "./cmd/"+PluginName)
	cmd.Dir = RepoRoot()
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building plugin: %w\n%s", err, b)
	}
	return FileSHA256(out)
}

// Platform is the host's <os>_<arch>, as release file names spell it.
func Platform() string { return runtime.GOOS + "_" + runtime.GOARCH }

// BuildRelease writes the release artifacts of version for the host's
// platform into dir with the tool `make release` runs (tools/release), so
// the zip, the binary and SHA256SUMS are the ones an operator downloads;
// the other platforms are skipped to save their builds.
func BuildRelease(dir, version string) error {
	cmd := exec.Command("go", "run", "./tools/release", "-version", version, "-out", dir,
		"-targets", runtime.GOOS+"/"+runtime.GOARCH)
	cmd.Dir = RepoRoot()
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building release %s: %w\n%s", version, err, b)
	}
	return nil
}

// FileSHA256 hashes a file.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Vault is a running dev server.
type Vault struct {
	Bin       string
	Addr      string
	Token     string
	Dir       string // scratch dir: plugin dir, config, log
	PluginDir string
	LogPath   string

	cmd  *exec.Cmd
	done chan error
	http *http.Client
	once sync.Once
}

// Options configure a dev server.
type Options struct {
	// Dir is a scratch directory (required).
	Dir string
	// ExtraHCL is appended to the server config.
	ExtraHCL string
}

// StartDev starts `vault server -dev` on a free loopback port with a plugin
// directory, and waits until it answers.
func StartDev(ctx context.Context, opts Options) (*Vault, error) {
	bin, err := VaultBin()
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	v := &Vault{
		Bin: bin, Dir: opts.Dir, Token: "root",
		Addr:      fmt.Sprintf("http://127.0.0.1:%d", port),
		PluginDir: filepath.Join(opts.Dir, "plugins"),
		LogPath:   filepath.Join(opts.Dir, "vault.log"),
		http:      &http.Client{Timeout: 60 * time.Second},
		done:      make(chan error, 1),
	}
	if err := os.MkdirAll(v.PluginDir, 0o755); err != nil {
		return nil, err
	}
	hcl := fmt.Sprintf("plugin_directory = %q\n%s\n", v.PluginDir, opts.ExtraHCL)
	cfgPath := filepath.Join(opts.Dir, "vault.hcl")
	if err := os.WriteFile(cfgPath, []byte(hcl), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(v.LogPath)
	if err != nil {
		return nil, err
	}
	v.cmd = exec.Command(bin, "server", "-dev", "-dev-root-token-id="+v.Token,
		fmt.Sprintf("-dev-listen-address=127.0.0.1:%d", port), "-config="+cfgPath, "-log-level=debug")
	v.cmd.Env = cleanEnv()
	v.cmd.Stdout, v.cmd.Stderr = logf, logf
	if err := v.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting vault: %w", err)
	}
	go func() { v.done <- v.cmd.Wait(); logf.Close() }()
	if err := v.waitReady(ctx); err != nil {
		v.Stop()
		return nil, fmt.Errorf("%w\n--- vault log ---\n%s", err, v.LogTail(40))
	}
	return v, nil
}

func (v *Vault) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-v.done:
			v.done <- err
			return fmt.Errorf("vault exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		resp, err := v.http.Get(v.Addr + "/v1/sys/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
	}
	return errors.New("vault did not become ready in 60s")
}

// Stop ends the server.
func (v *Vault) Stop() {
	v.once.Do(func() {
		if v.cmd == nil || v.cmd.Process == nil {
			return
		}
		_ = v.cmd.Process.Signal(os.Interrupt)
		select {
		case <-v.done:
		case <-time.After(10 * time.Second):
			_ = v.cmd.Process.Kill()
			<-v.done
		}
	})
}

// Log returns the server's log so far.
func (v *Vault) Log() string {
	b, _ := os.ReadFile(v.LogPath)
	return string(b)
}

// LogTail returns the last n lines of the server log.
func (v *Vault) LogTail(n int) string {
	lines := strings.Split(strings.TrimRight(v.Log(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// CLIResult is one `vault` CLI run.
type CLIResult struct {
	Stdout, Stderr string
	Err            error
}

// OK reports a zero exit.
func (r CLIResult) OK() bool { return r.Err == nil }

func (r CLIResult) String() string {
	return fmt.Sprintf("err=%v\nstdout:\n%s\nstderr:\n%s", r.Err, r.Stdout, r.Stderr)
}

// CLI runs the vault CLI against this server.
func (v *Vault) CLI(args ...string) CLIResult {
	cmd := exec.Command(v.Bin, args...)
	cmd.Env = append(cleanEnv(), "VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+v.Token)
	cmd.Dir = v.Dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return CLIResult{Stdout: out.String(), Stderr: errb.String(), Err: err}
}

// CLIJSON runs the CLI with -format=json after the subcommand words and
// decodes stdout.
func (v *Vault) CLIJSON(out any, args ...string) CLIResult {
	r := v.CLI(args...)
	if r.OK() {
		if err := json.Unmarshal([]byte(r.Stdout), out); err != nil {
			r.Err = fmt.Errorf("decoding CLI output: %w", err)
		}
	}
	return r
}

// Register builds the plugin at version, registers it in the catalog with its
// SHA-256, and mounts it at path.
func (v *Vault) Register(version, mount string) error {
	sum, err := BuildPlugin(v.PluginDir, version)
	if err != nil {
		return err
	}
	if r := v.CLI("plugin", "register", "-sha256="+sum, "-version="+version, "secret", PluginName); !r.OK() {
		return fmt.Errorf("plugin register: %s", r)
	}
	if mount == "" {
		return nil
	}
	if r := v.CLI("secrets", "enable", "-path="+mount, PluginName); !r.OK() {
		return fmt.Errorf("secrets enable: %s", r)
	}
	return nil
}

// APIResponse is a decoded Vault HTTP API response.
type APIResponse struct {
	Status        int
	LeaseID       string         `json:"lease_id"`
	LeaseDuration int            `json:"lease_duration"`
	Renewable     bool           `json:"renewable"`
	Data          map[string]any `json:"data"`
	Errors        []string       `json:"errors"`
	Warnings      []string       `json:"warnings"`
}

// API sends one HTTP API request (path without /v1/).
func (v *Vault) API(ctx context.Context, method, path string, body any) (*APIResponse, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, v.Addr+"/v1/"+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-Vault-Token", v.Token)
	resp, err := v.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := &APIResponse{Status: resp.StatusCode}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			return nil, fmt.Errorf("decoding %s %s (HTTP %d): %w", method, path, resp.StatusCode, err)
		}
	}
	return out, nil
}

// PID is the server's process id.
func (v *Vault) PID() int { return v.cmd.Process.Pid }

func freePort() (int, error) {
	// Vault's dev cluster listener takes port+1; find a pair that is free.
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1))
		l.Close()
		if err == nil {
			l2.Close()
			return port, nil
		}
	}
	return 0, errors.New("no free port pair on loopback")
}

// cleanEnv drops VAULT_* variables of the caller so tests see only their own.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			env = append(env, kv)
		}
	}
	return env
}

// ServerOptions configure a non-dev server with file storage: a real
// restart keeps its data, as a production Vault does.
type ServerOptions struct {
	// Dir holds the storage, config and log; reuse it to restart.
	Dir string
	// Port is the API port (0 picks a free one).
	Port int
}

// Server is a non-dev Vault on file storage. After Start it is initialised
// (once) and unsealed.
type Server struct {
	*Vault
	Port      int
	UnsealKey string
}

// StartServer starts (or restarts, when Dir holds an initialised Vault) a
// file-storage server, initialises it on first start, and unseals it.
func StartServer(ctx context.Context, opts ServerOptions) (*Server, error) {
	bin, err := VaultBin()
	if err != nil {
		return nil, err
	}
	port := opts.Port
	if port == 0 {
		if port, err = freePort(); err != nil {
			return nil, err
		}
	}
	s := &Server{Port: port, Vault: &Vault{
		Bin: bin, Dir: opts.Dir,
		Addr:      fmt.Sprintf("http://127.0.0.1:%d", port),
		PluginDir: filepath.Join(opts.Dir, "plugins"),
		LogPath:   filepath.Join(opts.Dir, "vault.log"),
		http:      &http.Client{Timeout: 60 * time.Second},
		done:      make(chan error, 1),
	}}
	for _, d := range []string{s.PluginDir, filepath.Join(opts.Dir, "data")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	hcl := fmt.Sprintf(`
storage "file" { path = %q }
listener "tcp" {
  address = "127.0.0.1:%d"
  cluster_address = "127.0.0.1:%d"
  tls_disable = true
}
api_addr = "http://127.0.0.1:%d"
cluster_addr = "http://127.0.0.1:%d"
plugin_directory = %q
disable_mlock = true
log_level = "debug"
`, filepath.Join(opts.Dir, "data"), port, port+1, port, port+1, s.PluginDir)
	cfgPath := filepath.Join(opts.Dir, "vault.hcl")
	if err := os.WriteFile(cfgPath, []byte(hcl), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	s.cmd = exec.Command(bin, "server", "-config="+cfgPath)
	s.cmd.Env = cleanEnv()
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting vault: %w", err)
	}
	go func() { s.done <- s.cmd.Wait(); logf.Close() }()
	if err := s.initAndUnseal(ctx); err != nil {
		s.Kill()
		return nil, fmt.Errorf("%w\n--- vault log ---\n%s", err, s.LogTail(40))
	}
	return s, nil
}

type initState struct {
	UnsealKey string `json:"unseal_key"`
	RootToken string `json:"root_token"`
}

func (s *Server) initAndUnseal(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := s.http.Get(s.Addr + "/v1/sys/seal-status")
		if err == nil {
			resp.Body.Close()
			break
		}
		select {
		case err := <-s.done:
			s.done <- err
			return fmt.Errorf("vault exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("vault did not listen in 60s")
		}
	}
	statePath := filepath.Join(s.Dir, "init.json")
	var st initState
	if b, err := os.ReadFile(statePath); err == nil {
		if err := json.Unmarshal(b, &st); err != nil {
			return err
		}
	} else {
		var out struct {
			Keys      []string `json:"unseal_keys_b64"`
			RootToken string   `json:"root_token"`
		}
		if r := s.CLIJSON(&out, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"); !r.OK() {
			return fmt.Errorf("operator init: %s", r)
		}
		st = initState{UnsealKey: out.Keys[0], RootToken: out.RootToken}
		b, _ := json.Marshal(st)
		if err := os.WriteFile(statePath, b, 0o600); err != nil {
			return err
		}
	}
	s.Token, s.UnsealKey = st.RootToken, st.UnsealKey
	if r := s.CLI("operator", "unseal", st.UnsealKey); !r.OK() {
		return fmt.Errorf("operator unseal: %s", r)
	}
	for time.Now().Before(deadline) {
		resp, err := s.API(ctx, "GET", "sys/health", nil)
		if err == nil && resp.Status == 200 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("vault did not become active in 60s")
}

// Kill ends the server with SIGKILL, as a crash would, and waits for it.
// Plugin processes it started are killed too, so none outlives its Vault.
func (s *Server) Kill() {
	s.once.Do(func() {
		if s.cmd == nil || s.cmd.Process == nil {
			return
		}
		_ = s.cmd.Process.Kill()
		<-s.done
		killPlugins(s.PluginDir)
	})
}

// killPlugins kills processes running a binary from dir (orphaned plugins of
// a killed Vault).
func killPlugins(dir string) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range entries {
		pid := 0
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid <= 0 {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.HasPrefix(exe, dir+string(os.PathSeparator)) {
			if p, err := os.FindProcess(pid); err == nil {
				_ = p.Kill()
			}
		}
	}
}
