package e2e

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// sandboxConfigs are one config per provider against the sandbox, named as
// the docs name them. TestDocsSandboxConfigsCoverTheRegistry keeps them one per
// registered provider.
var sandboxConfigs = []struct {
	name, provider string
	args           func(sbURL string) []string
}{
	{"tbank", "tinvest", func(u string) []string {
		return []string{"token=" + sandbox.TInvestReadOnlyToken, "base_url=" + u + sandbox.TInvestPrefix, "require_readonly=true"}
	}},
	{"alor", "alor", func(u string) []string {
		return []string{"refresh_token=" + sandbox.AlorRefreshToken, "base_url=" + u, "allowed_accounts=D12345"}
	}},
	{"chat", "chatapp", func(u string) []string {
		return []string{"email=" + sandbox.ChatAppEmail, "password=" + sandbox.ChatAppPassword, "app_id=" + sandbox.ChatAppAppID, "base_url=" + u}
	}},
	{"finam", "finam", func(u string) []string {
		return []string{"secret=" + sandbox.FinamSecret, "base_url=" + u}
	}},
	{"bcs", "bcs", func(u string) []string {
		return []string{"refresh_token=" + sandbox.BCSToken(sandbox.BCSTokenOptions{ReadOnly: true}), "base_url=" + u,
			"require_readonly=true", "allowed_accounts=" + sandbox.BCSAgreement}
	}},
}

// TestDocsSandboxConfigsCoverTheRegistry fails when a provider is registered
// that the docs and OpenAPI checks would not exercise (or one is listed
// that is not registered).
func TestDocsSandboxConfigsCoverTheRegistry(t *testing.T) {
	var got []string
	for _, c := range sandboxConfigs {
		got = append(got, c.provider)
	}
	sort.Strings(got)
	want := backend.ProviderNames()
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("sandboxConfigs cover %v; the registry has %v: add a sandbox config (and a sandbox double) for each provider", got, want)
	}
}

// writeSandboxConfigs writes one config per provider (each verified, so each holds
// a token).
func (e *env) writeSandboxConfigs() {
	e.t.Helper()
	for _, c := range sandboxConfigs {
		e.cli(append([]string{"write", "broker/config/" + c.name, "provider=" + c.provider}, c.args(e.sbURL)...)...)
	}
}

func readDoc(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(vaulttest.RepoRoot(), "docs", name))
	if err != nil {
		t.Fatalf("docs/%s: %v", name, err)
	}
	return string(b)
}

// allDocs is every docs/*.md and README.md, concatenated.
func allDocs(t *testing.T) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(vaulttest.RepoRoot(), "docs", "*.md"))
	files = append(files, filepath.Join(vaulttest.RepoRoot(), "README.md"))
	var b strings.Builder
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(data)
		b.WriteString("\n")
	}
	return b.String()
}

// tableFields is every `name` that appears in a Markdown table row.
func tableFields(md string) map[string]bool {
	out := map[string]bool{}
	code := regexp.MustCompile("`([^`]+)`")
	for _, line := range strings.Split(md, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "|") {
			continue
		}
		for _, m := range code.FindAllStringSubmatch(line, -1) {
			out[m[1]] = true
		}
	}
	return out
}

