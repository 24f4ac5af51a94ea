// Package tinvest is the T-Invest API provider (formerly Tinkoff Invest API).
//
// T-Invest has no API to mint, exchange or revoke tokens: the plugin keeps the
// long-lived token, validates it (UsersService/GetInfo and GetAccounts on the
// REST gateway) and hands out the token itself. The access levels GetAccounts
// reports are the only way the kind of token shows itself.
package tinvest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

const (
	// Name is the provider's value of the config field `provider`.
	Name = "tinvest"
	// ProductionURL and SandboxURL are the REST gateway roots, /rest included.
	ProductionURL = "https://invest-public-api.tbank.ru/rest"
	SandboxURL    = "https://sandbox-invest-public-api.tbank.ru/rest"

	// EnvProduction and EnvSandbox are the environments T-Invest has.
	EnvProduction = "production"
	EnvSandbox    = "sandbox"

	// DefaultTTL is the lease TTL: the token has no expiry we could read, so
	// a lease is bounded by policy and renewed by validating again.
	DefaultTTL = time.Hour

	// SettingsURL is where a user issues (and sees) T-Invest tokens.
	SettingsURL = "https://www.tbank.ru/invest/settings/"

	display      = "T-Invest"
	usersService = "/tinkoff.public.invest.api.contract.v1.UsersService/"
	opGetInfo    = "POST UsersService/GetInfo"
	opGetAccts   = "POST UsersService/GetAccounts"
)

// Token kinds reported as Details["token_kind"].
const (
	TokenFullAccess     = "full-access"
	TokenReadOnly       = "read-only"
	TokenAccountLimited = "account-limited"
	TokenSandbox        = "sandbox"
	// TokenUnknown: no account shows what the token may do (none listed, or
	// all NO_ACCESS).
	TokenUnknown = "unknown"
)

// T-Invest's UsersService allows 100 unary requests a minute per user,
// across all that user's tokens; the plugin keeps each user under 90.
const (
	userBudgetPerMinute = 90
	// maxBudgets bounds the per-user state; idle entries are dropped
	// first, and a dropped entry only means starting from a full budget.
	maxBudgets = 100_000
)

// Provider implements provider.Provider for T-Invest. It holds one request
// budget per T-Invest user, shared by every config whose token belongs to
// that user: the broker counts its limit per user, not per token. Build one
// per backend with New.
type Provider struct {
	clock upstream.Clock

	mu sync.Mutex
	// users maps a token's SHA-256 to the userId GetInfo reported for it,
	// so that even a token's first call of an Issue draws on its user's
	// budget. The token itself is never kept.
	users   map[[sha256.Size]byte]string
	budgets map[string]*upstream.Budget // by "user:<id>" or "token:<hash>"
}

// New returns the T-Invest provider.
func New() provider.Provider { return NewWithClock(nil) }

// NewWithClock returns the T-Invest provider timing its budgets on clock
// (tests); nil is the system clock.
func NewWithClock(clock upstream.Clock) *Provider {
	if clock == nil {
		clock = upstream.SystemClock{}
	}
	return &Provider{clock: clock, users: map[[sha256.Size]byte]string{}, budgets: map[string]*upstream.Budget{}}
}

// Spec describes T-Invest: one token, production and sandbox, passed through.
func (*Provider) Spec() provider.Spec {
	roots := TrustedRoots()
	return provider.Spec{
		Name:         Name,
		Display:      display,
		Issuance:     provider.Passthrough,
		TrustedRoots: &roots,
		Fields: []provider.Field{{
			Name: "token", Secret: true, Required: true,
			Description: "the T-Invest API token issued in the T-Invest settings (" + SettingsURL + "). A sandbox token needs environment=sandbox.",
		}},
		OptionNotes: map[string]string{
			"keep_alive":          "T-Invest kills tokens 3 months after their last use.",
			"validation_interval": "T-Invest kills tokens 3 months after their last use.",
		},
		DetailsHelp: "accounts (id, type, name, status, access_level), user_id, tariff,\n" +
			"token_kind, readonly_evidence (why the token counts as read-only\n" +
			"or not); access_token is the T-Invest token itself, and\n" +
			"expires_at is empty (T-Invest does not tell)",
		RetireNote:   "the T-Invest token is the long-lived secret itself: retiring cannot stop it; revoke it in the T-Invest settings and write a new token here",
		Environments: map[string]string{EnvProduction: ProductionURL, EnvSandbox: SandboxURL},
		// A per-config cap as well; the limit that matters, per user, is
		// kept by the provider's shared budgets.
		RatePerMinute: userBudgetPerMinute,
		DefaultTTL:    DefaultTTL,
	}
}

