package backend

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// brokerConfig is what config/<name> stores.
type brokerConfig struct {
	Provider    string `json:"provider"`
	Environment string `json:"environment"`
	// BaseURL is the operator's override; empty means the environment's.
	BaseURL string `json:"base_url,omitempty"`
	CACert  string `json:"ca_cert,omitempty"`
	// Secrets are the provider's long-lived secret fields by name.
	Secrets         map[string]string `json:"secrets"`
	TTL             time.Duration     `json:"ttl"`
	MaxTTL          time.Duration     `json:"max_ttl"`
	RequireReadOnly bool              `json:"require_readonly"`
	AllowedAccounts []string          `json:"allowed_accounts,omitempty"`
	// ValidationInterval is how often a passthrough token is validated to
	// keep it alive; zero means the default.
	ValidationInterval time.Duration `json:"validation_interval,omitempty"`
	// NoKeepAlive turns the background validation off: a token nothing
	// reads then dies of the broker's own inactivity expiry, if it has one.
	NoKeepAlive bool `json:"no_keep_alive,omitempty"`
	// SecretExpiresAt is when the long-lived secret dies, where the operator
	// knows it (Spec.DeclaredExpiry: the portal shows it); zero when unknown.
	SecretExpiresAt time.Time `json:"secret_expires_at,omitzero"`
	// ExpiryWarning is how long before SecretExpiresAt to start warning.
	ExpiryWarning time.Duration `json:"expiry_warning,omitempty"`
	// MakeBudget caps the calls of the provider's Spec.Quota a day for
	// this config's quota key (the make_budget field: the first quota
	// counted makes).
	MakeBudget int `json:"make_budget,omitempty"`
	// RotationFraction is the share of the refresh token's life after which
	// it is refreshed proactively (Spec.RotatesSecret); zero means one half.
	RotationFraction float64   `json:"rotation_fraction,omitempty"`
	UpdatedAt        time.Time `json:"updated_at"`
	// Instance tells this config from an earlier one of the same name: a
	// random id set on create (empty for configs written before it was
	// kept).
	Instance string `json:"instance,omitempty"`
}

// endpointKey fingerprints where the config's secrets go: the broker and
// its endpoint. A secret the broker rotated is bound to the endpoint that
// issued it and never sent to another.
func (a *brokerConfig) endpointKey() string {
	return fingerprint(a.Provider, a.Environment, a.BaseURL, a.CACert)
}

// upstreamHash fingerprints what a token depends on: the endpoint, the
// secrets and the narrowing. A token record says which config its token was
// obtained under by it.
func (a *brokerConfig) upstreamHash() string {
	return fingerprint(a.Provider, a.Environment, a.BaseURL, a.CACert, a.Secrets, a.AllowedAccounts)
}

// sameUpstream reports whether tokens obtained under a still hold under b.
func (a *brokerConfig) sameUpstream(b *brokerConfig) bool {
	return a.upstreamHash() == b.upstreamHash()
}

// sameEndpoint reports whether a's secrets would go where b's go.
func (a *brokerConfig) sameEndpoint(b *brokerConfig) bool { return a.endpointKey() == b.endpointKey() }

