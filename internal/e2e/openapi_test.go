package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// configFields is the public field list of config/<name>, as
// docs/configuration.md documents it. A field added to the plugin must be
// added here (and documented); a field removed breaks the public API. Which
// providers a field's description must name comes from the registry
// (fieldProviders).
var configFields = map[string]struct {
	secret bool
	// option: the Spec property that makes the option apply to a provider.
	option func(provider.Spec) bool
}{
	"provider":                 {},
	"environment":              {},
	"base_url":                 {},
	"ca_cert":                  {},
	"secret":                   {secret: true},
	"token":                    {secret: true},
	"refresh_token":            {secret: true},
	"email":                    {secret: true},
	"password":                 {secret: true},
	"app_id":                   {secret: true},
	"ttl":                      {},
	"max_ttl":                  {},
	"require_readonly":         {},
	"allowed_accounts":         {},
	"verify":                   {},
	"keep_alive":               {option: func(s provider.Spec) bool { return s.Issuance == provider.Passthrough }},
	"validation_interval":      {option: func(s provider.Spec) bool { return s.Issuance == provider.Passthrough }},
	"refresh_token_expires_at": {option: func(s provider.Spec) bool { return s.DeclaredExpiry }},
	"expiry_warning":           {option: func(s provider.Spec) bool { return s.DeclaredExpiry || s.SecretExpiry != nil }},
	"make_budget":              {option: func(s provider.Spec) bool { return s.Quota != nil }},
	"rotation_fraction":        {option: func(s provider.Spec) bool { return s.RotatesSecret && s.SecretExpiry == nil }},
}

// fieldProviders are the registered providers a config field's description
// must name: those whose Spec lists the field, or that the option applies to.
func fieldProviders(field string) []string {
	var out []string
	for _, s := range backend.ProviderSpecs() {
		applies := configFields[field].option != nil && configFields[field].option(s)
		for _, f := range s.Fields {
			applies = applies || f.Name == field
		}
		if applies {
			out = append(out, s.Name)
		}
	}
	return out
}

// mountPaths are the plugin's paths under broker/ with the operations each
// must offer ("list" is a GET with list=true).
var mountPaths = map[string][]string{
	"/broker/config/":              {"list"},
	"/broker/config/{name}":        {"get", "post", "delete"},
	"/broker/creds/{name}":         {"get"},
	"/broker/rotate-root/{name}":   {"post"},
	"/broker/config/{name}/retire": {"post"},
	"/broker/settings":             {"get", "post"},
}

