// Package provider defines what the backend needs to know about one broker.
//
// A provider knows the broker's protocol and token semantics and nothing of
// Vault: the backend owns storage, leases, caching and policy. Adding a broker
// is one package implementing Provider and one line in the backend's registry.
package provider

import (
	"context"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// Issuance says what a lease hands out: a short-lived token the broker
// mints from the long-lived secret, or the long-lived token itself. It
// decides what a lease renew means; a revoke only ever ends the lease.
type Issuance int

const (
	// Minted providers exchange the long-lived secret for a short-lived token
	// with an expiry set by the broker. Renew extends a lease up to that
	// expiry, never past it.
	Minted Issuance = iota + 1
	// Passthrough providers hand out the long-lived token itself after
	// validating it. Renew asks the broker to validate it again.
	Passthrough
)

// Field describes one provider-specific config field.
type Field struct {
	Name     string
	Secret   bool // write-only, never shown, trimmed of surrounding whitespace
	Required bool // required when the config is created
	// Description says what the field holds for this provider, without
	// naming the provider: the backend prefixes it with the provider's name
	// and joins the descriptions of providers sharing the field.
	Description string
}

// Quota is a daily limit the broker puts on one upstream call that the
// provider may have to spend (ChatApp's tokens.make, 100 a day per login).
// The backend counts the calls durably per Key and per UTC day, refuses
// past the config's budget (the make_budget field), and shows the day's
// count in config reads (makes_today).
type Quota struct {
	// Call names the limited call in messages ("tokens.make").
	Call string
	// Limit is the broker's own daily limit: the highest budget a config
	// may set.
	Limit int
	// DefaultBudget is the budget of a config that sets none; below Limit,
	// so some calls are left for a human.
	DefaultBudget int
	// Key returns what the broker counts the quota against, from the
	// config's secret fields (a login): configs with the same key share
	// one count. The backend stores the count under a hash of it, so it
	// must not change between releases (the day's count would reset), and
	// it should be one no other provider's Key can return.
	Key func(secrets map[string]string) string
}

// Spec is the static description of a provider.
type Spec struct {
	Name string
	// Display is the broker's name as users know it, used in messages.
	Display  string
	Issuance Issuance
	// Fields are the provider-specific fields this provider accepts.
	Fields []Field
	// Environments maps an environment name to the broker's default base URL.
	Environments map[string]string
	// DefaultTTL is the lease TTL when the config sets none. Zero means
	// "as long as the token lives" (Minted providers).
	DefaultTTL time.Duration
	// RotatesSecret is true when Issue may replace the long-lived secret
	// (Token.Rotated): the backend then records its intent before the call
	// (a write-ahead record, recovered after a crash), keeps the rotated
	// secret alive with periodic refreshes, offers rotate-root and takes
	// the rotation_fraction option.
	RotatesSecret bool
	// Quota, when set, is a daily limit on a call Issue may spend; Issue
	// then gets Request.ReserveQuota. Independent of RotatesSecret.
	Quota *Quota
	// SecretExpiry, when set, reads when the long-lived secret expires from
	// the secret itself (BCS's refresh token is a JWT with a fixed exp); zero
	// when the secret does not say. Such an expiry is fixed: rotating the
	// secret never extends it. The backend records it at a config write
	// that brings the secret, shows it (secret_expires_at), warns before it
	// (expiry_warning), refuses to use the secret after it, and does not
	// refresh a rotating secret ahead just to keep it alive. An error means
	// the value cannot be a secret the broker issued: the write is refused
	// with a 400 carrying the error's text (which names the field), and
	// nothing is sent anywhere.
	SecretExpiry func(secrets map[string]string) (time.Time, error)
	// RenewSecret says how the operator replaces an expired long-lived
	// secret at the broker ("issue a new token in the BCS web terminal");
	// it is added to the refusal once the secret's expiry has passed.
	RenewSecret string
	// DeclaredExpiry is true when the broker's portal shows when the
	// long-lived secret expires but its API does not: the operator declares
	// it (refresh_token_expires_at) and the backend warns before it
	// (expiry_warning) and refuses to use the secret after.
	DeclaredExpiry bool
	// OptionNotes add a provider's own sentence to the description of an
	// option that applies to it (keep_alive, make_budget, ...), by option
	// name: what the broker does that makes the option matter.
	OptionNotes map[string]string
	// DetailsHelp lists, for creds path help, what Token.Details holds and
	// anything particular about the creds this provider returns.
	DetailsHelp string
	// RetireNote says what kills tokens already handed out, since retiring
	// cannot (config/<name>/retire returns it as "note").
	RetireNote string
	// TrustedRoots, when set, are CAs trusted besides the system roots for
	// the broker's own hosts only (T-Invest's chain ends at the Russian
	// Trusted Root CA, which system stores lack). A config's ca_cert
	// replaces both.
	TrustedRoots *upstream.HostRoots
	// NarrowsAccounts is true when the broker narrows a token to the
	// accounts it is asked for at issue (ALOR's allowedPortfolios): a role
	// with its own allowed_accounts then gets a token of its own, minted
	// narrowed. For any other broker a role's accounts only check the
	// config's token.
	NarrowsAccounts bool
	// ReportsNoAccess is true when the broker tells nothing of a token's
	// accounts or trading rights: require_readonly and allowed_accounts
	// cannot be checked, so a config refuses them rather than pretend.
	ReportsNoAccess bool
	// Client-side limits kept under the broker's published ones, so many
	// leases renewing at once never earn a 429: requests a minute (per
	// operation when RatePerOp) and requests in flight. Zero: none.
	RatePerMinute int
	RatePerOp     bool
	MaxConcurrent int
}

// Request is what a provider receives for one upstream operation.
type Request struct {
	BaseURL string
	Client  *upstream.Client
	// Secrets holds the long-lived secret fields by field name: for a
	// rotating provider, the newest values the broker returned.
	Secrets map[string]string
	// Written holds the secret fields as the operator wrote them to the
	// config. It differs from Secrets once the broker rotated a field; a
	// provider whose broker may refuse the rotated value while the written
	// one still works (BCS) may present the written value instead, once.
	Written map[string]string
	// AllowedAccounts lets a broker that can narrow a token do so.
	AllowedAccounts []string
	// RequireReadOnly is the config's require_readonly. A provider that
	// can tell why a token is not proven read-only refuses it itself,
	// wrapping ErrGuard with the broker's evidence in words; the backend's
	// own check of Token.ReadOnly still applies to every provider.
	RequireReadOnly bool
	// Environment is the config's environment name ("production", "sandbox").
	Environment string
	// ReserveQuota, set when the Spec declares a Quota, must be called and
	// succeed before the provider spends one call of it (ChatApp's
	// tokens.make). It counts the call durably and refuses past the
	// config's budget. A nil ReserveQuota forbids such calls.
	ReserveQuota func(ctx context.Context) error
	// Now is the backend's clock: a provider stamps what the broker said
	// (receipt times, lifetimes) by it, so the backend judges a token's
	// freshness on the same clock it was stamped with. Read it through
	// Time; nil (a provider's own tests) is the system clock.
	Now func() time.Time
}

// Time reads the request's clock (Now), or the system clock when Now is nil.
func (r Request) Time() time.Time {
	if r.Now == nil {
		return time.Now()
	}
	return r.Now()
}

// Token is a credential obtained from (or validated by) the broker, with what
// the broker reported about it.
type Token struct {
	AccessToken string
	// IssuedAt and ExpiresAt bound the token's life as the broker reported
	// it, corrected for clock skew. ExpiresAt is zero for a token whose
	// expiry the broker does not tell (Passthrough).
	IssuedAt  time.Time
	ExpiresAt time.Time
	// AccountIDs are the accounts the token reaches.
	AccountIDs []string
	// ReadOnly is true when the broker reports the token cannot trade.
	ReadOnly bool
	// Details holds provider-specific facts returned with the creds
	// (Finam md_permissions, ...). Values must be JSON-friendly.
	Details map[string]any
	// Rotated holds long-lived secret fields the broker replaced while
	// issuing (ChatApp's refresh token). The backend stores them before the
	// token is handed out: the old values may no longer work.
	Rotated map[string]string
	// SecretExpiresAt is when the (rotated) long-lived secret expires, where
	// the broker says; zero when unknown.
	SecretExpiresAt time.Time
}

// NonNil returns s, or an empty list when s is nil, so that JSON shows []
// rather than null (Token.Details values, account lists).
func NonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// RotatedError is an Issue failure that comes after the broker replaced the
// long-lived secret (an answer carrying a new refresh token but some other
// field the provider cannot accept). The old values may no longer work, so
// the backend stores Rotated and SecretExpiresAt exactly as it would from a
// Token, and then reports Err. A provider returns it whenever an answer
// carries a rotated secret, whatever else is wrong with the answer.
type RotatedError struct {
	Rotated map[string]string
	// SecretExpiresAt is zero when the answer did not say (or said it badly).
	SecretExpiresAt time.Time
	Err             error
}

func (e *RotatedError) Error() string { return e.Err.Error() }
func (e *RotatedError) Unwrap() error { return e.Err }

// Provider is one broker.
type Provider interface {
	Spec() Spec
	// Issue obtains a token: mints one from the long-lived secret (Minted),
	// or validates the long-lived token and reports what it can do
	// (Passthrough). Errors should be *upstream.Error where the broker was
	// reached.
	Issue(ctx context.Context, req Request) (*Token, error)
}
