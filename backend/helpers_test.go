package backend

import (
	"context"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

const (
	sessionsEP = "POST /v1/sessions"
	detailsEP  = "POST /v1/sessions/details"
)

type harness struct {
	t *testing.T
	// skipped is how far skip has moved the harness clock past real time.
	// The one clock (now) is the backends' and the sandbox's: a token ages
	// on both sides of the wire at once, without the test sleeping.
	skipped atomic.Int64
	b       *backend
	storage logical.Storage
	sb      *sandbox.Server
	url     string
}

// newHarness starts a sandbox on loopback and a backend on in-memory
// storage, both on the harness clock.
func newHarness(t *testing.T, opts sandbox.Options) *harness {
	t.Helper()
	h := &harness{t: t}
	opts.Now = h.now
	h.sb = sandbox.New(opts)
	srv := httptest.NewServer(h.sb)
	t.Cleanup(srv.Close)
	h.url = srv.URL
	h.b, h.storage = h.newBackend(nil)
	return h
}

// now is the harness clock: real time moved on by every skip.
func (h *harness) now() time.Time { return time.Now().Add(time.Duration(h.skipped.Load())) }

// newBackend builds a backend, on the given storage or a fresh one.
func (h *harness) newBackend(s logical.Storage) (*backend, logical.Storage) {
	h.t.Helper()
	conf := logical.TestBackendConfig()
	if s != nil {
		conf.StorageView = s
	} else {
		conf.StorageView = &logical.InmemStorage{}
	}
	lb, err := FactoryWith(Options{Version: "v0.0.0-test", Clock: h.now})(context.Background(), conf)
	if err != nil {
		h.t.Fatal(err)
	}
	b := lb.(*backend)
	h.t.Cleanup(func() { b.Clean(context.Background()) })
	if err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: conf.StorageView}); err != nil {
		h.t.Fatal(err)
	}
	return b, conf.StorageView
}

func (h *harness) do(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	h.t.Helper()
	return h.doOn(h.b, op, path, data)
}

func (h *harness) doOn(b *backend, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	h.t.Helper()
	return request(b, h.storage, op, path, data)
}

// request sends one request to b as Vault's router would.
func request(b *backend, s logical.Storage, op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
	req := &logical.Request{Operation: op, Path: path, Storage: s, Data: data}
	if op == logical.CreateOperation || op == logical.UpdateOperation {
		checked, exists, err := b.HandleExistenceCheck(context.Background(), req)
		if err != nil {
			// Vault answers a field that fails conversion here with a 400.
			return nil, err
		}
		// As Vault does: a path without an existence check is an update.
		req.Operation = logical.UpdateOperation
		if checked && !exists {
			req.Operation = logical.CreateOperation
		}
	}
	return b.HandleRequest(context.Background(), req)
}

// mustOK fails the test unless the request succeeded.
func (h *harness) mustOK(op logical.Operation, path string, data map[string]any) *logical.Response {
	h.t.Helper()
	resp, err := h.do(op, path, data)
	if err != nil || (resp != nil && resp.IsError()) {
		h.t.Fatalf("%s %s: err=%v resp=%v", op, path, err, resp)
	}
	return resp
}

// writeFinam writes config/<name> for the sandbox's trading secret.
func (h *harness) writeFinam(name string, extra map[string]any) *logical.Response {
	h.t.Helper()
	data := map[string]any{"provider": "finam", "secret": sandbox.FinamSecret, "base_url": h.url}
	for k, v := range extra {
		data[k] = v
	}
	return h.mustOK(logical.UpdateOperation, "config/"+name, data)
}

// errText returns the error a request produced, from either channel.
func errText(resp *logical.Response, err error) string {
	if err != nil {
		return err.Error()
	}
	if resp != nil && resp.IsError() {
		return resp.Error().Error()
	}
	return ""
}

func statusOf(resp *logical.Response, err error) int {
	if err != nil {
		if ce, ok := err.(logical.HTTPCodedError); ok {
			return ce.Code()
		}
		if _, ok := err.(errutil.UserError); ok {
			return 400
		}
		return 500
	}
	if resp != nil && resp.IsError() {
		return 400
	}
	return 200
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

// skip moves the harness clock on by d, as if d had passed: every token
// ages by d, in the backends and in the sandbox alike.
func (h *harness) skip(d time.Duration) { h.skipped.Add(int64(d)) }
