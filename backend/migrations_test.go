package backend

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

func TestSchemaMigration(t *testing.T) {
	cases := []struct {
		name    string
		stored  *schemaRecord
		wantErr string
	}{
		{"unversioned storage is migrated", nil, ""},
		{"current storage is left alone", &schemaRecord{Version: schemaVersion}, ""},
		{"storage of a newer plugin is refused", &schemaRecord{Version: schemaVersion + 1}, "newer plugin"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := &logical.InmemStorage{}
			if tc.stored != nil {
				e, _ := logical.StorageEntryJSON(schemaKey, tc.stored)
				s.Put(context.Background(), e)
			}
			b := New(Options{Version: "test"})
			conf := logical.TestBackendConfig()
			conf.StorageView = s
			if err := b.Setup(context.Background(), conf); err != nil {
				t.Fatal(err)
			}
			err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: s})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			e, _ := s.Get(context.Background(), schemaKey)
			var rec schemaRecord
			if e == nil || e.DecodeJSON(&rec) != nil || rec.Version != schemaVersion {
				t.Fatalf("schema after init: %+v", rec)
			}
		})
	}
}

// lockedBuffer collects a logger's output; background work may log while
// the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// allStored is every key of storage (schema, due index, quota, wal too) with its bytes.
func allStored(t *testing.T, s logical.Storage) map[string]string {
	t.Helper()
	keys, err := logical.CollectKeys(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, k := range keys {
		e, err := s.Get(context.Background(), k)
		if err != nil || e == nil {
			t.Fatalf("get %s: %v", k, err)
		}
		out[k] = string(e.Value)
	}
	return out
}

// TestNewerSchemaIsRefusedAndLeftAlone is a downgrade onto storage a newer
// version wrote: the older binary says why in its log and in every answer,
// serves nothing, calls no broker, and changes no byte of storage; put back
// on a schema it knows, the same storage serves the same token unminted.
func TestNewerSchemaIsRefusedAndLeftAlone(t *testing.T) {
	c := newFakeHarness(t, finamLike(), chatLike())
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	c.ok(logical.UpdateOperation, "config/r", map[string]any{"provider": "fakerot", "secret": "s2", "refresh_token": "seed-1"})
	lease := c.ok(logical.ReadOperation, "creds/x", nil)
	token := lease.Data["access_token"]
	c.token("creds/r")
	c.waitIdle("x")
	c.waitIdle("r")
	c.b.Clean(context.Background()) // the old process is gone

	c.setSchema(schemaVersion + 1)
	before := allStored(t, c.raw)
	calls := map[string]int{}
	for n, f := range c.brokers {
		calls[n] = f.callCount()
	}

	logs := &lockedBuffer{}
	conf := logical.TestBackendConfig()
	conf.StorageView = c.storage
	conf.Logger = hclog.New(&hclog.LoggerOptions{Output: logs, Level: hclog.Trace})
	provs := map[string]provider.Provider{}
	for n, f := range c.brokers {
		provs[n] = f
	}
	lb, err := FactoryWith(Options{Version: "older", Providers: provs, Clock: c.clock})(context.Background(), conf)
	if err != nil {
		t.Fatal(err)
	}
	b := lb.(*backend)
	t.Cleanup(func() { b.Clean(context.Background()) })
	want := fmt.Sprintf("storage was written by a newer plugin (schema %d, this plugin knows %d)", schemaVersion+1, schemaVersion)
	err = b.Initialize(context.Background(), &logical.InitializationRequest{Storage: c.storage})
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("initialize: %v, want %q", err, want)
	}
	if got := logs.String(); !strings.Contains(got, "[ERROR]") || !strings.Contains(got, want) {
		t.Errorf("the log does not show the refusal at ERROR:\n%s", got)
	}

	requests := []struct {
		op   logical.Operation
		path string
		data map[string]any
	}{
		{logical.ReadOperation, "config/x", nil},
		{logical.ReadOperation, "creds/x", nil},
		{logical.ReadOperation, "creds/r", nil},
		{logical.ListOperation, "config/", nil},
		{logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s3"}},
		{logical.CreateOperation, "config/new", map[string]any{"provider": "fake", "secret": "s4"}},
		{logical.DeleteOperation, "config/r", nil},
		{logical.UpdateOperation, "rotate-root/r", nil},
		{logical.UpdateOperation, "config/x/retire", nil},
		{logical.ReadOperation, "settings", nil},
		{logical.UpdateOperation, "settings", map[string]any{"allowed_hosts": "a.example"}},
	}
	for _, r := range requests {
		resp, err := request(b, c.storage, r.op, r.path, r.data)
		if statusOf(resp, err) != http.StatusServiceUnavailable || !strings.Contains(errText(resp, err), want) {
			t.Errorf("%s %s: status %d %q, want 503 with %q", r.op, r.path, statusOf(resp, err), errText(resp, err), want)
		}
	}
	renew := &logical.Request{Operation: logical.RenewOperation, Storage: c.storage, Secret: lease.Secret}
	if resp, err := b.HandleRequest(context.Background(), renew); statusOf(resp, err) != http.StatusServiceUnavailable {
		t.Errorf("renew: status %d %q, want 503", statusOf(resp, err), errText(resp, err))
	}
	// Revoke stays possible (it touches nothing), so a disable can finish.
	revoke := &logical.Request{Operation: logical.RevokeOperation, Storage: c.storage, Secret: lease.Secret}
	if resp, err := b.HandleRequest(context.Background(), revoke); errText(resp, err) != "" {
		t.Errorf("revoke refused: %s", errText(resp, err))
	}
	// Vault's rollback tick: no refresh, no rotation recovery, no error.
	c.clock.Advance(14 * time.Minute)
	tick := &logical.Request{Operation: logical.RollbackOperation, Storage: c.storage}
	if resp, err := b.HandleRequest(context.Background(), tick); errText(resp, err) != "" {
		t.Errorf("rollback tick: %s", errText(resp, err))
	}

	if after := allStored(t, c.raw); !maps.Equal(before, after) {
		t.Errorf("storage changed under the refusal:\nbefore %v\nafter  %v", slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
	}
	for n, f := range c.brokers {
		if f.callCount() != calls[n] {
			t.Errorf("broker %s called %d times under the refusal", n, f.callCount()-calls[n])
		}
	}

	// The newer version's storage is intact: on a schema this version
	// knows (here: the record put back), it serves the cached token.
	c.clock.Advance(-14 * time.Minute)
	c.setSchema(schemaVersion)
	c.b = c.newBackend(nil)
	if got := c.token("creds/x"); got != token {
		t.Errorf("after the schema is known again: token %q, want the cached %q", got, token)
	}
	if f := c.brokers["fake"]; f.callCount() != calls["fake"] {
		t.Errorf("serving the cached token minted again")
	}
}

// TestInstallDocNamesTheSchema keeps docs/install.md's table of schemas
// and releases true: a new schema version needs a row there, which tells an
// operator which rollbacks stop working.
func TestInstallDocNamesTheSchema(t *testing.T) {
	doc, err := os.ReadFile("../docs/install.md")
	if err != nil {
		t.Fatal(err)
	}
	_, table, ok := strings.Cut(string(doc), "## Storage schemas")
	if !ok {
		t.Fatal("docs/install.md has no Storage schemas section")
	}
	newest := 0
	for _, m := range regexp.MustCompile(`(?m)^\| ([0-9]+) \|`).FindAllStringSubmatch(table, -1) {
		n, _ := strconv.Atoi(m[1])
		newest = max(newest, n)
	}
	if newest != schemaVersion {
		t.Errorf("docs/install.md's newest storage schema is %d; the plugin writes %d: add its row (and its releases)", newest, schemaVersion)
	}
}
