package backend_test

// The generic support BCS needed, shown with a test-only provider and no
// broker's name: a secret that carries its own fixed expiry
// (Spec.SecretExpiry, Spec.RenewSecret) and a rotating provider that is
// given the operator's written value beside the rotated one
// (Request.Written).

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// sixthBroker's key is "k<n>@<unix expiry>"; every Issue rotates it to
// k<n+1> with the same expiry, and records what it was given.
type sixthBroker struct {
	mu      sync.Mutex
	secrets []string
	written []string
}

func sixthExpiry(s map[string]string) (time.Time, error) {
	_, at, ok := strings.Cut(s["key"], "@")
	n, err := strconv.ParseInt(at, 10, 64)
	if !ok || err != nil {
		return time.Time{}, errors.New("key: has no @expiry")
	}
	return time.Unix(n, 0), nil
}

func (*sixthBroker) Spec() provider.Spec {
	return provider.Spec{
		Name: "sixth", Display: "Sixth", Issuance: provider.Minted, RotatesSecret: true,
		Fields:       []provider.Field{{Name: "key", Secret: true, Required: true, Description: "the key."}},
		Environments: map[string]string{"production": "https://sixth.example"},
		SecretExpiry: sixthExpiry, RenewSecret: "make a new key in the Sixth console",
	}
}

func (s *sixthBroker) Issue(_ context.Context, req provider.Request) (*provider.Token, error) {
	s.mu.Lock()
	s.secrets = append(s.secrets, req.Secrets["key"])
	s.written = append(s.written, req.Written["key"])
	s.mu.Unlock()
	name, at, _ := strings.Cut(req.Secrets["key"], "@")
	n, _ := strconv.Atoi(strings.TrimPrefix(name, "k"))
	exp, _ := sixthExpiry(req.Secrets)
	now := time.Now()
	return &provider.Token{AccessToken: fmt.Sprintf("t%d", n), IssuedAt: now, ExpiresAt: now.Add(time.Hour),
		AccountIDs: []string{"A"}, Rotated: map[string]string{"key": fmt.Sprintf("k%d@%s", n+1, at)}, SecretExpiresAt: exp}, nil
}

func TestSecretExpiryAndWrittenSecretsAreGeneric(t *testing.T) {
	ctx := context.Background()
	var offset time.Duration
	conf := logical.TestBackendConfig()
	storage := &logical.InmemStorage{}
	conf.StorageView = storage
	sixth := &sixthBroker{}
	lb, err := backend.FactoryWith(backend.Options{Version: "test", Clock: upstream.NowClock(func() time.Time { return time.Now().Add(offset) }),
		Providers: map[string]provider.Provider{"sixth": sixth}})(ctx, conf)
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
	msg := func(resp *logical.Response, err error) string {
		if err != nil {
			return err.Error()
		}
		if resp != nil && resp.IsError() {
			return resp.Error().Error()
		}
		return ""
	}

	if m := msg(do(logical.UpdateOperation, "config/s", map[string]any{"provider": "sixth", "key": "k1"})); !strings.Contains(m, "key: has no @expiry") {
		t.Fatalf("a key the provider cannot read: %q", m)
	}
	exp := time.Now().Add(10 * 24 * time.Hour).Truncate(time.Second)
	key := fmt.Sprintf("k1@%d", exp.Unix())
	resp, err := do(logical.UpdateOperation, "config/s", map[string]any{"provider": "sixth", "key": key})
	if msg(resp, err) != "" || !strings.Contains(strings.Join(resp.Warnings, " "), "expires at") {
		t.Fatalf("write: %q %v", msg(resp, err), resp)
	}
	read, _ := do(logical.ReadOperation, "config/s", nil)
	if read.Data["secret_expires_at"] != exp.UTC().Format(time.RFC3339) {
		t.Fatalf("secret_expires_at = %v", read.Data["secret_expires_at"])
	}
	if _, ok := read.Data["rotation_fraction"]; ok {
		t.Fatal("rotation_fraction shown for a fixed expiry")
	}
	// No registered provider takes it here: not even in the schema.
	if m := msg(do(logical.UpdateOperation, "config/s", map[string]any{"rotation_fraction": 0.5})); !strings.Contains(m, "rotation_fraction: unknown field") {
		t.Fatalf("rotation_fraction: %q", m)
	}
	if m := msg(do(logical.UpdateOperation, "config/s", map[string]any{"expiry_warning": "48h"})); m != "" {
		t.Fatalf("expiry_warning: %q", m)
	}
	do(logical.UpdateOperation, "config/s/retire", nil)
	if _, err := do(logical.ReadOperation, "creds/s", nil); err != nil {
		t.Fatal(err)
	}
	// The provider got the newest key to present and the written one beside it.
	sixth.mu.Lock()
	last, written := sixth.secrets[len(sixth.secrets)-1], sixth.written[len(sixth.written)-1]
	sixth.mu.Unlock()
	if !strings.HasPrefix(last, "k3@") || written != key {
		t.Fatalf("Issue got %q, written %q", last, written)
	}
	// Past the expiry: refused without a call, with the provider's advice.
	offset = 11 * 24 * time.Hour
	do(logical.UpdateOperation, "config/s/retire", nil)
	calls := len(sixth.secrets)
	resp, err = do(logical.ReadOperation, "creds/s", nil)
	var coded logical.HTTPCodedError
	if !errors.As(err, &coded) || coded.Code() != 400 || !strings.Contains(err.Error(), "expired at") ||
		!strings.Contains(err.Error(), "make a new key in the Sixth console") || len(sixth.secrets) != calls {
		t.Fatalf("after expiry: %v %v", err, resp)
	}
}
