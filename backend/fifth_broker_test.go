package backend_test

// The proof that adding a broker is one package and one line: a provider
// written here, against the provider package only, registered through
// Options.Providers (the line below marked "the one line") and nothing
// else, goes through every path of the mount and shows in path-help and
// OpenAPI with its fields described. It has a field no built-in provider
// has (api_key) and a daily quota, so the quota machinery is shown to be
// the provider's, not one broker's.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// fifthBroker is the test-only broker: it mints a one-hour token per call,
// and every call spends one session of a daily quota of 3 per api_key.
type fifthBroker struct {
	mu    sync.Mutex
	calls int
}

func (*fifthBroker) Spec() provider.Spec {
	return provider.Spec{
		Name:     "fifth",
		Display:  "Fifth",
		Issuance: provider.Minted,
		Fields: []provider.Field{
			{Name: "api_key", Secret: true, Required: true, Description: "the API key from the Fifth console."},
			{Name: "client_tag", Secret: true, Description: "an optional client tag the Fifth console shows."},
		},
		Environments: map[string]string{"production": "https://api.fifth.example", "staging": "https://staging.fifth.example"},
		Quota: &provider.Quota{Call: "sessions.open", Limit: 3, DefaultBudget: 2,
			Key: func(s map[string]string) string { return "fifth\x00" + s["api_key"] }},
		OptionNotes: map[string]string{"make_budget": "Fifth counts sessions per API key."},
		DetailsHelp: "session_id, region (where Fifth opened the session)",
		RetireNote:  "Fifth sessions cannot be closed; rotate the API key in the Fifth console",
	}
}

func (f *fifthBroker) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	if req.Secrets["api_key"] == "" {
		return nil, errors.New("fifth: api_key is empty")
	}
	if req.ReserveQuota == nil {
		return nil, errors.New("fifth: no quota reservation")
	}
	if err := req.ReserveQuota(ctx); err != nil {
		return nil, fmt.Errorf("fifth: sessions.open not reserved: %w", err)
	}
	f.mu.Lock()
	f.calls++
	n := f.calls
	f.mu.Unlock()
	now := time.Now()
	return &provider.Token{
		AccessToken: fmt.Sprintf("fifth-token-%d", n),
		IssuedAt:    now,
		ExpiresAt:   now.Add(time.Hour),
		AccountIDs:  []string{"F1"},
		ReadOnly:    true,
		Details:     map[string]any{"session_id": fmt.Sprint(n), "region": "eu"},
	}, nil
}

