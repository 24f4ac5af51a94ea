package backend

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"maps"
	"math/big"
	"net"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// Fuzz targets for the config fields an operator (or anyone with write
// access to config/) sends, and for a whole config write through the
// backend on in-memory storage.

// selfSignedPEM returns a fresh CA certificate in PEM.
func selfSignedPEM(tb testing.TB) string {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Russian Trusted Root CA (fuzz)"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func isFieldError(err error, field string) bool {
	fe, ok := err.(*fieldError)
	return ok && fe.field == field && strings.HasPrefix(err.Error(), field+": ")
}

// FuzzValidateBaseURL: an accepted base_url is https, or http to a loopback
// address only; carries no credentials, query or fragment; is stable under
// validation; and the requests built from it (base + a broker path) go to
// the host that was validated.
func FuzzValidateBaseURL(f *testing.F) {
	for _, s := range []string{
		"https://api.finam.ru", "https://invest-public-api.tbank.ru/rest", "https://oauthdev.alor.ru/",
		"http://127.0.0.1:8200", "http://localhost:9000/sandbox-rest", "http://[::1]:8080", "http://LOCALHOST",
		"http://example.com", "ftp://127.0.0.1", "https://u:p@example.com", "https://example.com/?x=1",
		"https://example.com/#frag", "api.finam.ru", "//api.finam.ru", "http://127.0.0.1.nip.io",
		"http://localhost.evil.com", "http://127.1", "http://0x7f000001", "http://[::ffff:127.0.0.1]/",
		"https://api.finam.ru:443/v1/../x", "http://127.0.0.1:80@evil.com", "http://evil.com\\@127.0.0.1",
		"https://%65xample.com", "http://127.0.0.1%2f@evil.com", "https://api.finam.ru/%2e%2e/",
		"http://[fe80::1%25lo]:80", "HTTPS://API.FINAM.RU/", "https:///path", "http://127.0.0.1:99999",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		got, err := validateBaseURL(raw)
		if err != nil {
			if got != "" || !isFieldError(err, "base_url") {
				t.Fatalf("refusal %q, %v does not name base_url", got, err)
			}
			return
		}
		u, perr := url.Parse(got)
		if perr != nil {
			t.Fatalf("accepted %q as %q, which does not parse: %v", raw, got, perr)
		}
		if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" || u.Host == "" {
			t.Fatalf("accepted %q as %q with credentials, query, fragment or no host", raw, got)
		}
		loopback := strings.EqualFold(u.Hostname(), "localhost")
		if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsLoopback() {
			loopback = true
		}
		if u.Scheme != "https" && !(u.Scheme == "http" && loopback) {
			t.Fatalf("accepted %q (%s to %q): neither https nor loopback http", raw, u.Scheme, u.Hostname())
		}
		if strings.HasSuffix(got, "/") {
			t.Fatalf("%q keeps a trailing slash", got)
		}
		if again, err := validateBaseURL(got); err != nil || again != got {
			t.Fatalf("not stable: %q -> %q -> %q, %v", raw, got, again, err)
		}
		// What the providers do with it: append a path and send.
		for _, p := range []string{"/v1/sessions", "/refresh", "/tinkoff.public.invest.api.contract.v1.UsersService/GetInfo"} {
			r, err := url.Parse(got + p)
			if err != nil {
				t.Fatalf("%q + %q does not parse: %v", got, p, err)
			}
			if r.Host != u.Host || r.Scheme != u.Scheme || r.User != nil {
				t.Fatalf("%q + %q goes to %s://%s, not the validated %s://%s", got, p, r.Scheme, r.Host, u.Scheme, u.Host)
			}
		}
	})
}

