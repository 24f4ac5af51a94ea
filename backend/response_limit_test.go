package backend

import (
	"net/http"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

// The client the backend builds for a config caps what it reads of a
// broker's answer at 1 MiB (upstream.DefaultMaxBody, the limit the docs
// state): a hostile or broken endpoint cannot make the plugin read without
// bound. upstream's own size test sets a small limit of its own, so only
// this test sees the default the backend actually uses. The limit is
// written out here, not read from the constant, so raising the constant
// fails it too.
func TestBackendClientCapsResponsesAtOneMiB(t *testing.T) {
	const documented = 1 << 20
	cases := []struct {
		name string
		size int
		want string // "" = accepted
	}{
		{"exactly the limit", documented, ""},
		{"one byte over", documented + 1, "larger than 1048576 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := newCountingServer(t, func(w http.ResponseWriter, _ *http.Request) {
				w.Write([]byte(strings.Repeat("x", tc.size)))
			})
			b, s := newProbeBackend(t, map[string]string{"production": srv.URL})
			resp, err := request(b, s, logical.UpdateOperation, "config/x", map[string]any{
				"provider": "probe", "secret": "probe-LongLived-Secret-4Kq8", "ca_cert": srv.caPEM()})
			msg := errText(resp, err)
			if srv.requests.Load() == 0 {
				t.Fatal("the write never reached the endpoint")
			}
			switch {
			case tc.want == "" && msg != "":
				t.Fatalf("a %d-byte answer was refused: %s", tc.size, msg)
			case tc.want != "" && !strings.Contains(msg, tc.want):
				t.Fatalf("a %d-byte answer: got %q, want an error saying %q", tc.size, msg, tc.want)
			}
		})
	}
}
