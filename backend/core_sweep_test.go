package backend

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// A sweep of concurrent writes, deletes, re-creates, reads, renews, retires,
// rotations and ticks over configs of every issuance kind. Whatever the
// interleaving, it must end with storage and memory agreeing, no config
// without its record nor record without its config, and no rotated secret
// lost (each rotating fake counts refresh tokens presented after it retired
// them). Bounded: a fixed number of operations, every wait bounded.
func TestConcurrentOperationsKeepStorageAndMemoryConsistent(t *testing.T) {
	minted := newFakeBroker("fake", provider.Minted, false, nil)
	pass := newFakeBroker("fakepass", provider.Passthrough, false, nil)
	rot1 := newFakeBroker("rot1", provider.Minted, true, nil)
	rot2 := newFakeBroker("rot2", provider.Minted, true, nil)
	c := newFakeHarness(t, minted, pass, rot1, rot2)
	configs := map[string]string{"m1": "fake", "m2": "fake", "p1": "fakepass", "r1": "rot1", "r2": "rot2"}
	names := []string{"m1", "m2", "p1", "r1", "r2"}

	var seedMu sync.Mutex
	seed := 0
	create := func(name string) (*logical.Response, error) {
		seedMu.Lock()
		seed++
		n := seed
		seedMu.Unlock()
		data := map[string]any{"provider": configs[name], "secret": fmt.Sprintf("s-%d", n)}
		if c.brokers[configs[name]].rotating {
			data["refresh_token"] = fmt.Sprintf("seed-%d", n)
		}
		return c.do(logical.UpdateOperation, "config/"+name, data)
	}
	for _, name := range names {
		if resp, err := create(name); err != nil || resp.IsError() {
			t.Fatalf("create %s: %v %v", name, err, resp)
		}
	}

	ops := []func(r *rand.Rand, name string){
		func(_ *rand.Rand, name string) { c.do(logical.ReadOperation, "creds/"+name, nil) },
		func(_ *rand.Rand, name string) {
			resp, err := c.do(logical.ReadOperation, "creds/"+name, nil)
			if err != nil || resp == nil || resp.Secret == nil {
				return
			}
			sec := *resp.Secret
			sec.IssueTime = c.clock.Now()
			c.b.HandleRequest(context.Background(), &logical.Request{Operation: logical.RenewOperation, Storage: c.storage, Secret: &sec})
		},
		func(r *rand.Rand, name string) {
			c.do(logical.UpdateOperation, "config/"+name, map[string]any{"ttl": fmt.Sprintf("%dm", 5+r.IntN(10))})
		},
		func(_ *rand.Rand, name string) { c.do(logical.DeleteOperation, "config/"+name, nil) },
		func(_ *rand.Rand, name string) { create(name) },
		func(_ *rand.Rand, name string) { c.do(logical.UpdateOperation, "config/"+name+"/retire", nil) },
		func(_ *rand.Rand, name string) { c.do(logical.UpdateOperation, "rotate-root/"+name, nil) },
		func(_ *rand.Rand, name string) { c.do(logical.ReadOperation, "config/"+name, nil) },
		func(_ *rand.Rand, _ string) {
			c.b.periodicFunc(context.Background(), &logical.Request{Storage: c.storage})
		},
		func(r *rand.Rand, _ string) { c.clock.Advance(time.Duration(r.IntN(90)) * time.Second) },
	}
	const workers, perWorker = 6, 80
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 42))
			for range perWorker {
				ops[r.IntN(len(ops))](r, names[r.IntN(len(names))])
			}
		}()
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	wait(t, finished, "the sweep's operations did not finish")
	// Background refreshes hold their state until they return.
	idle := make(chan struct{})
	go func() { c.b.wg.Wait(); close(idle) }()
	wait(t, idle, "background refreshes did not finish")

	for _, name := range names {
		cfgStored, recStored := c.exists(configPrefix+name), c.exists(tokenPrefix+name)
		if cfgStored != recStored {
			t.Errorf("%s: config stored %v, token record stored %v", name, cfgStored, recStored)
		}
		c.b.mu.RLock()
		st := c.b.states[name]
		c.b.mu.RUnlock()
		if st != nil {
			st.mu.Lock()
			loaded, memCfg, memRec, unstored := st.loaded, st.cfg, st.rec, st.unstored
			st.mu.Unlock()
			if loaded && (memCfg != nil) != cfgStored {
				t.Errorf("%s: memory holds a config %v, storage %v", name, memCfg != nil, cfgStored)
			}
			if loaded && memCfg != nil {
				if stored := c.storedConfig(name); stored.upstreamHash() != memCfg.upstreamHash() || stored.TTL != memCfg.TTL {
					t.Errorf("%s: memory's config differs from storage's", name)
				}
				rec, _ := c.stored(name)
				if rec.Token.idOrEmpty() != memRec.Token.idOrEmpty() || rec.Rotated["refresh_token"] != memRec.Rotated["refresh_token"] || rec.RetireEpoch != memRec.RetireEpoch {
					t.Errorf("%s: memory's record differs from storage's (token %q/%q, rotated %q/%q, epoch %d/%d)", name,
						memRec.Token.idOrEmpty(), rec.Token.idOrEmpty(), memRec.Rotated["refresh_token"], rec.Rotated["refresh_token"], memRec.RetireEpoch, rec.RetireEpoch)
				}
			}
			if unstored {
				t.Errorf("%s: a rotation is held in memory only, with storage healthy", name)
			}
		}
		if f := c.brokers[configs[name]]; f.rotating && cfgStored {
			rec, _ := c.stored(name)
			f.mu.Lock()
			current := f.refresh
			f.mu.Unlock()
			if got := effectiveSecrets(c.storedConfig(name), rec.boundTo(c.storedConfig(name)))["refresh_token"]; got != current && rec.Token != nil {
				t.Errorf("%s: storage would present %q, the broker's current refresh token is %q", name, got, current)
			}
		}
	}
	for _, f := range []*fakeBroker{rot1, rot2} {
		if f.refused != 0 {
			t.Errorf("%s: %d refresh tokens presented after the broker retired them (rotations lost)", f.name, f.refused)
		}
	}

	// Deleting everything leaves nothing: no record, no served token, no
	// state.
	for _, name := range names {
		c.ok(logical.DeleteOperation, "config/"+name, nil)
		if resp, err := c.do(logical.ReadOperation, "creds/"+name, nil); err == nil && !resp.IsError() {
			t.Errorf("%s: served %q after its delete", name, resp.Data["access_token"])
		}
	}
	if keys, _ := c.raw.List(context.Background(), tokenPrefix); len(keys) != 0 {
		t.Errorf("token records left after every config was deleted: %v", keys)
	}
	idle = make(chan struct{})
	go func() { c.b.wg.Wait(); close(idle) }()
	wait(t, idle, "background refreshes did not finish")
	c.b.mu.RLock()
	left := len(c.b.states)
	c.b.mu.RUnlock()
	if left != 0 {
		t.Errorf("%d states left in memory after every config was deleted", left)
	}
}

func (t *storedToken) idOrEmpty() string {
	if t == nil {
		return ""
	}
	return t.ID
}