// FuzzValidateCACert: an accepted ca_cert bundle is certificates only, and
// every one of them is trusted by the client built from it: the operator's
// bundle is never half used.
func FuzzValidateCACert(f *testing.F) {
	ca := selfSignedPEM(f)
	ca2 := selfSignedPEM(f)
	f.Add(ca)
	f.Add(ca + ca2)
	f.Add("  \n" + ca + "\n\n")
	f.Add(ca + "trailing garbage")
	f.Add("subject=CN = Russian Trusted Root CA\nissuer=CN = Russian Trusted Root CA\n" + ca)
	f.Add(strings.Replace(ca, "CERTIFICATE", "PRIVATE KEY", 2))
	f.Add("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
	f.Add("hello")
	f.Add("")
	f.Fuzz(checkCACert)
}

// TestFuzzFindingCACertHeaders: validateCACert accepts a CERTIFICATE block
// with PEM headers, which the client's AppendCertsFromPEM silently skips: the
// write succeeds and the config shows the whole bundle, but that certificate
// is not trusted (a bundle of only such blocks is refused later, by the
// client, with a different message).
func TestFuzzFindingCACertHeaders(t *testing.T) {
	ca, ca2 := selfSignedPEM(t), selfSignedPEM(t)
	checkCACert(t, strings.Replace(ca, "-----BEGIN CERTIFICATE-----\n", "-----BEGIN CERTIFICATE-----\nProc-Type: 4,ENCRYPTED\n\n", 1)+ca2)
}

func checkCACert(t *testing.T, bundle string) {
	err := validateCACert(bundle)
	if err != nil {
		if !isFieldError(err, "ca_cert") {
			t.Fatalf("refusal does not name ca_cert: %v", err)
		}
		return
	}
	// Every certificate the validation counted, and only those.
	want := x509.NewCertPool()
	rest := []byte(bundle)
	n := 0
	for {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if blk.Type != "CERTIFICATE" || err != nil {
			t.Fatalf("accepted a bundle holding a %q block (%v)", blk.Type, err)
		}
		want.AddCert(c)
		n++
	}
	if n == 0 {
		t.Fatal("accepted a bundle with no certificate")
	}
	got := x509.NewCertPool()
	if !got.AppendCertsFromPEM([]byte(bundle)) || !got.Equal(want) {
		t.Fatalf("the client trusts a different set than the %d certificate(s) validated", n)
	}
	if _, err := upstream.New(upstream.Options{Broker: "Fuzz", CACertPEM: bundle}); err != nil {
		t.Fatalf("validated bundle refused by the client: %v", err)
	}
}

// FuzzNormalizeAccounts: the result has no empty, blank-containing or
// duplicate ids, keeps first-seen order, covers every input id, and is a
// fixed point.
func FuzzNormalizeAccounts(f *testing.F) {
	for _, s := range []string{"D12345", "D12345,D67890", " D12345 , D12345 ,G11111", "1899011,,x", "a b", "a\tb", "\u00a0", "a\u2003b", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, csv string) {
		in := strings.Split(csv, ",")
		out, err := normalizeAccounts(in)
		if err != nil {
			if out != nil || !isFieldError(err, "allowed_accounts") {
				t.Fatalf("refusal %v, %v", out, err)
			}
			return
		}
		seen := map[string]bool{}
		for _, a := range out {
			if a == "" || a != strings.TrimSpace(a) || strings.ContainsAny(a, " \t\n") || seen[a] {
				t.Fatalf("bad id %q in %q", a, out)
			}
			seen[a] = true
		}
		var want []string
		for _, a := range in {
			if a = strings.TrimSpace(a); !slices.Contains(want, a) {
				want = append(want, a)
			}
		}
		if !slices.Equal(out, want) {
			t.Fatalf("%q normalised to %q, want %q", in, out, want)
		}
		again, err := normalizeAccounts(out)
		if err != nil || !slices.Equal(again, out) {
			t.Fatalf("not a fixed point: %q -> %q, %v", out, again, err)
		}
	})
}

