package backend

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// alorLike narrows tokens at issue, as ALOR's allowedPortfolios does.
func alorLike() *fakeBroker {
	f := newFakeBroker("fakenarrow", provider.Minted, false, nil)
	f.narrows = true
	f.accounts = []string{"D1", "D2", "G3"}
	f.readOnly = false
	return f
}

func (h *harness) read(path string) map[string]any {
	h.t.Helper()
	return h.ok(logical.ReadOperation, path, nil).Data
}

func TestRoleWriteReadListDelete(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/fin", map[string]any{"provider": "fake", "secret": "s1", "ttl": "30m"})
	c.ok(logical.UpdateOperation, "roles/reports", map[string]any{"config": "fin", "require_readonly": true, "ttl": "10m"})
	c.token("creds/reports")

	got := c.read("roles/reports")
	for k, want := range map[string]any{"config": "fin", "require_readonly": true, "ttl": int64(600), "readonly": true} {
		if got[k] != want {
			t.Errorf("role read %s = %v, want %v", k, got[k], want)
		}
	}
	if !slices.Equal(got["account_ids"].([]string), []string{"A1"}) {
		t.Errorf("role read account_ids = %v", got["account_ids"])
	}
	for k, v := range got {
		if strings.Contains(fmt.Sprint(v), "fake-token") || strings.Contains(fmt.Sprint(v), "s1") && k != "config" {
			t.Errorf("role read shows a token or secret in %s: %v", k, v)
		}
	}
	list := c.ok(logical.ListOperation, "roles/", nil).Data["keys"].([]string)
	if !slices.Equal(list, []string{"reports"}) {
		t.Errorf("roles list = %v", list)
	}
	creds := c.read("creds/reports")
	if creds["config"] != "fin" || creds["role"] != "reports" {
		t.Errorf("creds of a role: config=%v role=%v", creds["config"], creds["role"])
	}
	if cfgCreds := c.read("creds/fin"); cfgCreds["role"] != "" || cfgCreds["config"] != "fin" {
		t.Errorf("creds of the config: config=%v role=%v", cfgCreds["config"], cfgCreds["role"])
	}

	body, err := c.b.metrics.expose(c.b)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := sampleValue(t, string(body), "broker_creds_total", "config", "fin", "role", "reports", "outcome", "hit"); !ok || got < 1 {
		t.Errorf("metrics do not count the role's reads: %v %v", got, ok)
	}
	resp, err := c.do(logical.DeleteOperation, "config/fin", nil)
	if statusOf(resp, err) != 409 || !strings.Contains(errText(resp, err), "reports") {
		t.Errorf("deleting a config a role names: %d %s", statusOf(resp, err), errText(resp, err))
	}
	lease := c.ok(logical.ReadOperation, "creds/reports", nil).Secret
	c.ok(logical.DeleteOperation, "roles/reports", nil)
	if resp, err := c.do(logical.ReadOperation, "creds/reports", nil); statusOf(resp, err) != 404 {
		t.Errorf("creds of a deleted role: %d %s", statusOf(resp, err), errText(resp, err))
	}
	if resp, err := c.renewOn(c.b, lease); statusOf(resp, err) != 400 || !strings.Contains(errText(resp, err), "deleted") {
		t.Errorf("renew of a deleted role's lease: %d %s", statusOf(resp, err), errText(resp, err))
	}
	if body, _ := c.b.metrics.expose(c.b); strings.Contains(string(body), `role="reports"`) {
		t.Error("a deleted role's series remain")
	}
	c.ok(logical.DeleteOperation, "config/fin", nil)
}