// Issue validates the token upstream and reports what it can reach.
func (p *Provider) Issue(ctx context.Context, req provider.Request) (*provider.Token, error) {
	token := req.Secrets["token"]
	if token == "" {
		return nil, errors.New("tinvest: token is empty")
	}
	if req.Client == nil {
		return nil, errors.New("tinvest: no upstream client")
	}
	env, err := environment(req.Environment)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(token))
	c := caller{base: strings.TrimRight(req.BaseURL, "/"), client: req.Client, env: env, token: token, budget: p.budgetFor(sum)}
	var info getInfoResponse
	if err := c.post(ctx, "GetInfo", opGetInfo, &info); err != nil {
		return nil, err
	}
	c.budget = p.learnUser(sum, info.UserID, c.budget)
	var accts getAccountsResponse
	if err := c.post(ctx, "GetAccounts", opGetAccts, &accts); err != nil {
		return nil, err
	}
	tok, err := tokenFrom(token, env, info, accts, req.Time())
	if err != nil {
		return nil, err
	}
	if req.RequireReadOnly && !tok.ReadOnly {
		return nil, fmt.Errorf("%w: require_readonly is set but %s; issue a read-only token in the T-Invest settings (%s), or unset require_readonly",
			provider.ErrGuard, tok.Details["readonly_evidence"], SettingsURL)
	}
	return tok, nil
}

// budgetFor is the budget of the token's user when a past GetInfo told who
// that is, else a budget of the token's own until it does.
func (p *Provider) budgetFor(sum [sha256.Size]byte) *upstream.Budget {
	p.mu.Lock()
	defer p.mu.Unlock()
	if u, ok := p.users[sum]; ok {
		return p.budgetLocked("user:" + u)
	}
	return p.budgetLocked("token:" + hex.EncodeToString(sum[:8]))
}

// learnUser records whose token this is and returns that user's budget,
// charged for the GetInfo just made if it was drawn from another budget. A
// user GetInfo does not name (a new user may get `{}`) keeps the token's own.
func (p *Provider) learnUser(sum [sha256.Size]byte, userID string, current *upstream.Budget) *upstream.Budget {
	if userID == "" {
		return current
	}
	p.mu.Lock()
	if _, known := p.users[sum]; !known && len(p.users) >= maxBudgets {
		clear(p.users) // only costs a first call drawn from the token's own budget
	}
	p.users[sum] = userID
	b := p.budgetLocked("user:" + userID)
	p.mu.Unlock()
	if b != current {
		b.Charge()
	}
	return b
}

// budgetLocked returns the named budget, creating it; p.mu must be held.
func (p *Provider) budgetLocked(key string) *upstream.Budget {
	if b, ok := p.budgets[key]; ok {
		return b
	}
	if len(p.budgets) >= maxBudgets {
		for k, b := range p.budgets {
			if b.Idle() {
				delete(p.budgets, k)
			}
		}
	}
	b := upstream.NewBudget(userBudgetPerMinute, time.Minute, "this T-Invest user", p.clock)
	p.budgets[key] = b
	return b
}

// environment normalises the request's environment. Empty means production,
// the config's default, so a caller that does not set it gets the hosts it
// most likely meant.
func environment(env string) (string, error) {
	switch env {
	case "", EnvProduction:
		return EnvProduction, nil
	case EnvSandbox:
		return EnvSandbox, nil
	}
	return "", fmt.Errorf("tinvest: unknown environment %q (want %s or %s)", env, EnvProduction, EnvSandbox)
}

