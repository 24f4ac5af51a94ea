package finam

import (
	"context"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// TestIssueStampsTheTokenByTheRequestClock: a token's life is measured on
// the clock the backend gives (Request.Now), not the host's: a backend
// clock behind the broker's gets a token issued at its own now.
func TestIssueStampsTheTokenByTheRequestClock(t *testing.T) {
	srv := httptest.NewServer(sandbox.New(sandbox.Options{FinamTokenLifetime: 10 * time.Minute}))
	defer srv.Close()
	behind := time.Now().Add(-time.Hour).Truncate(time.Second)
	req := request(t, srv.URL, sandbox.FinamSecret)
	req.Now = func() time.Time { return behind }
	tok, err := New().Issue(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if !tok.IssuedAt.Equal(behind) || !tok.ExpiresAt.Equal(behind.Add(10*time.Minute)) {
		t.Fatalf("token stamped %v..%v, want %v..%v", tok.IssuedAt, tok.ExpiresAt, behind, behind.Add(10*time.Minute))
	}
}
