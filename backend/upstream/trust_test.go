package upstream

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// testCA makes a CA and a server certificate it signs for hosts.
func testCA(t *testing.T, hosts ...string) (*x509.Certificate, tls.Certificate) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Test National Root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: hosts[0]}, DNSNames: hosts,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return ca, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// An extra root is trusted for its hosts only; ca_cert replaces everything.
func TestHostScopedRoots(t *testing.T) {
	ca, cert := testCA(t, "invest.test", "other.test")
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	get := func(tr *http.Transport, host string) error {
		// Every name resolves to the test server.
		tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, srv.Listener.Addr().String())
		}
		resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://" + host + ":" + port + "/")
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	scoped := HostRoots{Hosts: []string{"INVEST.test."}, Certs: []*x509.Certificate{ca}}
	caPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}))
	cases := []struct {
		name   string
		caPEM  string
		extra  []HostRoots
		host   string
		wantOK bool
		says   string
	}{
		{"system roots only", "", nil, "invest.test", false, "unknown authority"},
		{"extra root for its host", "", []HostRoots{scoped}, "invest.test", true, ""},
		{"extra root not for another host", "", []HostRoots{scoped}, "other.test", false, "trusts for other hosts"},
		{"ca_cert for any host", caPEM, []HostRoots{scoped}, "other.test", true, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, err := NewTransport(tc.caPEM, tc.extra...)
			if err != nil {
				t.Fatal(err)
			}
			err = get(tr, tc.host)
			if (err == nil) != tc.wantOK {
				t.Fatalf("GET %s: %v, want ok %v", tc.host, err, tc.wantOK)
			}
			if err != nil && !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %v lacks %q", err, tc.says)
			}
		})
	}
	// ca_cert replaces the extra roots for their own hosts too.
	ca3, _ := testCA(t, "x.test")
	tr, _ := NewTransport(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca3.Raw})), scoped)
	tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, srv.Listener.Addr().String())
	}
	if resp, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("https://invest.test:" + port + "/"); err == nil {
		resp.Body.Close()
		t.Error("a configured ca_cert left the extra root trusted")
	}
}