// tokenFrom derives the token's reach and kind from GetInfo and GetAccounts.
// Read-only needs positive evidence: at least one account READ_ONLY and
// none FULL_ACCESS (or of a level not known to be read-only). A token whose
// accounts all show NO_ACCESS, or that lists none, proves nothing: a
// full-access token of a user with no accounts yet looks just like that.
func tokenFrom(token, env string, info getInfoResponse, accts getAccountsResponse, now time.Time) (*provider.Token, error) {
	ids := []string{}
	details := make([]map[string]any, 0, len(accts.Accounts))
	noAccess, readOnly := 0, 0
	var trading []string // "id (level)" of accounts that may trade
	for _, a := range accts.Accounts {
		if a.ID == "" {
			// allowed_accounts could not be checked against a nameless account.
			return nil, badResponse(opGetAccts, "an account has no id", "")
		}
		level := a.AccessLevel.enum(accessLevels)
		d := map[string]any{
			"id":           a.ID,
			"type":         a.Type.enum(accountTypes),
			"name":         a.Name,
			"status":       a.Status.enum(accountStatuses),
			"access_level": level,
		}
		if t, ok := date(a.OpenedDate); ok {
			d["opened_date"] = t
		}
		if t, ok := date(a.ClosedDate); ok {
			d["closed_date"] = t
		}
		details = append(details, d)
		switch level {
		case AccessNone:
			noAccess++
			continue
		case AccessReadOnly:
			readOnly++
		case AccessFull:
			trading = append(trading, a.ID+" (FULL_ACCESS)")
		default:
			// An unspecified or unknown level cannot prove the account
			// read-only: require_readonly must not pass on a guess.
			trading = append(trading, a.ID+" (access level not known to be read-only)")
		}
		ids = append(ids, a.ID)
	}
	proven := readOnly > 0 && len(trading) == 0
	var kind, evidence string
	switch {
	case len(trading) > 0:
		evidence = "T-Invest reports access to accounts that can trade or whose access is not read-only: " + strings.Join(trading, ", ")
	case len(accts.Accounts) == 0:
		evidence = "T-Invest lists no accounts for this token, which proves nothing about its rights (a token of a user with no accounts yet, full-access included, looks the same); read-only needs at least one account with READ_ONLY access"
	case readOnly == 0:
		evidence = fmt.Sprintf("every account T-Invest lists for this token (%d) shows NO_ACCESS, which proves nothing about its rights; read-only needs at least one account with READ_ONLY access and none with FULL_ACCESS", noAccess)
	default:
		evidence = fmt.Sprintf("T-Invest reports READ_ONLY access to %d accounts and FULL_ACCESS to none", readOnly)
	}
	switch {
	case env == EnvSandbox:
		kind = TokenSandbox
	case len(ids) == 0:
		kind = TokenUnknown
	case noAccess > 0:
		// A token limited to one account still sees the user's other
		// accounts, as NO_ACCESS (confirmed by the maintainers, investAPI
		// #55 and #333).
		kind = TokenAccountLimited
	case proven:
		kind = TokenReadOnly
	default:
		kind = TokenFullAccess
	}
	return &provider.Token{
		AccessToken: token,
		IssuedAt:    now,
		// T-Invest tokens die three months after their last use, or when
		// revoked; no expiry can be read, so none is claimed.
		ExpiresAt:  time.Time{},
		AccountIDs: ids,
		ReadOnly:   proven,
		Details: map[string]any{
			"accounts":          details,
			"user_id":           info.UserID,
			"tariff":            info.Tariff,
			"token_kind":        kind,
			"readonly_evidence": evidence,
		},
	}, nil
}

// date renders a proto Timestamp for the details. An open account's
// closedDate is sent as the Unix epoch rather than omitted, so the epoch
// counts as unset.
func date(s string) (string, bool) {
	if s == "" {
		return "", false
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		// Shown as sent: a date we cannot parse is no reason to refuse a token.
		return s, true
	}
	if t.Unix() <= 0 {
		return "", false
	}
	return t.UTC().Format(time.RFC3339), true
}

// caller makes the UsersService calls for one Issue.
type caller struct {
	base   string
	client *upstream.Client
	env    string
	token  string
	budget *upstream.Budget
}

func (c caller) post(ctx context.Context, method, op string, out any) error {
	call := upstream.Call{
		Method:     http.MethodPost,
		URL:        c.base + usersService + method,
		Header:     http.Header{"Authorization": {"Bearer " + c.token}},
		JSON:       struct{}{},
		Idempotent: true, // reads only
		Op:         op,
		Secrets:    []string{c.token},
		Budget:     c.budget,
	}
	resp, err := c.client.Do(ctx, call, func(r *upstream.Response) *upstream.Error {
		return classify(call, c.env, r)
	})
	if err != nil {
		return err
	}
	if err := decodeJSON(resp.Body, out); err != nil {
		// Described, never quoted: a 2xx body may hold a secret the
		// scrubber does not know.
		return badResponse(op, upstream.NotExpectedJSON(resp, decodeProblem(err)), trackingID(resp.Header, call.Secrets))
	}
	return nil
}

func badResponse(op, msg, tracking string) *upstream.Error {
	return upstream.BadResponseError(display, op, withTracking(msg, tracking))
}