func fingerprint(parts ...any) string {
	h := sha256.New()
	_ = json.NewEncoder(h).Encode(parts)
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// defaultExpiryWarning: a month's notice to create a new refresh token.
const defaultExpiryWarning = 30 * 24 * time.Hour

// expiryWarning returns a warning when the long-lived secret expires within
// the warning window (or has expired), else "".
func (a *brokerConfig) expiryWarning(now time.Time) string {
	if a.SecretExpiresAt.IsZero() {
		return ""
	}
	left := a.SecretExpiresAt.Sub(now)
	switch {
	case left <= 0:
		return fmt.Sprintf("the %s long-lived secret expired at %s: create a new one at the broker and write it to this config", a.Provider, formatTime(a.SecretExpiresAt))
	case left < cmp.Or(a.ExpiryWarning, defaultExpiryWarning):
		return fmt.Sprintf("the %s long-lived secret expires at %s (in %d days): create a new one at the broker and write it to this config", a.Provider, formatTime(a.SecretExpiresAt), int(left.Hours()/24))
	}
	return ""
}

// secretValues lists the long-lived secrets, for scrubbing messages.
func (a *brokerConfig) secretValues() []string {
	out := make([]string, 0, len(a.Secrets))
	for _, v := range a.Secrets {
		out = append(out, v)
	}
	return out
}

func readConfig(ctx context.Context, s logical.Storage, name string) (*brokerConfig, error) {
	e, err := s.Get(ctx, configPrefix+name)
	if err != nil {
		return nil, fmt.Errorf("reading config %q: %w", name, err)
	}
	if e == nil {
		return nil, nil
	}
	var c brokerConfig
	if err := e.DecodeJSON(&c); err != nil {
		return nil, fmt.Errorf("%w: config %q: %w", errUndecodable, name, err)
	}
	return &c, nil
}

func writeConfig(ctx context.Context, s logical.Storage, name string, c *brokerConfig) error {
	e, err := logical.StorageEntryJSON(configPrefix+name, c)
	if err != nil {
		return fmt.Errorf("encoding config %q: %w", name, err)
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("storing config %q: %w", name, err)
	}
	return nil
}

// tokenRecord is what token/<name> stores: the current token and the status
// of the last refresh, so a restart neither calls the broker again nor forgets a failure.
type tokenRecord struct {
	Token *storedToken `json:"token,omitempty"`
	// Narrowed are the tokens the broker narrowed for roles (ALOR
	// allowedPortfolios), by request key (see tokenRequest). They live and
	// die with Token: same secret, same retire epoch.
	Narrowed map[string]*storedToken `json:"narrowed,omitempty"`
	// Rotated are long-lived secret fields the broker replaced (a rotated
	// refresh token); they supersede the config's values, at the endpoint
	// that issued them only.
	Rotated map[string]string `json:"rotated,omitempty"`
	// RotatedAt is the endpointKey of the endpoint that issued Rotated.
	// Records from before it was kept have it empty: their rotation came
	// from the stored config's endpoint.
	RotatedAt string `json:"rotated_at,omitempty"`
	// Prior is the rotation of the endpoint the config had before a write
	// that moved it: if that write stored this record but not the config,
	// the old config finds its own rotated secret here.
	Prior *rotation `json:"prior,omitempty"`
	// SecretExpiresAt is when the broker said the (rotated) long-lived
	// secret expires.
	SecretExpiresAt time.Time `json:"secret_expires_at,omitzero"`
	// RetiredBefore: no token obtained before this is handed out (incident
	// retirement through config/<name>/retire).
	RetiredBefore time.Time `json:"retired_before,omitzero"`
	// RetireEpoch counts retirements; a token obtained under an older epoch
	// is never handed out. Unlike RetiredBefore it needs no agreement
	// between the clocks of HA nodes.
	RetireEpoch uint64 `json:"retire_epoch,omitempty"`
	// ConfigHash is the upstreamHash of the config the token was obtained
	// under; a record that does not match the stored config (a config
	// write that failed half way) has its token dropped on load.
	ConfigHash  string    `json:"config_hash,omitempty"`
	LastRefresh time.Time `json:"last_refresh,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// tokenOf is the token of a request key ("" for the config's own).
func (r tokenRecord) tokenOf(key string) *storedToken {
	if key == "" {
		return r.Token
	}
	return r.Narrowed[key]
}

// withToken is r with key's token replaced (nil removes it).
func (r tokenRecord) withToken(key string, tok *storedToken) tokenRecord {
	if key == "" {
		r.Token = tok
		return r
	}
	n := maps.Clone(r.Narrowed)
	if n == nil {
		n = map[string]*storedToken{}
	}
	if tok == nil {
		delete(n, key)
	} else {
		n[key] = tok
	}
	r.Narrowed = n
	return r
}

// rotation is one endpoint's rotated secrets.
type rotation struct {
	Secrets   map[string]string `json:"secrets"`
	Endpoint  string            `json:"endpoint"`
	ExpiresAt time.Time         `json:"expires_at,omitzero"`
}

// boundTo is the record as cfg may use it: a token obtained under other
// settings is dropped (a config write that failed half way), and a rotated
// secret is kept only for the endpoint that issued it.
func (r tokenRecord) boundTo(cfg *brokerConfig) tokenRecord {
	if r.ConfigHash != "" && r.ConfigHash != cfg.upstreamHash() {
		r.Token, r.Narrowed = nil, nil
	}
	key := cfg.endpointKey()
	if len(r.Rotated) > 0 && r.RotatedAt == "" {
		// A record from before rotations were bound. Its rotation came from
		// the stored config's endpoint only if the record was written for
		// that config: a half-failed write of the old core left another
		// endpoint's rotation beside the old config, with that write's hash.
		if r.ConfigHash == "" || r.ConfigHash == cfg.upstreamHash() {
			r.RotatedAt = key
		} else {
			r.RotatedAt = "unknown"
		}
	}
	if len(r.Rotated) > 0 && r.RotatedAt != key {
		r.Rotated, r.RotatedAt, r.SecretExpiresAt = nil, "", time.Time{}
	}
	if p := r.Prior; len(r.Rotated) == 0 && p != nil && p.Endpoint == key {
		r.Rotated, r.RotatedAt, r.SecretExpiresAt = p.Secrets, key, p.ExpiresAt
	}
	r.Prior = nil
	return r
}

// storedToken is a provider.Token as persisted and cached.
type storedToken struct {
	ID          string `json:"id"`
	AccessToken string `json:"access_token"`
	// RefreshStarted is when this host started the refresh that produced the token,
	// on its own clock (immune to the broker's clock skew).
	RefreshStarted time.Time `json:"minted_at"`
	// Epoch is the config's RetireEpoch when the refresh started.
	Epoch      uint64    `json:"epoch,omitempty"`
	IssuedAt   time.Time `json:"issued_at"`
	ExpiresAt  time.Time `json:"expires_at,omitzero"`
	AccountIDs []string  `json:"account_ids"`
	ReadOnly   bool      `json:"readonly"`
	// Details is the provider's Token.Details as JSON (see toStored): the
	// stored form is unchanged, an object under "details".
	Details json.RawMessage `json:"details,omitempty"`
}

// details decodes what the broker reported about the token, to be shown.
// Bytes that are not an object (a record damaged in storage) show nothing
// rather than failing the read that serves the token.
func (t *storedToken) details() map[string]any {
	if len(t.Details) == 0 {
		return nil
	}
	// Numbers stay as the provider wrote them (json.Number), not float64.
	dec := json.NewDecoder(bytes.NewReader(t.Details))
	dec.UseNumber()
	var m map[string]any
	if dec.Decode(&m) != nil {
		return nil
	}
	return m
}

// errUndecodable: a record is in storage but cannot be decoded (as opposed
// to storage failing to answer, which is worth asking again).
var errUndecodable = errors.New("undecodable record")

func readTokenRecord(ctx context.Context, s logical.Storage, name string) (tokenRecord, error) {
	var rec tokenRecord
	e, err := s.Get(ctx, tokenPrefix+name)
	if err != nil {
		return rec, fmt.Errorf("reading token of %q: %w", name, err)
	}
	if e == nil {
		return rec, nil
	}
	if err := e.DecodeJSON(&rec); err != nil {
		return tokenRecord{}, fmt.Errorf("%w: token of %q: %w", errUndecodable, name, err)
	}
	return rec, nil
}

func writeTokenRecord(ctx context.Context, s logical.Storage, name string, rec tokenRecord) error {
	e, err := logical.StorageEntryJSON(tokenPrefix+name, rec)
	if err != nil {
		return fmt.Errorf("encoding token of %q: %w", name, err)
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("storing token of %q: %w", name, err)
	}
	return nil
}