// FuzzParseDate: RFC 3339 reads as that instant, a plain date as the last
// second of that day, both in UTC; what a config read shows (formatTime)
// parses back to the same second.
func FuzzParseDate(f *testing.F) {
	for _, s := range []string{"2027-01-31", "2027-01-31T00:00:00Z", "2027-01-31T12:30:00+03:00", "2027-01-31T12:30:00.123456789-07:00",
		"2027-02-30", "31.01.2027", "2027-1-3", "0000-01-01", "9999-12-31", "2027-01-31T24:00:00Z", "2027-01-31 12:00:00", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := parseDate(s)
		if err != nil {
			if !got.IsZero() || !strings.Contains(err.Error(), "RFC 3339") {
				t.Fatalf("refusal %v, %v", got, err)
			}
			return
		}
		if got.Location() != time.UTC {
			t.Fatalf("%q read in %v", s, got.Location())
		}
		if r, err := time.Parse(time.RFC3339, s); err == nil {
			if !got.Equal(r) {
				t.Fatalf("%q read as %v, want %v", s, got, r)
			}
		} else if d, err := time.Parse("2006-01-02", s); err == nil {
			if want := d.Add(24*time.Hour - time.Second); !got.Equal(want) {
				t.Fatalf("date %q read as %v, want %v", s, got, want)
			}
		} else {
			t.Fatalf("accepted %q, which is neither form", s)
		}
		if got.Year() >= 0 && got.Year() <= 9999 {
			back, err := parseDate(formatTime(got))
			if err != nil || !back.Equal(got.Truncate(time.Second)) {
				t.Fatalf("%q -> %v shown as %q -> %v, %v", s, got, formatTime(got), back, err)
			}
		}
	})
}

// FuzzParseInternal: a lease's internal data, as pathCredsRead writes it and
// as it comes back JSON-decoded across the plugin boundary, reads back the
// same; arbitrary internal data never panics and yields a config name.
func FuzzParseInternal(f *testing.F) {
	base := time.Date(2026, 3, 1, 10, 0, 0, 123456789, time.UTC).UnixNano()
	f.Add("finam", "a1b2c3d4e5f6a1b2c3d4e5f6", base+int64(15*time.Minute), base+int64(10*time.Minute), "1899011,1899012", false, `{}`)
	f.Add("tbank", "0011", int64(0), base+int64(time.Hour), "", true, `{"config":"x","account_ids":["a",1,null],"readonly":"yes","expires_at":""}`)
	f.Add("chat", "", base, base, "D12345", false, `{"config":"","lease_end":"soon"}`)
	f.Add("x", "y", base, base, "a", true, `{"config":7,"account_ids":"a,b"}`)
	f.Fuzz(func(t *testing.T, config, tokenID string, expiresNs, leaseEndNs int64, accountsCSV string, readonly bool, arbitrary string) {
		var accounts []string
		if accountsCSV != "" {
			accounts = strings.Split(accountsCSV, ",")
		}
		exp, end := time.Unix(0, expiresNs).UTC(), time.Unix(0, leaseEndNs).UTC()
		if expiresNs == 0 {
			exp = time.Time{}
		}
		written := map[string]any{
			"config": config, "token_id": tokenID, "expires_at": formatTimeNano(exp),
			"account_ids": accounts, "readonly": readonly, "lease_end": formatTimeNano(end),
		}
		raw, err := json.Marshal(written)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatal(err)
		}
		in, err := parseInternal(m)
		if config == "" {
			if err == nil {
				t.Fatal("accepted a lease without a config name")
			}
		} else if exp.Year() >= 0 && exp.Year() <= 9999 && end.Year() >= 0 && end.Year() <= 9999 {
			if err != nil {
				t.Fatalf("lease data written by creds does not read back: %v (%s)", err, raw)
			}
			// json.Marshal makes invalid UTF-8 valid: compare what was sent.
			var sent struct {
				Config   string   `json:"config"`
				TokenID  string   `json:"token_id"`
				Accounts []string `json:"account_ids"`
			}
			_ = json.Unmarshal(raw, &sent)
			if in.config != sent.Config || in.tokenID != sent.TokenID || in.readonly != readonly ||
				!in.expiresAt.Equal(exp) || !reflect.DeepEqual(provider.NonNil(in.accounts), provider.NonNil(sent.Accounts)) {
				t.Fatalf("round trip changed the lease: %+v from %s", in, raw)
			}
		}
		var m2 map[string]any
		if json.Unmarshal([]byte(arbitrary), &m2) == nil {
			if in, err := parseInternal(m2); err == nil && in.config == "" {
				t.Fatal("accepted internal data without a config name")
			}
		}
	})
}

