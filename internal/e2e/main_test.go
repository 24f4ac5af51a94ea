// Package e2e tests the plugin on the real Vault server and CLI, registered
// through the plugin catalog as an operator would, against the sandbox.
package e2e

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

const pluginVersion = "v0.1.0-e2e"

type env struct {
	t     *testing.T
	vault *vaulttest.Vault
	sb    *sandbox.Server
	sbURL string
}

// start runs a sandbox and a dev Vault with the plugin mounted at broker/.
func start(t *testing.T, opts sandbox.Options) *env {
	t.Helper()
	sb := sandbox.New(opts)
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
	if err := v.Register(pluginVersion, "broker"); err != nil {
		t.Fatal(err)
	}
	return &env{t: t, vault: v, sb: sb, sbURL: srv.URL}
}

// cli runs the vault CLI and fails the test on a non-zero exit.
func (e *env) cli(args ...string) vaulttest.CLIResult {
	e.t.Helper()
	r := e.vault.CLI(args...)
	if !r.OK() {
		e.t.Fatalf("vault %v: %s", args, r)
	}
	return r
}

func (e *env) cliJSON(out any, args ...string) {
	e.t.Helper()
	if r := e.vault.CLIJSON(out, args...); !r.OK() {
		e.t.Fatalf("vault %v: %s", args, r)
	}
}

// secretResponse is `vault read -format=json` of a leased secret.
type secretResponse struct {
	LeaseID       string         `json:"lease_id"`
	LeaseDuration int            `json:"lease_duration"`
	Renewable     bool           `json:"renewable"`
	Data          map[string]any `json:"data"`
}
