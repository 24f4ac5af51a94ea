package backend

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

func TestFailureStatus(t *testing.T) {
	upstreamErr := func(k upstream.Failure) error {
		return fmt.Errorf("minting: %w", &upstream.Error{Broker: "Finam", Op: "POST /v1/sessions", Failure: k})
	}
	tests := []struct {
		name string
		err  error
		// want is the status at verifying, issuing and renewing.
		want [3]int
	}{
		{"guard", fmt.Errorf("%w: require_readonly", provider.ErrGuard), [3]int{400, 403, 403}},
		{"declared expiry passed", fmt.Errorf("%w: 2027-01-31", errSecretExpired), [3]int{400, 400, 400}},
		{"quota spent", fmt.Errorf("%w: 90 of 100", quotaSpentError{"tokens.make"}), [3]int{429, 429, 429}},
		{"broker rate limit", upstreamErr(upstream.RateLimited), [3]int{429, 429, 429}},
		{"secret refused", upstreamErr(upstream.Unauthorized), [3]int{400, 502, 400}},
		{"other 4xx", upstreamErr(upstream.Rejected), [3]int{400, 502, 502}},
		{"broker down", upstreamErr(upstream.Unavailable), [3]int{502, 502, 502}},
		{"unreadable answer", upstreamErr(upstream.BadResponse), [3]int{502, 502, 502}},
		{"anything else", fmt.Errorf("storage: boom"), [3]int{502, 502, 502}},
	}
	for _, tt := range tests {
		for i, at := range []callSite{verifying, issuing, renewing} {
			if got := failureStatus(at, tt.err); got != tt.want[i] {
				t.Errorf("%s at %d: status %d, want %d", tt.name, at, got, tt.want[i])
			}
		}
	}
}

func TestFailedAnswersInputErrorsAsResponses(t *testing.T) {
	refused := fmt.Errorf("%w: require_readonly", provider.ErrGuard)
	resp, err := failed(verifying, "guard; nothing was stored", refused)
	if err != nil || resp == nil || !resp.IsError() {
		t.Fatalf("a config write's 400 should be an error response: %v %v", resp, err)
	}
	resp, err = failed(issuing, "config \"x\": guard", refused)
	if resp != nil {
		t.Fatalf("a creds failure should be a coded error, got a response %v", resp)
	}
	if code := statusOf(resp, err); code != http.StatusForbidden {
		t.Fatalf("status %d, want 403: %v", code, err)
	}
}