func TestFifthBrokerIsOnePackageAndOneLine(t *testing.T) {
	ctx := context.Background()
	conf := logical.TestBackendConfig()
	storage := &logical.InmemStorage{}
	conf.StorageView = storage
	// The mount's root help asks Vault's version for its OpenAPI document.
	sv := conf.System.(*logical.StaticSystemView)
	sv.PluginEnvironment = &logical.PluginEnvironment{VaultVersion: "test"}
	lb, err := backend.FactoryWith(backend.Options{Version: "test", Providers: map[string]provider.Provider{
		"fifth": &fifthBroker{}, // the one line
	}})(ctx, conf)
	if err != nil {
		t.Fatal(err)
	}
	defer lb.Cleanup(ctx)

	do := func(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
		req := &logical.Request{Operation: op, Path: path, Storage: storage, Data: data}
		if op == logical.UpdateOperation {
			if checked, exists, err := lb.HandleExistenceCheck(ctx, req); err == nil && checked && !exists {
				req.Operation = logical.CreateOperation
			}
		}
		return lb.HandleRequest(ctx, req)
	}
	ok := func(op logical.Operation, path string, data map[string]any) *logical.Response {
		t.Helper()
		resp, err := do(op, path, data)
		if err != nil || resp.IsError() {
			t.Fatalf("%s %s: %v %v", op, path, err, resp)
		}
		return resp
	}
	refused := func(op logical.Operation, path string, data map[string]any, want string) {
		t.Helper()
		resp, err := do(op, path, data)
		msg := fmt.Sprint(err)
		if resp != nil && resp.IsError() {
			msg = resp.Error().Error()
		}
		if (err == nil && !resp.IsError()) || !strings.Contains(msg, want) {
			t.Fatalf("%s %s: want an error with %q, got %v %v", op, path, want, err, resp)
		}
	}

	// config write, verified upstream (one session spent), and read.
	refused(logical.UpdateOperation, "config/f", map[string]any{"provider": "fifth"}, "api_key: is required for provider fifth")
	refused(logical.UpdateOperation, "config/f", map[string]any{"provider": "nope", "api_key": "k"}, "one of fifth")
	refused(logical.UpdateOperation, "config/f", map[string]any{"provider": "fifth", "api_key": "k", "environment": "moon"}, "it has: production, staging")
	ok(logical.UpdateOperation, "config/f", map[string]any{"provider": "fifth", "api_key": " k1 ", "environment": "staging"})
	read := ok(logical.ReadOperation, "config/f", nil).Data
	for k, want := range map[string]any{"provider": "fifth", "api_key_set": true, "client_tag_set": false, "makes_today": 1, "make_budget": 2, "endpoint": "https://staging.fifth.example"} {
		if fmt.Sprint(read[k]) != fmt.Sprint(want) {
			t.Errorf("config read %s = %v, want %v (%v)", k, read[k], want, read)
		}
	}
	if b, _ := json.Marshal(read); strings.Contains(string(b), "k1") {
		t.Fatalf("a config read shows the secret: %s", b)
	}
	refused(logical.UpdateOperation, "config/f", map[string]any{"make_budget": 4}, "must be between 1 and 3 (Fifth's daily limit)")
	refused(logical.UpdateOperation, "config/f", map[string]any{"keep_alive": false}, "keep_alive")
	refused(logical.UpdateOperation, "config/f", map[string]any{"api_key": []any{"k1"}}, "api_key: must be a string")
	ok(logical.UpdateOperation, "config/f", map[string]any{"make_budget": 3, "verify": false})

	// creds: the verifying token, with the broker's details.
	creds := ok(logical.ReadOperation, "creds/f", nil)
	if creds.Data["access_token"] != "fifth-token-1" || creds.Data["session_id"] != "1" || creds.Data["provider"] != "fifth" {
		t.Fatalf("creds: %v", creds.Data)
	}
	if creds.Secret == nil || creds.Secret.TTL <= 0 {
		t.Fatalf("creds carry no lease: %+v", creds.Secret)
	}

	// renew and revoke the lease.
	lease := *creds.Secret
	lease.IssueTime = time.Now()
	renewed, err := lb.HandleRequest(ctx, &logical.Request{Operation: logical.RenewOperation, Storage: storage, Secret: &lease})
	if err != nil || renewed.IsError() || renewed.Secret == nil || renewed.Secret.TTL <= 0 {
		t.Fatalf("renew: %v %v", err, renewed)
	}
	if resp, err := lb.HandleRequest(ctx, &logical.Request{Operation: logical.RevokeOperation, Storage: storage, Secret: creds.Secret}); err != nil || resp.IsError() {
		t.Fatalf("revoke: %v %v", err, resp)
	}

	// retire: the note is the provider's; the next read mints anew and
	// spends the second session; the third is refused by the budget.
	ret := ok(logical.UpdateOperation, "config/f/retire", nil)
	if ret.Data["note"] != "Fifth sessions cannot be closed; rotate the API key in the Fifth console" {
		t.Fatalf("retire note: %v", ret.Data)
	}
	if got := ok(logical.ReadOperation, "creds/f", nil).Data["access_token"]; got != "fifth-token-2" {
		t.Fatalf("creds after retire: %v", got)
	}
	ok(logical.UpdateOperation, "config/f/retire", nil)
	ok(logical.ReadOperation, "creds/f", nil)
	ok(logical.UpdateOperation, "config/f/retire", nil)
	resp, err := do(logical.ReadOperation, "creds/f", nil)
	var coded logical.HTTPCodedError
	if !errors.As(err, &coded) || coded.Code() != 429 || !strings.Contains(err.Error(), "the daily sessions.open budget is spent: 3 of the service's 3") {
		t.Fatalf("a read past the quota: want 429 naming the quota, got %v %v", err, resp)
	}
	refused(logical.UpdateOperation, "rotate-root/f", nil, "has no API to rotate")

	// path-help and OpenAPI describe the provider and its fields.
	help := ok(logical.HelpOperation, "config/f", nil)
	text, _ := help.Data["help"].(string)
	for _, want := range []string{
		"fifth: the API key from the Fifth console.",
		"fifth: an optional client tag",
		"fifth: most sessions.open calls a day (UTC) the plugin makes for one login; Fifth allows 3. Default 2. Fifth counts sessions per API key.",
		"The broker: fifth.",
		"staging (fifth)",
		"fifth    api_key, optional client_tag;",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("path-help config/<name> lacks %q:\n%s", want, text)
		}
	}
	doc, err := json.Marshal(help.Data["openapi"])
	if err != nil {
		t.Fatal(err)
	}
	props := requestProps(t, doc, "/config/{name}")
	for field, want := range map[string]string{"api_key": "fifth: the API key", "client_tag": "fifth: an optional client tag", "make_budget": "sessions.open"} {
		if d, _ := props[field]["description"].(string); !strings.Contains(d, want) {
			t.Errorf("OpenAPI field %s: description %q lacks %q", field, d, want)
		}
	}
	if got := fmt.Sprint(props["provider"]["enum"]); got != "[fifth]" {
		t.Errorf("OpenAPI provider enum = %s", got)
	}
	for _, f := range []string{"secret", "token", "keep_alive", "refresh_token_expires_at"} {
		if _, ok := props[f]; ok {
			t.Errorf("OpenAPI lists %s, which no registered provider takes", f)
		}
	}
	for path, want := range map[string]string{
		"creds/f":         "fifth    session_id, region",
		"config/f/retire": "act at the broker",
		"rotate-root/f":   "The long-lived secrets of fifth cannot be rotated",
	} {
		h := ok(logical.HelpOperation, path, nil)
		if s, _ := h.Data["help"].(string); !strings.Contains(s, want) {
			t.Errorf("path-help %s lacks %q:\n%s", path, want, s)
		}
	}
	if h := ok(logical.HelpOperation, "", nil); !strings.Contains(fmt.Sprint(h.Data["help"]), "(Fifth)") {
		t.Errorf("the mount's help does not name Fifth: %v", h.Data["help"])
	}

	// delete: the config and its token go.
	ok(logical.DeleteOperation, "config/f", nil)
	refused(logical.ReadOperation, "creds/f", nil, `no config or role named "f"`)
	if keys, _ := storage.List(ctx, "token/"); len(keys) > 0 {
		t.Fatalf("token records left after delete: %v", keys)
	}
}

// requestProps returns the request body properties of a path's post in an
// OpenAPI document, following a $ref into components/schemas.
func requestProps(t *testing.T, raw []byte, path string) map[string]map[string]any {
	t.Helper()
	var doc struct {
		Paths map[string]struct {
			Post struct {
				RequestBody struct {
					Content map[string]struct {
						Schema struct {
							Ref        string                    `json:"$ref"`
							Properties map[string]map[string]any `json:"properties"`
						} `json:"schema"`
					} `json:"content"`
				} `json:"requestBody"`
			} `json:"post"`
		} `json:"paths"`
		Components struct {
			Schemas map[string]struct {
				Properties map[string]map[string]any `json:"properties"`
			} `json:"schemas"`
		} `json:"components"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	s := doc.Paths[path].Post.RequestBody.Content["application/json"].Schema
	if s.Ref != "" {
		return doc.Components.Schemas[strings.TrimPrefix(s.Ref, "#/components/schemas/")].Properties
	}
	if len(s.Properties) == 0 {
		t.Fatalf("OpenAPI has no request properties for %s: %s", path, raw)
	}
	return s.Properties
}
