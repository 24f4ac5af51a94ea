package backend

import (
	"maps"
	"net/http"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// A stored secret goes only to the endpoint it was written with: an update
// that changes base_url, ca_cert or environment without the secret fields is
// a 400 naming the secret field, sends nothing anywhere and stores nothing.
// One row per field, each changing that field alone: the check must ask
// for the secret when any one of them changes, not only when all do. The
// config-write fuzz target always sends the secrets, so it never gets here.
func TestConfigEndpointChangeNeedsTheSecret(t *testing.T) {
	const secret = "probe-LongLived-Secret-4Kq8"
	old := newCountingServer(t, nil)
	moved := newCountingServer(t, nil)
	other := selfSignedPEM(t)
	envs := map[string]string{"production": old.URL, "staging": moved.URL}
	cases := []struct {
		field   string
		initial map[string]any // besides provider, secret and ca_cert
		change  map[string]any
		to      *countingServer // where the changed config points
	}{
		{"base_url", map[string]any{"base_url": old.URL}, map[string]any{"base_url": moved.URL}, moved},
		// The new bundle still trusts the endpoint: with the check gone the
		// write would verify there, and the counting server would see it.
		{"ca_cert", map[string]any{"base_url": old.URL}, map[string]any{"ca_cert": old.caPEM() + other}, old},
		{"environment", map[string]any{"environment": "production"}, map[string]any{"environment": "staging"}, moved},
	}
	for _, tc := range cases {
		t.Run(tc.field, func(t *testing.T) {
			b, s := newProbeBackend(t, envs)
			data := map[string]any{"provider": "probe", "secret": secret, "ca_cert": old.caPEM()}
			maps.Copy(data, tc.initial)
			if resp, err := request(b, s, logical.UpdateOperation, "config/x", data); errText(resp, err) != "" {
				t.Fatalf("initial write: %s", errText(resp, err))
			}
			before := snapshot(t, s)
			at := map[*countingServer]int{old: old.reached(), moved: moved.reached()}

			resp, err := request(b, s, logical.UpdateOperation, "config/x", tc.change)
			msg := errText(resp, err)
			if got := statusOf(resp, err); got != http.StatusBadRequest {
				t.Errorf("changing %s without the secret: status %d (%q), want 400", tc.field, got, msg)
			}
			if !strings.HasPrefix(msg, "secret: ") || !strings.Contains(msg, "(secret)") {
				t.Errorf("the refusal does not name the secret field: %q", msg)
			}
			if strings.Contains(msg, secret) {
				t.Error("the refusal shows the secret")
			}
			for cs, n := range at {
				if got := cs.reached(); got != n {
					t.Errorf("the refused write reached %s (%d connections and requests)", cs.URL, got-n)
				}
			}
			if after := snapshot(t, s); !maps.Equal(before, after) {
				t.Errorf("the refused write changed storage:\nbefore %v\nafter  %v", before, after)
			}

			// The same change with the secret again is what the message asks
			// for: it verifies at the new endpoint and is stored.
			with := maps.Clone(tc.change)
			with["secret"] = secret
			n := tc.to.requests.Load()
			if resp, err := request(b, s, logical.UpdateOperation, "config/x", with); errText(resp, err) != "" {
				t.Fatalf("the change with the secret: %s", errText(resp, err))
			}
			if tc.to.requests.Load() != n+1 {
				t.Errorf("the change with the secret did not verify at the new endpoint (%d requests)", tc.to.requests.Load()-n)
			}
			read, err := request(b, s, logical.ReadOperation, "config/x", nil)
			if errText(read, err) != "" || read == nil {
				t.Fatalf("config read after the change: %v %v", read, err)
			}
			if got := read.Data[tc.field]; strings.TrimSpace(got.(string)) != strings.TrimSpace(tc.change[tc.field].(string)) {
				t.Errorf("stored %s = %v, want %v", tc.field, got, tc.change[tc.field])
			}
		})
	}
}
