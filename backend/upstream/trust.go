package upstream

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
)

// HostRoots are CA certificates trusted, in addition to the system roots,
// for the named hosts only: T-Invest's hosts chain to a national root that
// common trust stores lack, and that root must not vouch for anyone else.
type HostRoots struct {
	Hosts []string
	Certs []*x509.Certificate
}

// NewTransport builds the connection pool for one trust configuration.
// Clients that trust the same CAs should share one: a pool per config
// would hold a connection and two goroutines per config (37 KB each at
// 10,000 configs) and repeat every TLS handshake.
//
// caCertPEM, when set, replaces every other root: the system's and extra
// alike. Otherwise the system roots are trusted, and each of extra's
// certificates too, for its hosts only.
func NewTransport(caCertPEM string, extra ...HostRoots) (*http.Transport, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 16
	if caCertPEM != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(caCertPEM)) {
			return nil, errors.New("ca_cert holds no PEM certificate")
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		return tr, nil
	}
	scoped := map[string][]*x509.Certificate{}
	var all []*x509.Certificate
	for _, hr := range extra {
		for _, h := range hr.Hosts {
			h = normHost(h)
			scoped[h] = append(scoped[h], hr.Certs...)
		}
		all = append(all, hr.Certs...)
	}
	if len(all) == 0 {
		return tr, nil
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		return nil, fmt.Errorf("loading the system roots: %w", err)
	}
	for _, c := range all {
		pool.AddCert(c)
	}
	tr.TLSClientConfig = &tls.Config{
		RootCAs:    pool,
		MinVersion: tls.VersionTLS12,
		// Go has verified the chain against system+extra roots by now; a
		// chain that holds only through an extra root is accepted for
		// that root's hosts alone.
		VerifyConnection: func(cs tls.ConnectionState) error {
			return checkScoped(cs, scoped, all)
		},
	}
	return tr, nil
}

func normHost(h string) string { return strings.TrimSuffix(strings.ToLower(h), ".") }

// checkScoped refuses a connection whose every verified chain runs through
// an extra root not granted to the host it was made to.
func checkScoped(cs tls.ConnectionState, scoped map[string][]*x509.Certificate, all []*x509.Certificate) error {
	allowed := scoped[normHost(cs.ServerName)]
	for _, chain := range cs.VerifiedChains {
		if !usesAny(chain, all, allowed) {
			return nil
		}
	}
	if len(cs.VerifiedChains) == 0 {
		return nil // nothing verified here: Go's own checks decide
	}
	host := cs.ServerName
	if host == "" {
		host = "this address"
	}
	return fmt.Errorf("the certificate of %s chains only to a CA the plugin trusts for other hosts (%s)", host, cs.VerifiedChains[0][len(cs.VerifiedChains[0])-1].Subject.CommonName)
}

// usesAny reports whether chain relies on a cert of all that is not in allowed.
func usesAny(chain, all, allowed []*x509.Certificate) bool {
	for _, c := range chain {
		if slices.ContainsFunc(all, c.Equal) && !slices.ContainsFunc(allowed, c.Equal) {
			return true
		}
	}
	return false
}