func undocumented(names []string, documented func(string) bool) []string {
	var out []string
	for _, n := range names {
		if !documented(n) {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}

// TestDocsCoverEveryField fails when the plugin has a field the docs do not
// describe: every config field Vault's OpenAPI document lists, every key a
// config read and a creds read return for each provider (against the
// sandbox), every response field of rotate-root and retire, and every path
// of the mount.
func TestDocsCoverEveryField(t *testing.T) {
	e := start(t, sandbox.Options{})
	e.writeSandboxConfigs()
	confDoc := readDoc(t, "configuration.md")
	table := tableFields(confDoc)
	inTable := func(f string) bool { return table[f] }
	docs := allDocs(t)

	t.Run("config fields are in configuration.md", func(t *testing.T) {
		doc := openAPIDoc(t, e.vault)
		props, _ := requestProperties(t, doc, asObj(digJSON(doc, "paths", "/broker/config/{name}", "post")))
		if miss := undocumented(slices.Sorted(maps.Keys(props)), inTable); len(miss) > 0 {
			t.Errorf("config fields with no row in docs/configuration.md: %v", miss)
		}
	})

	t.Run("creds fields of every provider are in configuration.md", func(t *testing.T) {
		for _, c := range sandboxConfigs {
			var cred secretResponse
			e.cliJSON(&cred, "read", "-format=json", "broker/creds/"+c.name)
			if len(cred.Data) == 0 {
				t.Fatalf("%s creds returned no data", c.provider)
			}
			if miss := undocumented(slices.Sorted(maps.Keys(cred.Data)), inTable); len(miss) > 0 {
				t.Errorf("%s creds return fields with no row in docs/configuration.md: %v", c.provider, miss)
			}
		}
	})

	t.Run("config read fields of every provider are in configuration.md", func(t *testing.T) {
		for _, c := range sandboxConfigs {
			var out secretResponse
			e.cliJSON(&out, "read", "-format=json", "broker/config/"+c.name)
			// <secret field>_set is documented once, as `<field>_set`.
			documented := func(k string) bool {
				if f, ok := strings.CutSuffix(k, "_set"); ok && configFields[f].secret {
					return table[k] || strings.Contains(confDoc, "`<field>_set")
				}
				return table[k]
			}
			if miss := undocumented(slices.Sorted(maps.Keys(out.Data)), documented); len(miss) > 0 {
				t.Errorf("a %s config read returns fields with no row in docs/configuration.md: %v", c.provider, miss)
			}
		}
	})

	t.Run("rotate-root, retire and settings fields are documented", func(t *testing.T) {
		var fields []string
		var rot, ret, set secretResponse
		e.cliJSON(&rot, "write", "-format=json", "-f", "broker/rotate-root/chat")
		e.cliJSON(&ret, "write", "-format=json", "-f", "broker/config/finam/retire")
		e.cliJSON(&set, "read", "-format=json", "broker/settings")
		for _, r := range []secretResponse{rot, ret, set} {
			if len(r.Data) == 0 {
				t.Fatalf("empty response: %+v", r)
			}
			fields = append(fields, slices.Sorted(maps.Keys(r.Data))...)
		}
		if miss := undocumented(fields, func(f string) bool { return strings.Contains(docs, "`"+f+"`") }); len(miss) > 0 {
			t.Errorf("response fields not named (as `field`) anywhere in docs/ or README.md: %v", miss)
		}
	})

	t.Run("every path of the mount is documented", func(t *testing.T) {
		doc := openAPIDoc(t, e.vault)
		var paths []string
		for p := range asObj(doc["paths"]) {
			if strings.HasPrefix(p, "/broker/") {
				p = strings.TrimSuffix(strings.TrimPrefix(p, "/"), "/")
				paths = append(paths, strings.ReplaceAll(p, "{name}", "<name>"))
			}
		}
		if len(paths) == 0 {
			t.Fatal("no /broker/ paths in the OpenAPI document")
		}
		if miss := undocumented(paths, func(p string) bool { return strings.Contains(docs, p) }); len(miss) > 0 {
			t.Errorf("paths not mentioned anywhere in docs/ or README.md: %v", miss)
		}
	})
}

// messagePatterns find the user-facing message texts in the backend's
// source: field errors, error responses, coded errors, broker hints and
// errors the backend wraps into responses.
var messagePatterns = []*regexp.Regexp{
	regexp.MustCompile(`badField\([^,]+,\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`logical\.ErrorResponse\(\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`logical\.CodedError\([^,]+,\s*fmt\.Sprintf\(\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`failed\(\w+,\s*fmt\.Sprintf\(\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`AddWarning\(\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`(?:Hint|hint\w*|authHint)\s*=\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`(?:fmt\.Errorf|errors\.New)\(\s*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`badResponse\([^"]*"((?:[^"\\]|\\.)*)"`),
	regexp.MustCompile(`Message:\s*"((?:[^"\\]|\\.)*)"`),
}

var formatVerb = regexp.MustCompile(`%[-+# 0-9.]*[a-zA-Z]|\\n|\\t`)

// messageKey is what the docs must contain of a message: its longest
// literal run between format verbs, cut to 40 characters (hints are quoted
// in part), or "" when the message is all placeholders.
func messageKey(format string) string {
	format = strings.ReplaceAll(format, `\"`, `"`)
	best := ""
	for _, seg := range formatVerb.Split(format, -1) {
		if seg = strings.TrimSpace(seg); len(seg) > len(best) {
			best = seg
		}
	}
	if len(best) < 8 {
		return ""
	}
	if len(best) > 40 {
		best = best[:40]
	}
	return best
}

// TestDocsTroubleshootingCoversEveryMessage fails when the plugin gains a
// message that docs/troubleshooting.md does not explain.
func TestDocsTroubleshootingCoversEveryMessage(t *testing.T) {
	doc := readDoc(t, "troubleshooting.md")
	root := filepath.Join(vaulttest.RepoRoot(), "backend")
	files, _ := filepath.Glob(filepath.Join(root, "*.go"))
	more, _ := filepath.Glob(filepath.Join(root, "*", "*.go"))
	files = append(files, more...)
	var missing []string
	seen := map[string]bool{}
	n := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, re := range messagePatterns {
			for _, m := range re.FindAllStringSubmatch(string(src), -1) {
				key := messageKey(m[1])
				if key == "" || seen[key] {
					continue
				}
				seen[key] = true
				n++
				if !strings.Contains(doc, key) {
					rel, _ := filepath.Rel(root, f)
					missing = append(missing, fmt.Sprintf("%s: %q", rel, m[1]))
				}
			}
		}
	}
	t.Logf("%d distinct messages checked", n)
	if n < 50 {
		t.Fatalf("found only %d messages in backend/: the patterns no longer match the code", n)
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("%d message(s) not explained in docs/troubleshooting.md:\n  %s", len(missing), strings.Join(missing, "\n  "))
	}
}
