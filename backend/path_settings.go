package backend

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

const settingsKey = "settings"

// mountSettings are the mount-wide rules an operator sets once, above the
// people who write configs.
type mountSettings struct {
	// AllowedHosts, when set, are the only hosts (besides the brokers'
	// built-in endpoints) a config's base_url may point at, so whoever can
	// write a config cannot send a secret to a host of their choosing.
	AllowedHosts []string `json:"allowed_hosts,omitempty"`
}

func (b *backend) pathSettings() []*framework.Path {
	return []*framework.Path{{
		Pattern: "settings$",
		Fields: map[string]*framework.FieldSchema{
			"allowed_hosts": {Type: framework.TypeCommaStringSlice,
				Description: "Hosts a config's base_url may use besides the brokers' own endpoints: exact names (api.example.com, host:port) or one leading wildcard label (*.example.com). Empty: any https host."},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.ReadOperation:   &framework.PathOperation{Callback: b.pathSettingsRead, Summary: "Read the mount-wide settings."},
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathSettingsWrite, Summary: "Set the mount-wide settings."},
		},
		HelpSynopsis:    "Mount-wide settings: the hosts a config's base_url may point at.",
		HelpDescription: "Give only operators write access here. With allowed_hosts set, a config write with a base_url on another host is refused, and an existing config on such a host can issue no token: the secret is never sent there.",
	}}
}

func (b *backend) settings(ctx context.Context, s logical.Storage) (*mountSettings, error) {
	if v := b.settingsCache.Load(); v != nil {
		return v, nil
	}
	var ms mountSettings
	e, err := s.Get(ctx, settingsKey)
	if err != nil {
		return nil, fmt.Errorf("reading settings: %w", err)
	}
	if e != nil {
		if err := e.DecodeJSON(&ms); err != nil {
			return nil, fmt.Errorf("decoding settings: %w", err)
		}
	}
	b.settingsCache.Store(&ms)
	return &ms, nil
}

func (b *backend) pathSettingsRead(ctx context.Context, req *logical.Request, _ *framework.FieldData) (*logical.Response, error) {
	ms, err := b.settings(ctx, req.Storage)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{"allowed_hosts": provider.NonNil(ms.AllowedHosts)}}, nil
}

func (b *backend) pathSettingsWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	for k := range d.Raw {
		if _, ok := d.Schema[k]; !ok {
			return logical.ErrorResponse("%s: unknown field", k), nil
		}
	}
	ms := mountSettings{}
	if v, ok := d.GetOk("allowed_hosts"); ok {
		for _, h := range v.([]string) {
			h = strings.ToLower(strings.TrimSpace(h))
			if h == "" {
				continue
			}
			if strings.ContainsAny(h, "/@ ") || strings.Count(h, "*") > 1 || (strings.Contains(h, "*") && (!strings.HasPrefix(h, "*.") || len(h) == 2)) {
				return logical.ErrorResponse("allowed_hosts: %q is not a host name, host:port or *.domain", h), nil
			}
			ms.AllowedHosts = append(ms.AllowedHosts, h)
		}
	}
	e, err := logical.StorageEntryJSON(settingsKey, ms)
	if err != nil {
		return nil, err
	}
	if err := req.Storage.Put(ctx, e); err != nil {
		return nil, fmt.Errorf("storing settings: %w", err)
	}
	b.settingsCache.Store(&ms)
	return nil, nil
}

// hostAllowed reports whether rawURL's host passes the allow-list. The
// brokers' built-in endpoints always pass.
func (ms *mountSettings) hostAllowed(rawURL string, builtin map[string]string) bool {
	if len(ms.AllowedHosts) == 0 {
		return true
	}
	for _, u := range builtin {
		if u == rawURL {
			return true
		}
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return false
	}
	host, hostPort := strings.ToLower(u.Hostname()), strings.ToLower(u.Host)
	for _, a := range ms.AllowedHosts {
		if suffix, ok := strings.CutPrefix(a, "*."); ok {
			// One or more labels before the suffix; an empty suffix ("*.")
			// must not match every host ending in a dot.
			if suffix != "" && len(host) > len(suffix)+1 && strings.HasSuffix(host, "."+suffix) {
				return true
			}
			continue
		}
		if _, _, err := net.SplitHostPort(a); err == nil {
			if a == hostPort {
				return true
			}
		} else if a == host {
			return true
		}
	}
	return false
}
