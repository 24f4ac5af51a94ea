package backend

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// fieldError is a rejected input; its text names the field.
type fieldError struct {
	field string
	msg   string
}

func (e *fieldError) Error() string { return fmt.Sprintf("%s: %s", e.field, e.msg) }

func badField(field, format string, args ...any) error {
	return &fieldError{field: field, msg: fmt.Sprintf(format, args...)}
}

// validateBaseURL requires https, except for loopback hosts (a local proxy or
// test double), and refuses parts that could smuggle credentials or change
// the broker's paths.
func validateBaseURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "", badField("base_url", "must be an absolute URL such as https://api.example.com")
	}
	if u.User != nil {
		return "", badField("base_url", "must not contain credentials")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", badField("base_url", "must not have a query or fragment")
	}
	switch u.Scheme {
	case "https":
	case "http":
		if !isLoopback(u.Hostname()) {
			return "", badField("base_url", "must use https (http is allowed only for loopback addresses)")
		}
	default:
		return "", badField("base_url", "scheme must be https")
	}
	return strings.TrimRight(u.String(), "/"), nil
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// validateCACert requires at least one parseable certificate and nothing
// else in the bundle.
func validateCACert(pemText string) error {
	rest := []byte(pemText)
	n := 0
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return badField("ca_cert", "PEM block %q is not a CERTIFICATE", blk.Type)
		}
		if len(blk.Headers) > 0 {
			// Go's trust pool silently skips such blocks: refuse rather
			// than trust fewer certificates than were validated.
			return badField("ca_cert", "certificate %d has PEM headers; remove them", n+1)
		}
		if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
			return badField("ca_cert", "certificate %d does not parse: %v", n+1, err)
		}
		n++
	}
	if n == 0 {
		return badField("ca_cert", "holds no PEM certificate")
	}
	if len(strings.TrimSpace(string(rest))) > 0 {
		return badField("ca_cert", "has trailing data that is not PEM")
	}
	return nil
}

// normalizeAccounts trims, drops duplicates and refuses empty entries.
func normalizeAccounts(in []string) ([]string, error) {
	seen := map[string]bool{}
	out := make([]string, 0, len(in))
	for _, a := range in {
		a = strings.TrimSpace(a)
		if a == "" {
			return nil, badField("allowed_accounts", "has an empty account id")
		}
		if strings.ContainsAny(a, " \t\n") {
			return nil, badField("allowed_accounts", "account id %q contains whitespace", a)
		}
		if !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	return out, nil
}

// Vault's field conversion quotes a value it cannot convert in its error
// ("got unconvertible type ..., value: ..."). For a secret field given as a
// list or an object that would echo the secret, so those requests are
// refused here, before the framework sees them, with a message that names
// the field and not the value.

func (b *backend) secretTypeError(req *logical.Request) error {
	if !strings.HasPrefix(req.Path, "config/") || req.Data == nil {
		return nil
	}
	for _, name := range b.providerFieldNames() {
		if v, ok := req.Data[name]; ok {
			if _, isString := v.(string); !isString && v != nil {
				return fmt.Errorf("%s: must be a string", name)
			}
		}
	}
	return nil
}

// HandleRequest refuses every request on storage of a newer schema
// (migrations.go) and secret fields of the wrong type, then defers to the
// framework.
func (b *backend) HandleRequest(ctx context.Context, req *logical.Request) (*logical.Response, error) {
	if handled, err := b.refusal(req); handled {
		return nil, err
	}
	if err := b.secretTypeError(req); err != nil {
		return logical.ErrorResponse(err.Error()), nil
	}
	return b.Backend.HandleRequest(ctx, req)
}

// HandleExistenceCheck does the same for the existence check, which Vault
// runs before the request and which also converts fields.
func (b *backend) HandleExistenceCheck(ctx context.Context, req *logical.Request) (bool, bool, error) {
	// On storage of a newer schema the check would read it; "not checked"
	// lets the request through to HandleRequest's refusal.
	if b.refused.Load() != nil {
		return false, false, nil
	}
	if err := b.secretTypeError(req); err != nil {
		return false, false, errutil.UserError{Err: err.Error()}
	}
	return b.Backend.HandleExistenceCheck(ctx, req)
}
