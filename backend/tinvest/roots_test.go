package tinvest_test

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"strings"
	"testing"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/tinvest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// The embedded CAs parse, are CAs, match the fingerprints recorded from two
// public sources, and the Sub CA is signed by the root.
func TestEmbeddedCAs(t *testing.T) {
	certs, err := tinvest.EmbeddedCerts()
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != len(tinvest.Fingerprints) {
		t.Fatalf("embedded %d certificates, %d fingerprints recorded", len(certs), len(tinvest.Fingerprints))
	}
	for name, want := range tinvest.Fingerprints {
		c, ok := certs[name]
		if !ok {
			t.Fatalf("%s not embedded", name)
		}
		sum := sha256.Sum256(c.Raw)
		if got := hex.EncodeToString(sum[:]); got != want {
			t.Errorf("%s: SHA-256 %s, recorded %s", name, got, want)
		}
		if !c.IsCA || !c.BasicConstraintsValid || c.KeyUsage&x509.KeyUsageCertSign == 0 {
			t.Errorf("%s is not a CA certificate", name)
		}
		// The fingerprint is written down in the comment and the docs too.
		for _, doc := range []string{"roots.go", "../../docs/tinvest.md"} {
			b, err := os.ReadFile(doc)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(strings.ToLower(strings.ReplaceAll(string(b), ":", "")), want) {
				t.Errorf("%s does not record the fingerprint of %s", doc, name)
			}
		}
	}
	root, sub := certs["russian_trusted_root_ca.pem"], certs["russian_trusted_sub_ca_2024.pem"]
	if root.Subject.CommonName != "Russian Trusted Root CA" || sub.Subject.CommonName != "Russian Trusted Sub CA" {
		t.Errorf("subjects %q, %q", root.Subject.CommonName, sub.Subject.CommonName)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		t.Errorf("root is not self-signed: %v", err)
	}
	if err := sub.CheckSignatureFrom(root); err != nil {
		t.Errorf("Sub CA is not signed by the root: %v", err)
	}
	hr := tinvest.TrustedRoots()
	if len(hr.Certs) != 2 || len(hr.Hosts) == 0 {
		t.Fatalf("TrustedRoots = %d certs for %v", len(hr.Certs), hr.Hosts)
	}
	for _, h := range hr.Hosts {
		if !strings.HasSuffix(h, ".tbank.ru") && !strings.HasSuffix(h, ".tinkoff.ru") {
			t.Errorf("embedded CAs trusted for a non-T-Invest host %q", h)
		}
	}
}

// The default transport trusts the system roots and the embedded CAs; a
// configured ca_cert replaces both.
func TestDefaultTransportTrust(t *testing.T) {
	sys, err := x509.SystemCertPool()
	if err != nil {
		t.Skipf("no system roots here: %v", err)
	}
	certs, err := tinvest.EmbeddedCerts()
	if err != nil {
		t.Fatal(err)
	}
	want := sys.Clone()
	for _, c := range certs {
		want.AddCert(c)
	}
	tr, err := upstream.NewTransport("", tinvest.TrustedRoots())
	if err != nil {
		t.Fatal(err)
	}
	if tr.TLSClientConfig == nil || !tr.TLSClientConfig.RootCAs.Equal(want) {
		t.Error("default transport does not trust exactly the system roots and the embedded CAs")
	}
	if tr.TLSClientConfig.RootCAs.Equal(sys) {
		t.Error("default transport trusts the system roots only")
	}

	own := certs["russian_trusted_sub_ca_2024.pem"] // any CA will do
	ownPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: own.Raw}))
	tr, err = upstream.NewTransport(ownPEM, tinvest.TrustedRoots())
	if err != nil {
		t.Fatal(err)
	}
	only := x509.NewCertPool()
	only.AddCert(own)
	if !tr.TLSClientConfig.RootCAs.Equal(only) {
		t.Error("ca_cert does not replace the system roots and the embedded CAs")
	}
}