// FuzzHostAllowed: with an allow-list set, a base_url passes only if its host
// is listed (exactly, as host:port, or under a *. wildcard) or it is the
// broker's own endpoint.
func FuzzHostAllowed(f *testing.F) {
	f.Add("proxy.example.com,127.0.0.1:8443,*.corp.example", "https://a.corp.example")
	f.Add("proxy.example.com", "https://PROXY.example.com:9443")
	f.Add("*.corp.example", "https://a.corp.example.evil.com")
	f.Add("*.corp.example", "https://corp.example")
	f.Add("*.corp.example", "https://evilcorp.example") // the suffix without its dot
	f.Add("127.0.0.1:8443", "http://127.0.0.1:9999")
	f.Add("proxy.example.com", "https://proxy.example.com.")
	f.Add("xn--80ak6aa92e.com", "https://пример.com")
	f.Fuzz(func(t *testing.T, hostsCSV, rawURL string) {
		base, err := validateBaseURL(rawURL)
		if err != nil {
			return
		}
		var hosts []string
		for _, h := range strings.Split(hostsCSV, ",") {
			h = strings.ToLower(strings.TrimSpace(h))
			if h == "" || strings.ContainsAny(h, "/@ ") || strings.Count(h, "*") > 1 || (strings.Contains(h, "*") && !strings.HasPrefix(h, "*.")) {
				continue // pathSettingsWrite refuses these
			}
			hosts = append(hosts, h)
		}
		if len(hosts) == 0 {
			return
		}
		ms := &mountSettings{AllowedHosts: hosts}
		builtin := map[string]string{"production": "https://api.finam.ru"}
		if !ms.hostAllowed(base, builtin) || base == builtin["production"] {
			return
		}
		u, _ := url.Parse(base)
		host, hostPort := strings.ToLower(u.Hostname()), strings.ToLower(u.Host)
		for _, h := range hosts {
			if s, ok := strings.CutPrefix(h, "*."); ok && strings.HasSuffix(host, "."+s) && len(host) > len(s)+1 {
				return
			}
			if h == host || h == hostPort {
				return
			}
		}
		t.Fatalf("%q passed the allow-list %q", base, hosts)
	})
}

// fuzzSecretValue is the value every secret field carries in FuzzConfigWrite.
const fuzzSecretValue = "fz-LongLivedSecret-6Rt3Yp0Qa"

// secretShape sends a secret field the ways a client can: a string, the
// same field given twice on the CLI (`secret=@a secret=@b` sends a list), a
// JSON object, a one-element list, or a number.
func secretShape(shape uint8, v string) any {
	switch shape % 5 {
	case 1:
		return []any{v, v + "-second"}
	case 2:
		return map[string]any{"value": v}
	case 3:
		return []any{v}
	case 4:
		return 12345678
	}
	return v
}

func snapshot(tb testing.TB, s logical.Storage) map[string]string {
	tb.Helper()
	out := map[string]string{}
	for _, prefix := range []string{configPrefix, tokenPrefix, settingsKey} {
		keys, err := s.List(context.Background(), prefix)
		if err != nil {
			tb.Fatal(err)
		}
		if prefix == settingsKey {
			keys = []string{""}
		}
		for _, k := range keys {
			e, err := s.Get(context.Background(), prefix+k)
			if err != nil {
				tb.Fatal(err)
			}
			if e != nil {
				out[prefix+k] = string(e.Value)
			}
		}
	}
	return out
}

