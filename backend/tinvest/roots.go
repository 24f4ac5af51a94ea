package tinvest

import (
	"crypto/x509"
	"embed"
	"encoding/pem"
	"fmt"
	"sync"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// The T-Invest hosts (tbank.ru, and tinkoff.ru since 30.09.2025) present
// certificates that chain to the Russian Trusted Root CA of the Ministry of
// Digital Development, which common trust stores lack: without these a fresh
// install fails the TLS handshake against the default host. They are trusted
// for Hosts only (upstream.NewTransport scopes them), in addition to the
// system roots; a config's ca_cert replaces both.
//
// Each file was taken from two independent public repositories and checked
// byte-identical (SHA-256 over the DER, below); the Sub CA also verifies
// against the root (openssl verify). The servers send the Sub CA themselves;
// it is shipped in case one does not.
//
//	russian_trusted_root_ca.pem: CN=Russian Trusted Root CA, serial 0x1000,
//	  2022-03-01 .. 2032-02-27
//	  SHA-256 D2:6D:2D:02:31:B7:C3:9F:92:CC:73:85:12:BA:54:10:35:19:E4:40:5D:68:B5:BD:70:3E:97:88:CA:8E:CF:31
//	  sources: github.com/ory/kratos certs/russian_trusted_root_ca_pem.crt (df0602d7)
//	           github.com/RealFoxNews/tinkoff-set-order certs/russian_trusted_root_ca.pem (1e56cb88)
//	russian_trusted_sub_ca_2024.pem: CN=Russian Trusted Sub CA, serial 0x1005,
//	  2024-07-15 .. 2029-07-19, issued by the root above
//	  SHA-256 21:55:78:50:36:C9:00:DB:B5:F1:BB:2A:15:69:C8:0C:55:59:5B:D6:BF:94:86:7A:29:BB:DD:BC:7D:88:A3:F2
//	  sources: github.com/RealFoxNews/tinkoff-set-order certs/russian_trusted_root_ca.pem (1e56cb88)
//	           github.com/Va3elina/moex-aggregator certs/russian_trusted_sub_ca.pem (ca7bde60)
//
//go:embed certs/*.pem
var certFS embed.FS

// Fingerprints are the SHA-256 fingerprints (hex, over the DER) of the
// embedded certificates, by file name, as recorded above.
var Fingerprints = map[string]string{
	"russian_trusted_root_ca.pem":     "d26d2d0231b7c39f92cc738512ba54103519e4405d68b5bd703e9788ca8ecf31",
	"russian_trusted_sub_ca_2024.pem": "2155785036c900dbb5f1bb2a1569c80c55595bd6bf94867a29bbddbc7d88a3f2",
}

// Hosts are the T-Invest hosts the embedded CAs are trusted for.
var Hosts = []string{
	"invest-public-api.tbank.ru",
	"sandbox-invest-public-api.tbank.ru",
	"invest-public-api.tinkoff.ru",
	"sandbox-invest-public-api.tinkoff.ru",
}

var (
	rootsOnce sync.Once
	roots     map[string]*x509.Certificate
	rootsErr  error
)

// EmbeddedCerts returns the embedded certificates by file name.
func EmbeddedCerts() (map[string]*x509.Certificate, error) {
	rootsOnce.Do(func() { roots, rootsErr = loadCerts() })
	return roots, rootsErr
}

func loadCerts() (map[string]*x509.Certificate, error) {
	entries, err := certFS.ReadDir("certs")
	if err != nil {
		return nil, fmt.Errorf("tinvest: reading the embedded CAs: %w", err)
	}
	out := map[string]*x509.Certificate{}
	for _, e := range entries {
		data, err := certFS.ReadFile("certs/" + e.Name())
		if err != nil {
			return nil, fmt.Errorf("tinvest: reading %s: %w", e.Name(), err)
		}
		block, rest := pem.Decode(data)
		if block == nil || block.Type != "CERTIFICATE" || len(rest) != 0 {
			return nil, fmt.Errorf("tinvest: %s is not one PEM certificate", e.Name())
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("tinvest: parsing %s: %w", e.Name(), err)
		}
		out[e.Name()] = c
	}
	return out, nil
}

// TrustedRoots is what upstream.NewTransport needs to trust the embedded CAs
// for the T-Invest hosts. Were the embedded files broken (the package's tests
// rule it out) it trusts nothing extra: the TLS error then tells the operator
// to set ca_cert, rather than the plugin failing to start.
func TrustedRoots() upstream.HostRoots {
	certs, err := EmbeddedCerts()
	if err != nil {
		return upstream.HostRoots{}
	}
	hr := upstream.HostRoots{Hosts: append([]string(nil), Hosts...)}
	for _, name := range []string{"russian_trusted_root_ca.pem", "russian_trusted_sub_ca_2024.pem"} {
		hr.Certs = append(hr.Certs, certs[name])
	}
	return hr
}
