package tinvest_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// A 2xx body the plugin cannot read is described (type, length), never
// quoted: it may hold a fresh secret the scrubber does not know, and the
// error lands in last_error, logs and config reads.
func TestUnreadableSuccessBodyNotQuoted(t *testing.T) {
	const fresh = "t.FRESH-unknown-secret-0123456789"
	cases := []struct {
		name, ctype, body string
		says              []string
	}{
		{"html", "text/html; charset=utf-8", "<html>session " + fresh + "</html>", []string{"a 54-byte text/html body", "not a JSON object"}},
		{"truncated JSON", "application/json", `{"tariff":"` + fresh, []string{"application/json body", "cut short"}},
		{"wrong type", "application/json", `{"tariff":["` + fresh + `"]}`, []string{"field tariff has the wrong type"}},
		{"malformed", "application/json", `{"tariff":` + fresh + `}`, []string{"malformed JSON at byte"}},
		{"hostile content type", "text/" + fresh, "<p>" + fresh, []string{"unrecognised-type body"}},
		{"no content type", "", fresh, []string{"untyped body"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header()["Content-Type"] = []string{tc.ctype}
				_, _ = io.WriteString(w, tc.body)
			}))
			defer ts.Close()
			_, err := issue(t, newClient(t, 1), ts.URL+"/rest", "production", echoed)
			ue := upstreamErr(t, err, echoed)
			if ue.Failure != upstream.BadResponse {
				t.Errorf("kind %v, want bad response", ue.Failure)
			}
			for _, leak := range []string{"FRESH", "fresh", "session", "<"} {
				if strings.Contains(err.Error(), leak) {
					t.Errorf("error quotes the body (%q): %v", leak, err)
				}
			}
			for _, s := range tc.says {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error lacks %q: %v", s, err)
				}
			}
		})
	}
}
