package backend

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// Roles: one config's secret, many scoped consumers. A role narrows what
// its readers get (accounts, trading rights, lease bounds); its tokens come
// from its config's state, cached by what the broker is asked for.

const rolePrefix = "roles/"

// roleEntry is what roles/<name> stores.
type roleEntry struct {
	Name            string        `json:"-"`
	Config          string        `json:"config"`
	AllowedAccounts []string      `json:"allowed_accounts,omitempty"`
	RequireReadOnly bool          `json:"require_readonly"`
	TTL             time.Duration `json:"ttl"`
	MaxTTL          time.Duration `json:"max_ttl"`
	UpdatedAt       time.Time     `json:"updated_at"`

	// mkeys are the role's metric series, looked up once (not stored).
	mkeys atomic.Pointer[metricKeys]
}

// tokenRequest is what the broker is asked for on a reader's behalf: the
// config's own token (key "") or one narrowed to accounts. Readers whose
// requests have the same key share one cached token.
type tokenRequest struct {
	key      string
	accounts []string
}

// accountsOr is what the broker is asked to narrow to.
func (r tokenRequest) accountsOr(cfg *brokerConfig) []string {
	if r.key == "" {
		return cfg.AllowedAccounts
	}
	return r.accounts
}

// requestFor is what a read of cfg (role nil) or of a role over it asks the
// broker for. Only a broker that narrows at issue (Spec.NarrowsAccounts)
// gets a request of its own for a role's accounts; for every other broker a
// role's guards only check the config's token, and never split the cache.
func (b *backend) requestFor(cfg *brokerConfig, role *roleEntry) tokenRequest {
	if role == nil || len(role.AllowedAccounts) == 0 || !b.specs[cfg.Provider].NarrowsAccounts {
		return tokenRequest{}
	}
	accounts := slices.Sorted(slices.Values(role.AllowedAccounts))
	if slices.Equal(accounts, slices.Sorted(slices.Values(cfg.AllowedAccounts))) {
		return tokenRequest{}
	}
	return tokenRequest{key: "accounts:" + strings.Join(accounts, ","), accounts: accounts}
}

// keysFor are the metric series of a read of the config (role nil) or of a
// role.
func (st *configState) keysFor(m *metrics, role *roleEntry) *metricKeys {
	if role == nil {
		return st.keys(m)
	}
	if k := role.mkeys.Load(); k != nil {
		return k
	}
	k := &metricKeys{
		hit:        m.creds.WithLabelValues(st.name, role.Name, "hit"),
		miss:       m.creds.WithLabelValues(st.name, role.Name, "miss"),
		refreshOK:  m.mints.WithLabelValues(st.name, "ok"),
		refreshErr: m.mints.WithLabelValues(st.name, "error"),
		rotation:   m.rotations.WithLabelValues(st.name),
	}
	role.mkeys.Store(k)
	return k
}

// roleCache holds every role in memory: creds/<name> must know at once
// whether a name is a role, without a storage read on the hot path. It is
// read from storage whole at first use, kept current by role writes and
// deletes (under the role name's owner lock), and told by invalidate which
// names another node changed.
type roleCache struct {
	mu     sync.RWMutex
	loaded bool
	byName map[string]*roleEntry
	// reread are names another node changed: read from storage at next use.
	reread map[string]bool
}

// roleFor returns the role named name, or nil.
func (b *backend) roleFor(ctx context.Context, s logical.Storage, name string) (*roleEntry, error) {
	rc := &b.roles
	rc.mu.RLock()
	r, loaded, reread := rc.byName[name], rc.loaded, rc.reread[name]
	rc.mu.RUnlock()
	if loaded && !reread {
		return r, nil
	}
	if !loaded {
		if err := b.loadRoles(ctx, s); err != nil {
			return nil, err
		}
	}
	rc.mu.RLock()
	reread = rc.reread[name]
	rc.mu.RUnlock()
	if reread {
		r, err := readRole(ctx, s, name)
		if err != nil {
			return nil, err
		}
		rc.mu.Lock()
		delete(rc.reread, name)
		rc.setLocked(name, r)
		rc.mu.Unlock()
	}
	rc.mu.RLock()
	defer rc.mu.RUnlock()
	return rc.byName[name], nil
}

func (rc *roleCache) setLocked(name string, r *roleEntry) {
	if r == nil {
		delete(rc.byName, name)
	} else {
		rc.byName[name] = r
	}
}

// set records a role written (nil: deleted) by this node.
func (rc *roleCache) set(name string, r *roleEntry) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.byName == nil {
		rc.byName = map[string]*roleEntry{}
	}
	delete(rc.reread, name)
	rc.setLocked(name, r)
}

// invalidate marks a role another node changed.
func (rc *roleCache) invalidate(name string) {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if rc.reread == nil {
		rc.reread = map[string]bool{}
	}
	rc.reread[name] = true
}

