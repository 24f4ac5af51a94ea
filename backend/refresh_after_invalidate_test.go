package backend

import (
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// A refresh holds its config's upstream lock from start to install, but an
// invalidation does not take that lock: another node's config write reaches
// this node as an Invalidate (forgetName), and the next read loads the new
// config, while a refresh started under the old one is still at the broker.
// Only the generation tells that refresh's answer, obtained with the old
// secret, from one of the config memory now holds; it must not be installed
// nor handed out.
func TestRefreshStartedBeforeAnInvalidationIsNotInstalled(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1"})
	other := c.newBackend(nil) // the node under test
	secretOf := func(tok string) string {
		f.mu.Lock()
		defer f.mu.Unlock()
		return f.secretOf[tok]
	}
	readOther := func() string {
		t.Helper()
		resp, err := c.doOn(other, logical.ReadOperation, "creds/x", nil)
		if msg := errText(resp, err); msg != "" {
			t.Fatalf("creds/x on the second node: %s", msg)
		}
		return resp.Data["access_token"].(string)
	}
	if got := secretOf(readOther()); got != "s1" {
		t.Fatalf("the second node served a token of %q, want s1", got)
	}

	// The token dies: the second node's next read waits on a refresh, held
	// at the broker with the old secret.
	c.clock.Advance(20 * time.Minute)
	entered, release := f.holdNext()
	defer release()
	type result struct {
		tok string
		err string
	}
	got := make(chan result, 1)
	go func() {
		resp, err := c.doOn(other, logical.ReadOperation, "creds/x", nil)
		if msg := errText(resp, err); msg != "" {
			got <- result{err: msg}
			return
		}
		got <- result{tok: resp.Data["access_token"].(string)}
	}()
	waitFor(t, entered, "the second node's refresh never reached the broker")

	// The first node writes a new secret; the second is told, and its next
	// read loads the new config (and the first node's token of it).
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"secret": "s2"})
	other.InvalidateKey(t.Context(), configPrefix+"x")
	if s := secretOf(readOther()); s != "s2" {
		t.Fatalf("after the invalidation the second node served a token of %q, want s2", s)
	}

	// The fake names a token by its call count at answer time: one more call
	// (another config's) keeps the held answer from taking the name of the
	// first node's token.
	c.ok(logical.UpdateOperation, "config/y", map[string]any{"provider": "fake", "secret": "other"})
	release() // the old refresh answers, with a token of s1
	r := waitFor(t, got, "the read waiting on the held refresh never returned")
	if r.err != "" {
		t.Fatalf("the read waiting on the held refresh failed: %s", r.err)
	}
	if s := secretOf(r.tok); s != "s2" {
		t.Errorf("the read that waited on a refresh started before the invalidation got a token of %q, want s2 (the config's secret now)", s)
	}
	waitIdle(t, other, "x")
	if s := secretOf(readOther()); s != "s2" {
		t.Errorf("after the old refresh finished the second node serves a token of %q, want s2: a refresh under the old config was installed under the new one", s)
	}
	if rec, _ := c.stored("x"); rec.Token == nil || secretOf(rec.Token.AccessToken) != "s2" {
		t.Errorf("storage holds %+v as x's token, want the first node's token of s2", rec.Token)
	}
}
