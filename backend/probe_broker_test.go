package backend

import (
	"context"
	"encoding/pem"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// A probe broker speaks plain HTTP through the client the backend builds
// for the config (its connection pool, its CA bundle, its default limits),
// so tests can watch what reaches an endpoint: a counting server sees every
// connection and request. Its tokens live 15 minutes on the real clock.

// countingServer is an HTTPS endpoint (httptest's certificate, which every
// httptest TLS server shares) that counts connections and requests.
type countingServer struct {
	*httptest.Server
	conns, requests atomic.Int32
}

// newCountingServer starts an HTTPS endpoint that answers every request
// with handler (200 and {} when nil).
func newCountingServer(t *testing.T, handler http.HandlerFunc) *countingServer {
	t.Helper()
	cs := &countingServer{}
	if handler == nil {
		handler = func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("{}")) }
	}
	cs.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cs.requests.Add(1)
		handler(w, r)
	}))
	cs.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			cs.conns.Add(1)
		}
	}
	cs.StartTLS()
	t.Cleanup(cs.Close)
	return cs
}

// caPEM is the PEM of the certificate every httptest TLS server presents.
func (cs *countingServer) caPEM() string {
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cs.Certificate().Raw}))
}

// reached is how many connections and requests the endpoint has seen.
func (cs *countingServer) reached() int { return int(cs.conns.Load() + cs.requests.Load()) }

type probeBroker struct {
	envs map[string]string
}

func (p *probeBroker) Spec() provider.Spec {
	return provider.Spec{
		Name: "probe", Display: "Probe", Issuance: provider.Minted,
		Fields:       []provider.Field{{Name: "secret", Secret: true, Required: true, Description: "the probe's secret"}},
		Environments: p.envs,
	}
}

// Issue presents the secret to the endpoint: any 2xx answer is a token.
func (p *probeBroker) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	secret := req.Secrets["secret"]
	_, err := req.Client.Do(ctx, upstream.Call{
		Method: http.MethodPost, URL: req.BaseURL + "/token", Op: "POST /token",
		JSON: map[string]string{"secret": secret}, Secrets: []string{secret},
	}, nil)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	return &provider.Token{AccessToken: "probe-token", IssuedAt: now, ExpiresAt: now.Add(15 * time.Minute), AccountIDs: []string{"A1"}, ReadOnly: true}, nil
}

// newProbeBackend builds a backend whose one provider is a probe broker with
// the given environments, on fresh in-memory storage.
func newProbeBackend(t *testing.T, envs map[string]string) (*backend, logical.Storage) {
	t.Helper()
	conf := logical.TestBackendConfig()
	conf.StorageView = &logical.InmemStorage{}
	lb, err := FactoryWith(Options{Version: "test", Providers: map[string]provider.Provider{"probe": &probeBroker{envs: envs}}})(context.Background(), conf)
	if err != nil {
		t.Fatal(err)
	}
	b := lb.(*backend)
	t.Cleanup(func() { b.Clean(context.Background()) })
	if err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: conf.StorageView}); err != nil {
		t.Fatal(err)
	}
	return b, conf.StorageView
}