// FuzzConfigWrite writes config/fz through the backend (as Vault does: an
// existence check, then create or update) with fuzzed field values, over an
// existing config or none. Properties: never a panic; a rejected write
// changes nothing stored under config/, token/ or settings; no error and no
// response shows a secret value, whatever shape it was sent in; an accepted
// config's endpoint is https or loopback, and a read of it shows each secret
// only as <field>_set.
func FuzzConfigWrite(f *testing.F) {
	w := newConfigWriter(f)
	ca := selfSignedPEM(f)

	type seed struct {
		provider, env, baseURL, caCert, ttl, maxTTL, accounts, extraKey, extraVal string
		shape                                                                     uint8
		verify, existing                                                          bool
	}
	for _, s := range []seed{
		{"finam", "", "SANDBOX", "", "5m", "", "", "", "", 0, true, false},
		{"finam", "", "SANDBOX", "", "", "", "1899011", "require_readonly", "true", 0, true, true},
		{"finam", "production", "https://proxy.example.com/", ca, "1h", "2h", "a, b,a", "", "", 0, false, false},
		{"finam", "", "", "", "", "", "", "", "", 4, false, false},
		{"tinvest", "sandbox", "http://127.0.0.1:1/rest", "", "", "", "", "validation_interval", "30s", 0, false, false},
		{"alor", "sandbox", "", "", "", "", "D12345", "refresh_token_expires_at", "2099-01-31", 0, false, false},
		{"alor", "", "", "", "", "", "", "refresh_token_expires_at", "2001-01-01", 0, false, true},
		{"chatapp", "", "", "", "", "", "", "make_budget", "101", 0, false, false},
		{"chatapp", "", "", "", "", "", "", "rotation_fraction", "0.25", 0, false, false},
		{"moex", "", "", "", "", "", "", "", "", 0, false, false},
		{"finam", "", "http://example.com", "", "", "", "", "", "", 0, false, true},
		{"finam", "", "", "not pem", "", "", "", "", "", 0, false, false},
		{"finam", "", "", "", "2h", "1h", "", "colour", "blue", 0, false, false},
		{"finam", "", "", "", "soon", "", "", "", "", 0, false, true},
		{"finam", "", "", "", "", "", "x,,y", "require_readonly", "maybe", 0, false, false},
	} {
		f.Add(s.provider, s.env, s.baseURL, s.caCert, s.ttl, s.maxTTL, s.accounts, s.extraKey, s.extraVal, s.shape, s.verify, s.existing)
	}
	f.Fuzz(w.check)
}

// TestFuzzFindingSecretInConversionError: a secret field sent as anything but
// a string (a list, as the CLI sends `secret=@a secret=@b`; a one-element
// list; a JSON object) is refused with the framework's conversion error,
// which quotes the value: the long-lived secret shows in the 400 response
// and so, unhashed, in the audit log's error field.
func TestFuzzFindingSecretInConversionError(t *testing.T) {
	w := newConfigWriter(t)
	for _, c := range []struct {
		name     string
		provider string
		shape    uint8
		existing bool
	}{
		{"finam secret given twice", "finam", 1, false},
		{"finam secret as an object", "finam", 2, false},
		{"finam secret as a one-element list, over an existing config", "finam", 3, true},
		{"chatapp password given twice", "chatapp", 1, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			w.check(t, c.provider, "", "", "", "", "", "", "", "", c.shape, false, c.existing)
		})
	}
}

// configWriter runs one fuzzed config write against a fresh backend, with a
// sandbox for the writes that verify.
type configWriter struct{ url string }

func newConfigWriter(tb testing.TB) *configWriter {
	// Every fuzzed write may verify: lift the broker's rate limit.
	sb := sandbox.New(sandbox.Options{FinamRateLimit: 1 << 30})
	srv := httptest.NewServer(sb)
	tb.Cleanup(srv.Close)
	sb.AddFinamSecret(fuzzSecretValue, []string{"1899011"}, true)
	return &configWriter{url: srv.URL}
}

