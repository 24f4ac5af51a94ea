package tinvest_test

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/tinvest"
)

// require_readonly holds only on positive evidence: an account READ_ONLY
// and none FULL_ACCESS (or of a level not known to be read-only). Each
// refusal names why; each pass is checked too, so a guard that refuses
// everything fails here as well.
func TestRequireReadOnlyNeedsEvidence(t *testing.T) {
	cases := []struct {
		name     string
		accounts string
		readOnly bool
		kind     string
		says     string // in the refusal
	}{
		{"no accounts", `{}`, false, tinvest.TokenUnknown, "lists no accounts for this token"},
		{"empty list", `{"accounts":[]}`, false, tinvest.TokenUnknown, "lists no accounts for this token"},
		{"all NO_ACCESS", `{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACCESS_LEVEL_NO_ACCESS"},{"id":"2","accessLevel":3}]}`,
			false, tinvest.TokenUnknown, "every account T-Invest lists for this token (2) shows NO_ACCESS"},
		{"one FULL_ACCESS among READ_ONLY", `{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"},{"id":"2","accessLevel":"ACCOUNT_ACCESS_LEVEL_FULL_ACCESS"}]}`,
			false, tinvest.TokenFullAccess, "2 (FULL_ACCESS)"},
		{"unspecified level beside READ_ONLY", `{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"},{"id":"2"}]}`,
			false, tinvest.TokenFullAccess, "2 (access level not known to be read-only)"},
		{"unknown level", `{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACCESS_LEVEL_SOMETHING_NEW"}]}`,
			false, tinvest.TokenFullAccess, "1 (access level not known to be read-only)"},
		{"limited to one FULL_ACCESS account", `{"accounts":[{"id":"1","accessLevel":1},{"id":"2","accessLevel":3}]}`,
			false, tinvest.TokenAccountLimited, "1 (FULL_ACCESS)"},
		{"read only", `{"accounts":[{"id":"1","accessLevel":"ACCOUNT_ACCESS_LEVEL_READ_ONLY"},{"id":"2","accessLevel":2}]}`,
			true, tinvest.TokenReadOnly, ""},
		{"limited to one READ_ONLY account", `{"accounts":[{"id":"1","accessLevel":2},{"id":"2","accessLevel":"ACCOUNT_ACCESS_LEVEL_NO_ACCESS"}]}`,
			true, tinvest.TokenAccountLimited, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasSuffix(r.URL.Path, "/GetInfo") {
					_, _ = io.WriteString(w, `{"userId":"u1","tariff":"investor"}`)
					return
				}
				_, _ = io.WriteString(w, tc.accounts)
			}))
			defer ts.Close()
			c := newClient(t, 1)
			// Without the guard: the token, with the evidence.
			tok, err := issue(t, c, ts.URL+"/rest", "production", echoed)
			if err != nil {
				t.Fatal(err)
			}
			if tok.ReadOnly != tc.readOnly || tok.Details["token_kind"] != tc.kind {
				t.Errorf("readonly %v kind %v, want %v %s", tok.ReadOnly, tok.Details["token_kind"], tc.readOnly, tc.kind)
			}
			ev, _ := tok.Details["readonly_evidence"].(string)
			if tc.says != "" && !strings.Contains(ev, tc.says) {
				t.Errorf("readonly_evidence %q lacks %q", ev, tc.says)
			}
			// With the guard: refused, saying why, or passed.
			tok, err = tinvest.New().Issue(t.Context(), provider.Request{
				BaseURL: ts.URL + "/rest", Client: c, Secrets: map[string]string{"token": echoed}, RequireReadOnly: true,
			})
			if tc.readOnly {
				if err != nil || tok == nil || !tok.ReadOnly {
					t.Fatalf("a proven read-only token was refused: %v", err)
				}
				return
			}
			if !errors.Is(err, provider.ErrGuard) || tok != nil {
				t.Fatalf("want a guard refusal, got token %v, error %v", tok, err)
			}
			for _, s := range []string{"require_readonly is set but", tc.says, "issue a read-only token in the T-Invest settings"} {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("refusal lacks %q: %v", s, err)
				}
			}
			if strings.Contains(err.Error(), echoed[:len(echoed)/2]) {
				t.Errorf("refusal leaks the token: %v", err)
			}
		})
	}
}