// Every refused role write names the field and stores nothing.
func TestRefusedRoleWritesStoreNothing(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/fin", map[string]any{"provider": "fake", "secret": "s1", "allowed_accounts": "A1", "ttl": "30m", "max_ttl": "1h"})
	c.ok(logical.UpdateOperation, "roles/taken", map[string]any{"config": "fin"})
	for _, tc := range []struct {
		name, path string
		data       map[string]any
		want       string
	}{
		{"no config field", "roles/r", map[string]any{}, "config: required"},
		{"unknown config", "roles/r", map[string]any{"config": "nope"}, `config: no config named "nope"`},
		{"a config's name", "roles/fin", map[string]any{"config": "fin"}, `name: a config is named "fin"`},
		{"account outside the config's", "roles/r", map[string]any{"config": "fin", "allowed_accounts": "A1,B7"}, "allowed_accounts: B7 is not in config"},
		{"ttl above the config's", "roles/r", map[string]any{"config": "fin", "ttl": "45m"}, "ttl: 45m0s is above"},
		{"max_ttl above the config's", "roles/r", map[string]any{"config": "fin", "max_ttl": "2h"}, "max_ttl: 2h0m0s is above"},
		{"ttl above max_ttl", "roles/r", map[string]any{"config": "fin", "ttl": "20m", "max_ttl": "10m"}, "ttl: 20m0s is above max_ttl"},
		{"unknown field", "roles/r", map[string]any{"config": "fin", "colour": "red"}, "colour: unknown field"},
		{"bad ttl", "roles/r", map[string]any{"config": "fin", "ttl": "soon"}, "ttl"},
		{"config changed", "roles/taken", map[string]any{"config": "other"}, "config: cannot change"},
		{"a role's name for a config", "config/taken", map[string]any{"provider": "fake", "secret": "s2"}, `name: a role is named "taken"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := f.callCount()
			resp, err := c.do(logical.UpdateOperation, tc.path, tc.data)
			if statusOf(resp, err) != 400 || !strings.Contains(errText(resp, err), tc.want) {
				t.Fatalf("want a 400 with %q, got %d %s", tc.want, statusOf(resp, err), errText(resp, err))
			}
			if tc.path == "roles/r" && c.exists(rolePrefix+"r") {
				t.Error("a refused role write stored the role")
			}
			if tc.path == "config/taken" && (c.exists(configPrefix+"taken") || f.callCount() != calls) {
				t.Errorf("a config write of a role's name stored or called the broker (%d calls)", f.callCount()-calls)
			}
		})
	}
	if r := c.read("roles/taken"); r["config"] != "fin" {
		t.Errorf("a refused update changed the role: %v", r)
	}
}

// A broker that cannot narrow: a guard only checks the config's token and
// never splits the cache; a role narrower than the token is refused, saying
// the broker cannot narrow and what the token reaches.
func TestRolesOverABrokerThatCannotNarrowShareTheConfigToken(t *testing.T) {
	f := finamLike() // read-only, reaches A1
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/fin", map[string]any{"provider": "fake", "secret": "s1"})
	c.ok(logical.UpdateOperation, "roles/ro", map[string]any{"config": "fin", "require_readonly": true, "allowed_accounts": "A1"})
	calls := f.callCount()
	cfgTok := c.token("creds/fin")
	if got := c.token("creds/ro"); got != cfgTok {
		t.Errorf("a read-only role over a read-only secret got %q, not the config's %q", got, cfgTok)
	}
	if n := f.callCount() - calls; n != 0 {
		t.Errorf("reads of the config and a guard-only role cost %d mints", n)
	}
	resp, err := c.do(logical.UpdateOperation, "roles/narrow", map[string]any{"config": "fin", "allowed_accounts": "A2"})
	if statusOf(resp, err) != 400 || !containsAll(errText(resp, err), "cannot narrow", "A1") || c.exists(rolePrefix+"narrow") {
		t.Errorf("a role narrower than the token: %d %s (stored %v)", statusOf(resp, err), errText(resp, err), c.exists(rolePrefix+"narrow"))
	}
	// The broker's evidence changes: the role's guard is checked at read.
	f.mu.Lock()
	f.accounts = []string{"A1", "A9"}
	f.mu.Unlock()
	c.ok(logical.UpdateOperation, "config/fin/retire", nil)
	c.token("creds/fin")
	if resp, err := c.do(logical.ReadOperation, "creds/ro", nil); statusOf(resp, err) != 403 || !containsAll(errText(resp, err), "cannot narrow", "A9") {
		t.Errorf("creds of a role the token outgrew: %d %s", statusOf(resp, err), errText(resp, err))
	}
}

// A broker that narrows: each distinct request has its own token, minted
// when first read, shared by every reader of it, persisted across restarts;
// the config and a role asking the same share one.
func TestNarrowingRolesGetTheirOwnTokens(t *testing.T) {
	f := alorLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/alor", map[string]any{"provider": "fakenarrow", "secret": "s1", "allowed_accounts": "D1,D2"})
	c.ok(logical.UpdateOperation, "roles/d1", map[string]any{"config": "alor", "allowed_accounts": "D1"})
	c.ok(logical.UpdateOperation, "roles/d2", map[string]any{"config": "alor", "allowed_accounts": "D2"})
	c.ok(logical.UpdateOperation, "roles/both", map[string]any{"config": "alor", "allowed_accounts": "D2,D1"})
	if n := f.callCount(); n != 1 {
		t.Fatalf("writing a config and three roles cost %d mints (want the config's verify only)", n)
	}
	for name, want := range map[string][]string{"d1": {"D1"}, "d2": {"D2"}, "both": {"D1", "D2"}, "alor": {"D1", "D2"}} {
		if got := c.read("creds/" + name)["account_ids"].([]string); !slices.Equal(got, want) {
			t.Errorf("creds/%s reaches %v, want %v", name, got, want)
		}
	}
	if n := f.callCount(); n != 3 {
		t.Errorf("reads of two narrowed roles cost %d mints in all, want 3 (config, d1, d2; 'both' asks what the config asks)", n)
	}
	if c.token("creds/both") != c.token("creds/alor") {
		t.Error("a role asking for the config's own accounts did not share the config's token")
	}
	calls := f.callCount()
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.do(logical.ReadOperation, "creds/"+[]string{"d1", "d2"}[i%2], nil)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	wait(t, done, "40 reads did not finish")
	if n := f.callCount() - calls; n != 0 {
		t.Errorf("40 cached reads across two roles cost %d mints", n)
	}
	d1 := c.token("creds/d1")
	b := c.newBackend(nil) // a restart or failover
	resp, err := c.doOn(b, logical.ReadOperation, "creds/d1", nil)
	if err != nil || resp.IsError() || resp.Data["access_token"] != d1 || f.callCount() != calls {
		t.Errorf("after a restart creds/d1 cost %d mints (same token %v)", f.callCount()-calls, resp != nil && resp.Data["access_token"] == d1)
	}

	// Retire reaches every token of the config, its roles' included.
	c.ok(logical.UpdateOperation, "config/alor/retire", nil)
	for _, name := range []string{"d1", "d2", "alor"} {
		if got := c.token("creds/" + name); got == d1 {
			t.Errorf("after retire creds/%s served a token minted before it", name)
		}
	}
	if rec, _ := c.stored("alor"); len(rec.Narrowed) != 2 || rec.Narrowed["accounts:D1"].Epoch != rec.RetireEpoch {
		t.Errorf("after retire and reads the record holds %d narrowed tokens", len(rec.Narrowed))
	}
}

// A refresh of one narrowing at the broker never blocks a cached read of
// another.
func TestRefreshOfOneNarrowingNeverBlocksReadsOfAnother(t *testing.T) {
	f := alorLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/alor", map[string]any{"provider": "fakenarrow", "secret": "s1"})
	c.ok(logical.UpdateOperation, "roles/d1", map[string]any{"config": "alor", "allowed_accounts": "D1"})
	c.ok(logical.UpdateOperation, "roles/d2", map[string]any{"config": "alor", "allowed_accounts": "D2"})
	d2 := c.token("creds/d2")
	entered, release := f.holdNext()
	defer release()
	var (
		resp *logical.Response
		err  error
	)
	cold := c.goDo(logical.ReadOperation, "creds/d1", nil, &resp, &err)
	wait(t, entered, "d1's mint never reached the broker")
	got := make(chan string, 1)
	go func() { got <- c.token("creds/d2") }()
	select {
	case tok := <-got:
		if tok != d2 {
			t.Errorf("creds/d2 served %q, not its cached %q", tok, d2)
		}
	case <-cold:
		t.Fatal("the held mint finished on its own")
	case <-waitTimeout():
		t.Fatal("a cached read of d2 waited on d1's mint")
	}
	release()
	wait(t, cold, "d1's read did not finish")
}

// A role deleted while its token is being minted: the token is not
// installed, nothing comes back.
func TestRoleDeleteDuringItsMintInstallsNothing(t *testing.T) {
	f := alorLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/alor", map[string]any{"provider": "fakenarrow", "secret": "s1"})
	c.ok(logical.UpdateOperation, "roles/d1", map[string]any{"config": "alor", "allowed_accounts": "D1"})
	entered, release := f.holdNext()
	var (
		resp *logical.Response
		err  error
	)
	read := c.goDo(logical.ReadOperation, "creds/d1", nil, &resp, &err)
	wait(t, entered, "d1's mint never reached the broker")
	c.ok(logical.DeleteOperation, "roles/d1", nil)
	release()
	wait(t, read, "the read of the deleted role did not finish")
	if statusOf(resp, err) != 404 {
		t.Errorf("a read of a role deleted during its mint: %d %s %v", statusOf(resp, err), errText(resp, err), resp)
	}
	c.waitIdle("alor")
	if rec, _ := c.stored("alor"); len(rec.Narrowed) != 0 {
		t.Errorf("the deleted role's token was installed: %v", rec.Narrowed)
	}
	c.inState("alor", func(st *configState) {
		if len(st.rec.Narrowed) != 0 || st.narrowed["accounts:D1"] != nil {
			t.Errorf("memory holds the deleted role's token or slot")
		}
	})
}

// A config delete racing a role write over it: the delete waits for the
// role write, then refuses (409 naming the role); never a role over a
// deleted config.
func TestConfigDeleteRacingRoleWrite(t *testing.T) {
	c := newFakeHarness(t, finamLike())
	c.ok(logical.UpdateOperation, "config/fin", map[string]any{"provider": "fake", "secret": "s1"})
	hit, release := c.storage.holdNextPut(rolePrefix + "r")
	var (
		delResp, roleResp *logical.Response
		delErr, roleErr   error
	)
	wrote := c.goDo(logical.UpdateOperation, "roles/r", map[string]any{"config": "fin"}, &roleResp, &roleErr)
	wait(t, hit, "the role write never reached storage")
	deleted := c.goDo(logical.DeleteOperation, "config/fin", nil, &delResp, &delErr)
	c.queued("fin", deleted)
	release()
	wait(t, wrote, "the role write did not finish")
	wait(t, deleted, "the delete did not finish")
	if statusOf(roleResp, roleErr) != 200 {
		t.Fatalf("role write: %d %s", statusOf(roleResp, roleErr), errText(roleResp, roleErr))
	}
	if statusOf(delResp, delErr) != 409 || !strings.Contains(errText(delResp, delErr), "r") || !c.exists(configPrefix+"fin") {
		t.Errorf("a delete racing a role write over the config: %d %s (config stored %v)", statusOf(delResp, delErr), errText(delResp, delErr), c.exists(configPrefix+"fin"))
	}
}

// A role's guard and bounds hold at renew too.
func TestRoleGuardsAndBoundsHoldAtRenew(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/fin", map[string]any{"provider": "fake", "secret": "s1"})
	c.ok(logical.UpdateOperation, "roles/ro", map[string]any{"config": "fin", "require_readonly": true, "ttl": "2m"})
	lease := c.ok(logical.ReadOperation, "creds/ro", nil).Secret
	if lease.TTL > 2*time.Minute {
		t.Errorf("a role with ttl=2m leased for %s", lease.TTL)
	}
	resp, err := c.renewOn(c.b, lease)
	if err != nil || resp.IsError() || resp.Secret.TTL > 2*time.Minute {
		t.Fatalf("renew: %v %v", err, resp)
	}
	lease.InternalData["readonly"] = false // a token that can trade
	if resp, err := c.renewOn(c.b, lease); statusOf(resp, err) != 403 {
		t.Errorf("renew of a trading token under a read-only role: %d %s", statusOf(resp, err), errText(resp, err))
	}
}

// waitTimeout is the bound of a wait that must not happen.
func waitTimeout() <-chan time.Time { return time.After(10 * time.Second) }

// Retire reports when the last token it retired expires, a role's
// narrowed one included, and a renew of a role's lease on a retired token
// sends its holder back to the role's own path.
func TestRetireCoversRoleTokens(t *testing.T) {
	f := alorLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/alor", map[string]any{"provider": "fakenarrow", "secret": "s1"})
	c.ok(logical.UpdateOperation, "roles/d1", map[string]any{"config": "alor", "allowed_accounts": "D1"})
	c.token("creds/alor")
	c.clock.Advance(5 * time.Minute)
	lease := c.ok(logical.ReadOperation, "creds/d1", nil)
	resp := c.ok(logical.UpdateOperation, "config/alor/retire", nil)
	if got, want := resp.Data["issued_tokens_expire_at"], lease.Data["expires_at"]; got != want {
		t.Errorf("retire says issued tokens expire at %v; the role's expires at %v", got, want)
	}
	renewed, err := c.renewOn(c.b, lease.Secret)
	if err != nil || renewed.IsError() || !strings.Contains(strings.Join(renewed.Warnings, " "), "read creds/d1") {
		t.Errorf("renew of a role's retired lease: %v %v", err, renewed)
	}
}