func (w *configWriter) check(t *testing.T, prov, env, baseURL, caCert, ttl, maxTTL, accounts, extraKey, extraVal string, shape uint8, verify, existing bool) {
	ctx := context.Background()
	conf := logical.TestBackendConfig()
	storage := &logical.InmemStorage{}
	conf.StorageView = storage
	lb, err := Factory("v0.0.0-fuzz")(ctx, conf)
	if err != nil {
		t.Fatal(err)
	}
	b := lb.(*backend)
	defer b.Clean(ctx)

	send := func(op logical.Operation, path string, data map[string]any) (*logical.Response, error) {
		req := &logical.Request{Operation: op, Path: path, Storage: storage, Data: data}
		if op == logical.UpdateOperation {
			checked, exists, err := b.HandleExistenceCheck(ctx, req)
			if err != nil {
				return nil, err
			}
			if checked && !exists {
				req.Operation = logical.CreateOperation
			}
		}
		return b.HandleRequest(ctx, req)
	}
	if existing {
		resp, err := send(logical.UpdateOperation, "config/fz", map[string]any{"provider": "finam", "secret": fuzzSecretValue, "base_url": w.url, "ttl": "10m"})
		if err != nil || resp.IsError() {
			t.Fatalf("writing the existing config: %v %v", err, resp)
		}
	}
	// The write never reaches a host other than the sandbox: verify only
	// against it, and without verify nothing is sent at all.
	if baseURL == "SANDBOX" || verify {
		baseURL = w.url
		if prov == "tinvest" {
			baseURL += sandbox.TInvestPrefix
		}
	}
	data := map[string]any{"verify": verify}
	for k, v := range map[string]string{"provider": prov, "environment": env, "base_url": baseURL, "ca_cert": caCert, "ttl": ttl, "max_ttl": maxTTL, "allowed_accounts": accounts} {
		if v != "" {
			data[k] = v
		}
	}
	if extraKey != "" {
		data[extraKey] = extraVal
	}
	// The provider's required secret fields, from its Spec; an unknown
	// provider gets one field some provider takes.
	secretFieldsSent := []string{b.providerFieldNames()[0]}
	if spec, ok := b.specs[prov]; ok {
		secretFieldsSent = nil
		for _, f := range spec.Fields {
			if f.Secret && f.Required {
				secretFieldsSent = append(secretFieldsSent, f.Name)
			}
		}
	}
	for _, k := range secretFieldsSent {
		data[k] = secretShape(shape, fuzzSecretValue)
	}
	secrets := []string{fuzzSecretValue, fuzzSecretValue + "-second"}
	// What the write sent besides the secrets may be quoted back.
	sent := strings.Join([]string{prov, env, baseURL, caCert, ttl, maxTTL, accounts, extraKey, extraVal}, "\x00")

	before := snapshot(t, storage)
	resp, err := send(logical.UpdateOperation, "config/fz", data)
	after := snapshot(t, storage)

	shown := fmt.Sprint(err)
	if resp != nil {
		b, _ := json.Marshal(resp)
		shown += string(b)
	}
	if s := brokertest.Shown(shown, sent, secrets...); s != "" {
		t.Fatalf("the response to a config write (shape %d) shows the secret %q: %s", shape%5, s, shown)
	}
	rejected := err != nil || (resp != nil && resp.IsError())
	if rejected {
		if !reflect.DeepEqual(before, after) {
			t.Fatalf("a rejected write changed storage (%v): %v -> %v", shown, slices.Sorted(maps.Keys(before)), slices.Sorted(maps.Keys(after)))
		}
		return
	}
	cfg, err := readConfig(ctx, storage, "fz")
	if err != nil || cfg == nil {
		t.Fatalf("accepted write stored no config: %v", err)
	}
	if cfg.BaseURL != "" {
		if _, err := validateBaseURL(cfg.BaseURL); err != nil {
			t.Fatalf("stored base_url %q does not validate: %v", cfg.BaseURL, err)
		}
	}
	for _, v := range cfg.Secrets {
		if v != strings.TrimSpace(v) || v == "" {
			t.Fatalf("stored secret %q is not trimmed", v)
		}
	}
	read, err := send(logical.ReadOperation, "config/fz", nil)
	if err != nil || read == nil || read.IsError() {
		t.Fatalf("reading the accepted config: %v %v", err, read)
	}
	rb, _ := json.Marshal(read)
	stored := slices.DeleteFunc(append(secrets, cfg.secretValues()...), func(s string) bool { return len(s) < 4 })
	if s := brokertest.Shown(string(rb), sent, stored...); s != "" {
		t.Fatalf("a config read shows the secret %q: %s", s, rb)
	}
	for _, k := range secretFieldsSent {
		if set, ok := read.Data[k+"_set"].(bool); !ok || !set {
			t.Fatalf("%s_set is %v after writing %s", k, read.Data[k+"_set"], k)
		}
	}
}
