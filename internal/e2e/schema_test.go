package e2e

import (
	"context"
	"fmt"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// TestNewerSchemaRefusedOnVault is a downgrade onto storage of a newer
// schema on the real server: the mount's schema record is set to 3 through
// sys/raw (as a newer release would leave it) and the plugin reloaded. The
// refusal must be in the server log and in the answers to config and creds
// reads, no broker is called and no stored byte changes; with the record
// put back, the same cached token is served.
func TestNewerSchemaRefusedOnVault(t *testing.T) {
	sb := sandbox.New(sandbox.Options{})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	v, err := vaulttest.StartDev(ctx, vaulttest.Options{Dir: t.TempDir(), ExtraHCL: "raw_storage_endpoint = true"})
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
	e := &env{t: t, vault: v, sb: sb, sbURL: srv.URL}
	e.cli("write", "broker/config/finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+srv.URL)
	var cred secretResponse
	e.cliJSON(&cred, "read", "-format=json", "broker/creds/finam")

	var mounts map[string]struct {
		UUID string `json:"uuid"`
	}
	e.cliJSON(&mounts, "secrets", "list", "-detailed", "-format=json")
	raw := "sys/raw/logical/" + mounts["broker/"].UUID + "/"
	// stored reads every key of the mount's storage, through sys/raw.
	stored := func() map[string]string {
		out := map[string]string{}
		var walk func(prefix string)
		walk = func(prefix string) {
			var keys []string
			if r := v.CLIJSON(&keys, "list", "-format=json", raw+prefix); !r.OK() {
				return
			}
			for _, k := range keys {
				if strings.HasSuffix(k, "/") {
					walk(prefix + k)
					continue
				}
				var entry secretResponse
				e.cliJSON(&entry, "read", "-format=json", raw+prefix+k)
				out[prefix+k] = fmt.Sprint(entry.Data["value"])
			}
		}
		walk("")
		return out
	}
	before := stored()
	if !strings.Contains(before["schema"], `"version":2`) || before["config/finam"] == "" {
		t.Fatalf("unexpected storage of the mount: %v", before)
	}

	e.cli("write", raw+"schema", `value={"version":3}`)
	before = stored()
	calls := sb.AllCalls()
	r := v.CLI("plugin", "reload", "-plugin="+vaulttest.PluginName)
	t.Logf("plugin reload onto schema 3: ok=%v %s", r.OK(), strings.TrimSpace(r.Stderr+r.Stdout))

	want := "storage was written by a newer plugin (schema 3, this plugin knows 2)"
	for _, path := range []string{"broker/creds/finam", "broker/config/finam"} {
		r := v.CLI("read", path)
		if r.OK() || !strings.Contains(r.Stderr, want) || !strings.Contains(r.Stderr, "Code: 503") {
			t.Errorf("vault read %s: want a 503 with %q, got %s", path, want, r)
		}
	}
	if r := v.CLI("write", "broker/config/finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+srv.URL); r.OK() || !strings.Contains(r.Stderr, want) {
		t.Errorf("a config write was not refused: %s", r)
	}
	// Vault's own level for the line, not the plugin's text inside a DEBUG
	// line: a server at the default level (info) drops DEBUG.
	lines := slices.DeleteFunc(strings.Split(v.Log(), "\n"), func(l string) bool { return !strings.Contains(l, want) })
	if len(lines) == 0 || !strings.HasPrefix(strings.SplitN(lines[0], " ", 3)[1], "[ERROR]") {
		t.Errorf("the server log has no ERROR line with %q: %q", want, lines)
	} else {
		t.Logf("server log: %s", strings.TrimSpace(lines[0]))
	}
	if after := stored(); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("storage changed under the refusal:\nbefore %v\nafter  %v", before, after)
	}
	if got := sb.AllCalls(); fmt.Sprint(got) != fmt.Sprint(calls) {
		t.Errorf("brokers called under the refusal: before %v, after %v", calls, got)
	}

	e.cli("write", raw+"schema", `value={"version":2}`)
	e.cli("plugin", "reload", "-plugin="+vaulttest.PluginName)
	var again secretResponse
	e.cliJSON(&again, "read", "-format=json", "broker/creds/finam")
	if again.Data["access_token"] != cred.Data["access_token"] {
		t.Errorf("on a known schema again: a different token (the cached one was lost)")
	}
	if got := sb.AllCalls(); fmt.Sprint(got) != fmt.Sprint(calls) {
		t.Errorf("serving the cached token called the brokers: before %v, after %v", calls, got)
	}
}
