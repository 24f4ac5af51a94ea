package backend

import (
	"fmt"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// A reader that is waiting on a mint when a retire lands does not get that
// mint's token: it was obtained before the retire (its epoch is older), so
// the reader waits for the next one. The record never holds that token
// (finishRefresh keeps it out), so only the epoch check in servable stands
// between the waiting reader and a pre-retire token.
func TestReaderWaitingOnARetiredMintGetsTheNextToken(t *testing.T) {
	f := finamLike()
	c := newFakeHarness(t, f)
	// No token yet: the read below waits on the mint it starts.
	c.ok(logical.UpdateOperation, "config/x", map[string]any{"provider": "fake", "secret": "s1", "verify": false})

	entered, release := f.holdNext()
	defer release()
	got := make(chan string, 1)
	go func() {
		resp, err := c.do(logical.ReadOperation, "creds/x", nil)
		if msg := errText(resp, err); msg != "" {
			got <- "error: " + msg
			return
		}
		got <- resp.Data["access_token"].(string)
	}()
	waitFor(t, entered, "the cold read's mint never reached the broker")
	retired := fmt.Sprintf("fake-token-%d", f.callCount()) // what the held mint returns
	c.ok(logical.UpdateOperation, "config/x/retire", nil)
	release()
	tok := waitFor(t, got, "the read waiting on the retired mint never returned")
	if tok == retired {
		t.Fatalf("a reader waiting on a mint got its token although a retire landed during it (%q)", tok)
	}
	if f.secretOf[tok] != "s1" {
		t.Fatalf("the waiting reader got %q, want the next token", tok)
	}
}