// openAPIDoc fetches Vault's merged OpenAPI document.
func openAPIDoc(t *testing.T, v *vaulttest.Vault) map[string]any {
	t.Helper()
	req, err := http.NewRequest("GET", v.Addr+"/v1/sys/internal/specs/openapi", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Vault-Token", v.Token)
	resp, err := (&http.Client{Timeout: 60 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET sys/internal/specs/openapi: HTTP %d %v\n%.500s", resp.StatusCode, err, b)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("OpenAPI document is not JSON: %v", err)
	}
	return doc
}

func asObj(v any) map[string]any { m, _ := v.(map[string]any); return m }

// dig follows keys through nested objects.
func digJSON(v any, keys ...string) any {
	for _, k := range keys {
		v = asObj(v)[k]
	}
	return v
}

// requestProperties returns the properties of an operation's JSON request
// body, following a $ref into components/schemas. Vault drops the $ref of
// external plugins when it merges their documents (hashicorp/vault#30714:
// mapstructure does not map "$ref" onto OASSchema.Ref), leaving an empty
// schema; the component itself survives under Vault's naming convention
// (the operationId in CamelCase + "Request"), so the test finds it there and
// says which way it went.
func requestProperties(t *testing.T, doc map[string]any, op map[string]any) (map[string]any, string) {
	t.Helper()
	schema := asObj(digJSON(op, "requestBody", "content", "application/json", "schema"))
	how := "inline"
	if ref, _ := schema["$ref"].(string); ref != "" {
		schema = asObj(digJSON(doc, "components", "schemas", strings.TrimPrefix(ref, "#/components/schemas/")))
		how = "$ref"
	} else if len(asObj(schema["properties"])) == 0 {
		name := camel(op["operationId"].(string)) + "Request"
		schema = asObj(digJSON(doc, "components", "schemas", name))
		how = "components/schemas/" + name + " (the $ref was dropped: hashicorp/vault#30714)"
	}
	props := asObj(schema["properties"])
	if len(props) == 0 {
		t.Fatalf("operation %v has no request properties (schema %v)", op["operationId"], schema)
	}
	return props, how
}

func camel(id string) string {
	var b strings.Builder
	for _, w := range strings.Split(id, "-") {
		if w != "" {
			b.WriteString(strings.ToUpper(w[:1]) + w[1:])
		}
	}
	return b.String()
}

// TestOpenAPIDescribesEveryPathAndField checks what API explorers, client
// generators and `vault path-help` show: every path with its operations,
// every config field with a description naming the providers it applies to,
// and help text that explains each provider's fields.
func TestOpenAPIDescribesEveryPathAndField(t *testing.T) {
	e := start(t, sandbox.Options{})
	doc := openAPIDoc(t, e.vault)
	paths := asObj(doc["paths"])

	t.Run("every path and operation is listed with a description", func(t *testing.T) {
		for p, ops := range mountPaths {
			item := asObj(paths[p])
			if item == nil {
				t.Errorf("%s is not in the OpenAPI document", p)
				continue
			}
			if s, _ := item["description"].(string); strings.TrimSpace(s) == "" {
				t.Errorf("%s has no description", p)
			}
			for _, param := range asJSONList(item["parameters"]) {
				if d, _ := asObj(param)["description"].(string); strings.TrimSpace(d) == "" {
					t.Errorf("%s: parameter %v has no description", p, asObj(param)["name"])
				}
			}
			for _, want := range ops {
				method := want
				if want == "list" {
					method = "get"
				}
				op := asObj(item[method])
				if op == nil {
					t.Errorf("%s has no %s operation", p, want)
					continue
				}
				if s, _ := op["summary"].(string); strings.TrimSpace(s) == "" {
					t.Errorf("%s %s has no summary", p, want)
				}
				if want == "list" {
					found := false
					for _, param := range asJSONList(op["parameters"]) {
						found = found || asObj(param)["name"] == "list"
					}
					if !found {
						t.Errorf("%s: GET is not the list operation (no list parameter)", p)
					}
				}
			}
		}
		if asObj(paths["/broker/config/{name}"])["x-vault-createSupported"] != true {
			t.Error("/broker/config/{name} does not advertise create (ExistenceCheck)")
		}
		// Any other path of the mount must be described too.
		for p, v := range paths {
			if !strings.HasPrefix(p, "/broker/") {
				continue
			}
			if s, _ := asObj(v)["description"].(string); strings.TrimSpace(s) == "" {
				t.Errorf("%s has no description", p)
			}
			for _, m := range []string{"get", "post", "delete"} {
				if op := asObj(asObj(v)[m]); op != nil {
					if s, _ := op["summary"].(string); strings.TrimSpace(s) == "" {
						t.Errorf("%s %s has no summary", p, m)
					}
				}
			}
		}
	})

	t.Run("every config field is in the document with a description", func(t *testing.T) {
		props, how := requestProperties(t, doc, asObj(digJSON(paths, "/broker/config/{name}", "post")))
		t.Logf("config fields found via %s: %s", how, strings.Join(slices.Sorted(maps.Keys(props)), ", "))
		for name, f := range configFields {
			p := asObj(props[name])
			if p == nil {
				t.Errorf("field %s is missing from the OpenAPI document", name)
				continue
			}
			desc, _ := p["description"].(string)
			if len(strings.TrimSpace(desc)) < 15 {
				t.Errorf("field %s: description %q says too little", name, desc)
			}
			for _, prov := range fieldProviders(name) {
				if !strings.Contains(strings.ToLower(desc), prov) {
					t.Errorf("field %s applies to %s, but its description does not say so: %q", name, prov, desc)
				}
			}
			sensitive := digJSON(p, "x-vault-displayAttrs", "sensitive") == true
			if f.secret != sensitive {
				t.Errorf("field %s: sensitive=%v in OpenAPI, want %v", name, sensitive, f.secret)
			}
		}
		for name := range props {
			if _, ok := configFields[name]; !ok {
				t.Errorf("field %s is in the OpenAPI document but not in the public field list (docs/configuration.md): document it and add it to configFields", name)
			}
		}
		// Types a client generator relies on.
		for name, want := range map[string]string{"ttl": "string/duration", "max_ttl": "string/duration", "require_readonly": "boolean/", "verify": "boolean/", "allowed_accounts": "array/", "make_budget": "integer/", "rotation_fraction": "number/float"} {
			p := asObj(props[name])
			got := fmt.Sprintf("%v/%v", p["type"], p["format"])
			got = strings.TrimSuffix(got, "<nil>")
			if got != want {
				t.Errorf("field %s has type %s, want %s", name, got, want)
			}
		}
		if got, want := fmt.Sprint(asObj(props["provider"])["enum"]), fmt.Sprint(backend.ProviderNames()); got != want {
			t.Errorf("provider enum = %s, want the registry's %s", got, want)
		}
		sp, _ := requestProperties(t, doc, asObj(digJSON(paths, "/broker/settings", "post")))
		if d, _ := asObj(sp["allowed_hosts"])["description"].(string); strings.TrimSpace(d) == "" {
			t.Errorf("settings field allowed_hosts has no description (%v)", slices.Sorted(maps.Keys(sp)))
		}
	})

	t.Run("the plugin's own document agrees with Vault's merged one", func(t *testing.T) {
		var own map[string]any
		e.cliJSON(&own, "path-help", "-format=json", "broker/config/x")
		op := asObj(digJSON(own, "paths", "/config/{name}", "post"))
		if op == nil {
			t.Fatalf("path-help -format=json has no /config/{name} post: %v", slices.Sorted(maps.Keys(asObj(own["paths"]))))
		}
		ownProps, _ := requestProperties(t, own, op)
		merged, _ := requestProperties(t, doc, asObj(digJSON(paths, "/broker/config/{name}", "post")))
		if !slices.Equal(slices.Sorted(maps.Keys(ownProps)), slices.Sorted(maps.Keys(merged))) {
			t.Fatalf("fields differ: plugin %v, Vault %v", slices.Sorted(maps.Keys(ownProps)), slices.Sorted(maps.Keys(merged)))
		}
		for name, p := range ownProps {
			if asObj(p)["description"] != asObj(merged[name])["description"] {
				t.Errorf("field %s: description differs between the plugin's document and Vault's", name)
			}
		}
	})

	t.Run("path-help explains each provider's config fields", func(t *testing.T) {
		out := e.cli("path-help", "broker/config/x").Stdout
		for name := range configFields {
			if !regexp.MustCompile(`(?m)^\s+` + regexp.QuoteMeta(name) + ` \(`).MatchString(out) {
				t.Errorf("path-help broker/config/x does not list %s", name)
			}
		}
		for _, prov := range backend.ProviderNames() {
			if !strings.Contains(out, prov) {
				t.Errorf("path-help broker/config/x never names %s", prov)
			}
		}
		// Every provider is registered: none may be called unsupported.
		if i := strings.Index(out, "not yet supported"); i >= 0 {
			t.Errorf("path-help broker/config/x calls a provider unsupported: %q", out[max(0, i-80):i+17])
		}
	})

	t.Run("path-help explains each provider's creds fields", func(t *testing.T) {
		e.writeSandboxConfigs()
		out := e.cli("path-help", "broker/creds/x").Stdout
		for _, c := range sandboxConfigs {
			var cred secretResponse
			e.cliJSON(&cred, "read", "-format=json", "broker/creds/"+c.name)
			var missing []string
			for k := range cred.Data {
				if !regexp.MustCompile(`\b` + regexp.QuoteMeta(k) + `\b`).MatchString(out) {
					missing = append(missing, k)
				}
			}
			sort.Strings(missing)
			if len(missing) > 0 {
				t.Errorf("%s creds return %v, which path-help broker/creds/x does not mention", c.provider, missing)
			}
			if !strings.Contains(out, c.provider) {
				t.Errorf("path-help broker/creds/x never names %s", c.provider)
			}
		}
	})
}

func asJSONList(v any) []any { l, _ := v.([]any); return l }