func (b *backend) loadRoles(ctx context.Context, s logical.Storage) error {
	names, err := s.List(ctx, rolePrefix)
	if err != nil {
		return fmt.Errorf("listing roles: %w", err)
	}
	byName := make(map[string]*roleEntry, len(names))
	for _, n := range names {
		r, err := readRole(ctx, s, n)
		if err != nil {
			return err
		}
		if r != nil {
			byName[n] = r
		}
	}
	rc := &b.roles
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if !rc.loaded {
		rc.byName, rc.loaded = byName, true
		if rc.reread == nil {
			rc.reread = map[string]bool{}
		}
	}
	return nil
}

// rolesOf lists the roles that name config, sorted.
func (b *backend) rolesOf(ctx context.Context, s logical.Storage, config string) ([]string, error) {
	if _, err := b.roleFor(ctx, s, ""); err != nil { // loads the cache
		return nil, err
	}
	rc := &b.roles
	rc.mu.RLock()
	changed := slices.Collect(maps.Keys(rc.reread))
	rc.mu.RUnlock()
	for _, n := range changed { // another node changed them: they may name config now
		if _, err := b.roleFor(ctx, s, n); err != nil {
			return nil, err
		}
	}
	rc.mu.RLock()
	defer rc.mu.RUnlock()
	var out []string
	for n, r := range rc.byName {
		if r.Config == config {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out, nil
}

func readRole(ctx context.Context, s logical.Storage, name string) (*roleEntry, error) {
	e, err := s.Get(ctx, rolePrefix+name)
	if err != nil {
		return nil, fmt.Errorf("reading role %q: %w", name, err)
	}
	if e == nil {
		return nil, nil
	}
	r := &roleEntry{}
	if err := e.DecodeJSON(r); err != nil {
		return nil, fmt.Errorf("decoding role %q: %w", name, err)
	}
	r.Name = name
	return r, nil
}

func writeRole(ctx context.Context, s logical.Storage, r *roleEntry) error {
	e, err := logical.StorageEntryJSON(rolePrefix+r.Name, r)
	if err != nil {
		return fmt.Errorf("encoding role %q: %w", r.Name, err)
	}
	if err := s.Put(ctx, e); err != nil {
		return fmt.Errorf("storing role %q: %w", r.Name, err)
	}
	return nil
}

// boundsFor is cfg with the role's lease bounds applied: a role's leases
// are never longer than its config's.
func boundsFor(cfg *brokerConfig, role *roleEntry) *brokerConfig {
	if role == nil {
		return cfg
	}
	c := *cfg
	c.TTL = minSet(cfg.TTL, role.TTL)
	c.MaxTTL = minSet(cfg.MaxTTL, role.MaxTTL)
	return &c
}

// minSet is the smaller of two bounds, zero meaning unset.
func minSet(a, b time.Duration) time.Duration {
	switch {
	case a == 0:
		return b
	case b == 0:
		return a
	}
	return min(a, b)
}

// checkRoleGuards applies a role's require_readonly and allowed_accounts to
// what the broker reported about tok (the config's own guards are checked
// apart). A broker that cannot narrow gets a role narrower than the
// config's token refused, saying so.
func checkRoleGuards(spec provider.Spec, role *roleEntry, tok *storedToken) error {
	if role.RequireReadOnly && !tok.ReadOnly {
		return fmt.Errorf("%w: role %q requires a read-only token but %s reports this token can trade (accounts %s); use a read-only secret in config %q, or unset require_readonly on the role", provider.ErrGuard, role.Name, spec.Display, strings.Join(tok.AccountIDs, ", "), role.Config)
	}
	if len(role.AllowedAccounts) == 0 {
		return nil
	}
	if len(tok.AccountIDs) == 0 {
		return fmt.Errorf("%w: %s listed no account for this token, so role %q's allowed_accounts cannot be checked", provider.ErrGuard, spec.Display, role.Name)
	}
	var outside []string
	for _, a := range tok.AccountIDs {
		if !slices.Contains(role.AllowedAccounts, a) {
			outside = append(outside, a)
		}
	}
	if len(outside) == 0 {
		return nil
	}
	if !spec.NarrowsAccounts {
		return fmt.Errorf("%w: %s cannot narrow a token, and config %q's token reaches %s, outside role %q's allowed_accounts (%s); give the role every account the token reaches, or use a secret limited to those accounts", provider.ErrGuard, spec.Display, role.Config, strings.Join(tok.AccountIDs, ", "), role.Name, strings.Join(role.AllowedAccounts, ", "))
	}
	return fmt.Errorf("%w: the token %s narrowed for role %q also reaches %s", provider.ErrGuard, spec.Display, role.Name, strings.Join(outside, ", "))
}
