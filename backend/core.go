package backend

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/logical"
)

// The token core's writes: a config write, a delete and a retire, each one
// serialised step of the config's name (see configState). Path handlers
// parse, call one of these (or a read in refresh.go) and present; they take
// no lock themselves.

// configChange is what a config write asks of the core, built by the
// handler's prepare step from the request and the stored config.
type configChange struct {
	cfg    *brokerConfig
	verify bool
	// given reports whether the write supplies a field anew (a secret
	// supplied anew replaces a rotated value of it).
	given func(field string) bool
}

// refusal is a write refused before anything was sent or stored: a 400
// whose text names the field.
type refusal struct{ msg string }

func (r *refusal) Error() string { return r.msg }

func refuse(format string, args ...any) error { return &refusal{msg: fmt.Sprintf(format, args...)} }

// verifyError is a config write that the broker or a guard refused; its
// text is the whole message, and nothing was stored.
type verifyError struct {
	msg string
	err error
}

func (e *verifyError) Error() string { return e.msg }
func (e *verifyError) Unwrap() error { return e.err }

// putConfig is one config write of name. Under the name's upstream lock
// (so its verifying call never runs beside a refresh and it sees the record
// the last refresh stored) it builds the change from the stored config with
// prepare, verifies the secret with the broker, and stores record and
// config as one step of the name's owner. It returns what was stored.
func (b *backend) putConfig(ctx context.Context, s logical.Storage, name string, prepare func(old *brokerConfig) (*configChange, error)) (*brokerConfig, tokenRecord, error) {
	st := b.acquire(name)
	defer b.release(st)
	st.lockUpstream()
	defer st.upstream.Unlock()
	if err := b.ensureLoaded(ctx, s, st); err != nil {
		return nil, tokenRecord{}, err
	}
	st.mu.Lock()
	old, cur, gen := st.cfg, st.rec, st.gen
	st.mu.Unlock()

	if err := b.refuseRoleName(ctx, s, name); err != nil {
		return nil, tokenRecord{}, err // before anything is sent anywhere
	}
	ch, err := prepare(old)
	if err != nil {
		return nil, tokenRecord{}, err
	}
	cfg := ch.cfg
	spec := b.specs[cfg.Provider]
	client, err := b.newClient(spec, cfg)
	if err != nil {
		return nil, tokenRecord{}, refuse("%v", badField("ca_cert", "%v", err))
	}
	keep := false
	defer func() {
		if !keep {
			client.Close()
		}
	}()

	rec := carriedRecord(ch, old, cfg, cur)
	presented := effectiveSecrets(cfg, rec)
	var (
		walID string
		m     *refreshed
		fail  error
	)
	if ch.verify {
		// Not the caller's context: a caller going away (or Vault ending
		// the request at step-down) must not drop an answer the broker
		// rotated for.
		vctx, vcancel := context.WithTimeout(context.WithoutCancel(ctx), b.refreshTimeout)
		m, walID, err = b.issue(vctx, name, cfg, client, presented, cfg.AllowedAccounts, cur.RetireEpoch)
		vcancel()
		switch {
		case err != nil:
			fail = &verifyError{msg: fmt.Sprintf("verifying the %s secret failed; nothing was stored: %v", cfg.Provider, err), err: err}
		default:
			if gerr := checkGuards(cfg, m.tok); gerr != nil {
				fail = &verifyError{msg: fmt.Sprintf("%s; nothing was stored", gerr), err: gerr}
			}
		}
	}

	// The broker may have rotated a secret: store it even if the caller
	// went away.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), persistTimeout)
	defer cancel()
	st.lockOwner()
	defer st.owner.Unlock()
	st.mu.Lock()
	changed, now := st.gen != gen || !st.loaded, st.rec
	st.mu.Unlock()
	if err := b.refuseRoleName(wctx, s, name); err != nil {
		fail = err // a role took the name meanwhile
	}
	if changed && fail == nil {
		fail = logical.CodedError(http.StatusConflict, fmt.Sprintf("config %q was deleted or changed while this write ran; nothing was stored: write it again", name))
	}
	if fail != nil {
		if changed {
			b.deleteRotationWALs(wctx, walID) // the config it rotated for is gone
		} else {
			b.keepRotationOwned(wctx, s, st, old, cfg, m, presented, walID)
		}
		return nil, tokenRecord{}, fail
	}
	if m != nil {
		// The verifying call's token is the first token: readers need not refresh.
		rec = rec.with(cfg, "", m, b.now())
	}
	// A retire that landed while the secret was being verified holds: the
	// verifying token was obtained before it.
	rec.RetireEpoch, rec.RetiredBefore = now.RetireEpoch, now.RetiredBefore
	if rec.Token != nil && rec.Token.Epoch < rec.RetireEpoch {
		rec.Token, rec.Narrowed = nil, nil
	}
	rec.ConfigHash = cfg.upstreamHash()
	if old != nil && !old.sameEndpoint(cfg) && len(now.Rotated) > 0 {
		// Until the config below is stored, the old endpoint's rotation is
		// the stored config's: keep it beside the new one.
		rec.Prior = &rotation{Secrets: now.Rotated, Endpoint: old.endpointKey(), ExpiresAt: now.SecretExpiresAt}
	}
	cfg.UpdatedAt = b.now().UTC()
	if old == nil {
		// Leases are bound to this instance of the name: a lease of a
		// deleted config never renews under one written again.
		cfg.Instance = newInstanceID()
	}
	// The token record first: a write that fails half way leaves at worst
	// a record whose hash does not match the stored config, whose token
	// loading drops (boundTo); never an old secret's token paired with a
	// new config, nor a rotated secret at an endpoint that did not issue it.
	if err := writeTokenRecord(wctx, s, name, rec); err != nil {
		b.keepRotationOwned(wctx, s, st, old, cfg, m, presented, walID)
		return nil, tokenRecord{}, err
	}
	if err := writeConfig(wctx, s, name, cfg); err != nil {
		// Storage holds the old config beside the new record, which holds
		// every rotation (and the old endpoint's as Prior): their rotation
		// records are done, and memory follows storage at the next use.
		st.mu.Lock()
		done := st.storedLocked()
		st.unloadLocked()
		st.mu.Unlock()
		b.deleteRotationWALs(wctx, append(done, walID)...)
		return nil, tokenRecord{}, err
	}
	rec.Prior = nil
	st.mu.Lock()
	st.setClientLocked(client)
	st.cfg, st.rec, st.loaded = cfg, rec, true
	st.present.Store(true)
	st.gen++
	st.resetSlotsLocked()
	done := st.storedLocked()
	st.mu.Unlock()
	keep = true
	b.deleteRotationWALs(wctx, append(done, walID)...)
	b.reschedule(wctx, name, b.nextDue(cfg, rec))
	return cfg, rec, nil
}

// carriedRecord is the token record a config write starts from. The same
// upstream keeps the token. Any other change drops the token, but keeps a
// secret the broker rotated (a rotated refresh token: changing a password
// does not end it, and the seed it replaced is spent) unless this write
// supplies that field anew (a value other than the one written before) or
// moves the config to another endpoint. The retire epoch always carries
// over.
func carriedRecord(ch *configChange, old, cfg *brokerConfig, cur tokenRecord) tokenRecord {
	if old == nil {
		return tokenRecord{}
	}
	if old.sameUpstream(cfg) {
		return cur
	}
	rec := tokenRecord{RetireEpoch: cur.RetireEpoch, RetiredBefore: cur.RetiredBefore}
	if !old.sameEndpoint(cfg) {
		return rec
	}
	for k, v := range cur.Rotated {
		// The same value written again is not a new one: the rotation
		// still supersedes it (the broker may have retired it).
		if !ch.given(k) || cfg.Secrets[k] == old.Secrets[k] {
			if rec.Rotated == nil {
				rec.Rotated = map[string]string{}
			}
			rec.Rotated[k] = v
			rec.RotatedAt = cur.RotatedAt
			rec.SecretExpiresAt = cur.SecretExpiresAt
		}
	}
	return rec
}

// keepRotationOwned keeps a secret the broker rotated during a config write
// that then failed, when the write presented the stored config's own
// current value at the stored config's endpoint (the broker has now retired
// that value): it becomes the stored config's rotated secret, in memory and
// in storage. A rotation of a new seed, or at another endpoint, belongs to
// no stored config and is dropped with the write. st.owner must be held.
func (b *backend) keepRotationOwned(ctx context.Context, s logical.Storage, st *configState, old, cfg *brokerConfig, m *refreshed, presented map[string]string, walID string) {
	if m == nil || len(m.rotated) == 0 || old == nil || !old.sameEndpoint(cfg) {
		b.deleteRotationWALs(ctx, walID) // nothing the stored config needs
		return
	}
	st.mu.Lock()
	if st.cfg == nil {
		st.mu.Unlock()
		b.deleteRotationWALs(ctx, walID)
		return
	}
	current := effectiveSecrets(st.cfg, st.rec)
	rec := st.rec
	rec.Rotated = maps.Clone(rec.Rotated)
	if rec.Rotated == nil {
		rec.Rotated = map[string]string{}
	}
	kept := false
	for k, v := range m.rotated {
		if presented[k] == current[k] {
			rec.Rotated[k] = v
			kept = true
		}
	}
	st.mu.Unlock()
	if !kept {
		b.deleteRotationWALs(ctx, walID)
		return
	}
	rec.RotatedAt = old.endpointKey()
	if !m.secretExpiresAt.IsZero() {
		rec.SecretExpiresAt = m.secretExpiresAt
	}
	b.storeRotationOwned(ctx, s, st, rec, walID)
	b.Logger().Error("a config write failed after the broker rotated its secret; the new one is kept for the stored config", "config", st.name)
}

// storeRotationOwned installs rec, which holds a rotated secret, and stores
// it; when storage fails the rotation stays in memory (unstored) with its
// rotation record, and is stored by the next refresh or at cleanup.
// st.owner must be held.
func (b *backend) storeRotationOwned(ctx context.Context, s logical.Storage, st *configState, rec tokenRecord, walID string) {
	err := writeTokenRecord(ctx, s, st.name, rec)
	st.mu.Lock()
	st.rec = rec
	var done []string
	if err != nil {
		st.unstoredLocked(walID)
	} else {
		done = append(st.storedLocked(), walID)
	}
	st.mu.Unlock()
	if err != nil {
		b.logUnstoredRotation(st.name, err)
		return
	}
	b.deleteRotationWALs(ctx, done...)
}

// deleteConfig deletes name's config and token record as one step of the
// name's owner. The config goes first: a delete that fails half way leaves
// either the whole config (its pair with it) or a record without a config,
// which nothing reads and a retried delete removes.
func (b *backend) deleteConfig(ctx context.Context, s logical.Storage, name string) error {
	st := b.acquire(name)
	defer b.release(st)
	st.lockOwner()
	defer st.owner.Unlock()
	// Role writes take this lock too: no role can name the config after
	// this check.
	roles, err := b.rolesOf(ctx, s, name)
	if err != nil {
		return err
	}
	if len(roles) > 0 {
		return logical.CodedError(http.StatusConflict, fmt.Sprintf("config %q is used by roles %s: delete them first (roles/<name>)", name, strings.Join(roles, ", ")))
	}
	// Storage first, under the owner: a load waits for the outcome, and a
	// delete that fails leaves memory (a rotation not yet stored, refreshes
	// in flight) exactly as it was. Once the config is gone from storage,
	// memory follows: a refresh in flight finds the generation changed and
	// installs nothing.
	if err := s.Delete(ctx, configPrefix+name); err != nil {
		return fmt.Errorf("deleting config %q: %w", name, err)
	}
	st.mu.Lock()
	done := st.storedLocked() // moot: the config they covered is gone
	st.unloadLocked()
	st.loaded = true // known absent; a later write starts from nothing
	st.mu.Unlock()
	b.deleteRotationWALs(ctx, done...)
	if err := s.Delete(ctx, tokenPrefix+name); err != nil {
		return fmt.Errorf("config %q was deleted, but not its token record (delete again to remove it): %w", name, err)
	}
	b.reschedule(ctx, name, time.Time{})
	// The config's series go with it (the collector shows configs that
	// exist only); one written again counts from zero.
	st.counts.reset()
	return nil
}

// retireConfig is the incident switch: from now on no lease receives a
// token obtained before this moment, including one a running refresh is
// about to deliver (its epoch is older). Rotated secrets such a refresh
// brings are still stored. It returns the config and the retired token that
// expires last (the config's own or a role's).
func (b *backend) retireConfig(ctx context.Context, s logical.Storage, name string) (*brokerConfig, *storedToken, error) {
	st := b.acquire(name)
	defer b.release(st)
	st.lockOwner()
	defer st.owner.Unlock()
	if err := b.loadOwned(ctx, s, st); err != nil {
		return nil, nil, err
	}
	st.mu.Lock()
	rec, cfg := st.rec, st.cfg
	st.mu.Unlock()
	if cfg == nil {
		return nil, nil, errConfigNotFound
	}
	// What was handed out lives until the last of them expires.
	var old *storedToken
	for _, t := range append([]*storedToken{rec.Token}, slices.Collect(maps.Values(rec.Narrowed))...) {
		if t != nil && (old == nil || t.ExpiresAt.After(old.ExpiresAt)) {
			old = t
		}
	}
	rec.Token, rec.Narrowed = nil, nil
	rec.RetiredBefore = b.now()
	rec.RetireEpoch++
	if err := writeTokenRecord(ctx, s, name, rec); err != nil {
		return nil, nil, fmt.Errorf("retiring the tokens of %q: %w", name, err)
	}
	st.mu.Lock()
	st.rec = rec
	done := st.storedLocked()
	st.own.failErr = nil
	for _, sl := range st.narrowed {
		sl.failErr = nil
	}
	st.mu.Unlock()
	b.deleteRotationWALs(ctx, done...)
	b.Logger().Warn("all tokens of the config retired", "config", name)
	return cfg, old, nil
}

// refuseRoleName refuses a config write of a name a role has: creds/<name>
// must always mean one thing.
func (b *backend) refuseRoleName(ctx context.Context, s logical.Storage, name string) error {
	r, err := b.roleFor(ctx, s, name)
	if err != nil {
		return err
	}
	if r != nil {
		return refuse("name: a role is named %q (over config %q); configs and roles share one namespace (creds/<name>): pick another name", name, r.Config)
	}
	return nil
}

// putRole is one role write of name: prepare builds it from the stored role
// (nil on create); the role's guards are checked against the broker's
// evidence for its config's token; then, under the role name's owner lock
// and its config's (always in that order), the namespace and the config's
// bounds are checked and the role is stored.
func (b *backend) putRole(ctx context.Context, s logical.Storage, name string, prepare func(old *roleEntry) (*roleEntry, error)) (*roleEntry, error) {
	old, err := b.roleFor(ctx, s, name)
	if err != nil {
		return nil, err
	}
	r, err := prepare(old)
	if err != nil {
		return nil, err
	}
	r.Name = name
	if cfg, err := b.config(ctx, s, r.Config); err != nil {
		return nil, err
	} else if cfg != nil {
		// Checked again under the locks below; here so that a guard the
		// broker gives no evidence for is refused before the broker is asked.
		if err := b.roleWithinConfig(r, cfg); err != nil {
			return nil, err
		}
	}
	if r.RequireReadOnly || len(r.AllowedAccounts) > 0 {
		// The broker's word on the config's token, before any lock (it
		// may call the broker).
		cfg, tok, err := b.currentToken(ctx, s, r.Config)
		switch {
		case errors.Is(err, errConfigNotFound):
			return nil, refuse("config: no config named %q: write config/%s first; nothing was stored", r.Config, r.Config)
		case err != nil:
			return nil, &verifyError{msg: fmt.Sprintf("role %q: checking its guards against config %q's token failed; nothing was stored: %v", name, r.Config, err), err: err}
		}
		spec := b.specs[cfg.Provider]
		probe := tok
		if b.requestFor(cfg, r).key != "" {
			// Narrowed at issue: the role's token keeps the config's
			// trading rights, and its accounts are checked when minted.
			probe = &storedToken{ReadOnly: tok.ReadOnly, AccountIDs: r.AllowedAccounts}
		}
		if err := checkRoleGuards(spec, r, probe); err != nil {
			return nil, &verifyError{msg: fmt.Sprintf("%s; nothing was stored", err), err: err}
		}
	}

	st := b.acquire(name)
	defer b.release(st)
	st.lockOwner()
	defer st.owner.Unlock()
	if err := b.loadOwned(ctx, s, st); err != nil {
		return nil, err
	}
	st.mu.Lock()
	clash := st.cfg != nil
	st.mu.Unlock()
	if clash {
		return nil, refuse("name: a config is named %q; configs and roles share one namespace (creds/<name>): pick another name", name)
	}
	cs := b.acquire(r.Config)
	defer b.release(cs)
	cs.lockOwner()
	defer cs.owner.Unlock()
	if err := b.loadOwned(ctx, s, cs); err != nil {
		return nil, err
	}
	cs.mu.Lock()
	cfg := cs.cfg
	cs.mu.Unlock()
	if cfg == nil {
		return nil, refuse("config: no config named %q: write config/%s first; nothing was stored", r.Config, r.Config)
	}
	if err := b.roleWithinConfig(r, cfg); err != nil {
		return nil, err
	}
	r.UpdatedAt = b.now().UTC()
	if err := writeRole(ctx, s, r); err != nil {
		return nil, err
	}
	b.roles.set(name, r)
	return r, nil
}

// roleWithinConfig refuses a role broader than its config.
func (b *backend) roleWithinConfig(r *roleEntry, cfg *brokerConfig) error {
	spec := b.specs[cfg.Provider]
	if spec.ReportsNoAccess && (r.RequireReadOnly || len(r.AllowedAccounts) > 0) {
		return refuse("require_readonly, allowed_accounts: cannot be checked for %s: %s reports neither accounts nor a read-only flag; nothing was stored", cfg.Provider, spec.Display)
	}
	if len(cfg.AllowedAccounts) > 0 {
		for _, a := range r.AllowedAccounts {
			if !slices.Contains(cfg.AllowedAccounts, a) {
				return refuse("allowed_accounts: %s is not in config %q's allowed_accounts (%s): a role is never broader than its config; nothing was stored", a, r.Config, strings.Join(cfg.AllowedAccounts, ", "))
			}
		}
	}
	if cfg.TTL > 0 && r.TTL > cfg.TTL {
		return refuse("ttl: %s is above config %q's ttl (%s); nothing was stored", r.TTL, r.Config, cfg.TTL)
	}
	if cfg.MaxTTL > 0 && r.MaxTTL > cfg.MaxTTL {
		return refuse("max_ttl: %s is above config %q's max_ttl (%s); nothing was stored", r.MaxTTL, r.Config, cfg.MaxTTL)
	}
	return nil
}

// deleteRole deletes a role. Its narrowed token, unless another role asks
// for the same, is dropped with it, and one being minted is not installed.
// Nothing ends upstream; its leases no longer renew.
func (b *backend) deleteRole(ctx context.Context, s logical.Storage, name string) error {
	st := b.acquire(name)
	defer b.release(st)
	st.lockOwner()
	defer st.owner.Unlock()
	r, err := b.roleFor(ctx, s, name)
	if err != nil || r == nil {
		return err
	}
	if err := s.Delete(ctx, rolePrefix+name); err != nil {
		return fmt.Errorf("deleting role %q: %w", name, err)
	}
	b.roles.set(name, nil) // its series go with it

	cs := b.acquire(r.Config)
	defer b.release(cs)
	cs.lockOwner()
	defer cs.owner.Unlock()
	if err := b.loadOwned(ctx, s, cs); err != nil {
		return nil // the role is gone; its token goes with the next change of the config
	}
	cs.mu.Lock()
	cfg := cs.cfg
	cs.mu.Unlock()
	if cfg == nil {
		return nil
	}
	req := b.requestFor(cfg, r)
	if req.key == "" {
		return nil
	}
	others, err := b.rolesOf(ctx, s, r.Config)
	if err != nil {
		return nil
	}
	for _, o := range others {
		if or, _ := b.roleFor(ctx, s, o); or != nil && b.requestFor(cfg, or).key == req.key {
			return nil // still asked for
		}
	}
	cs.mu.Lock()
	rec := cs.rec.withToken(req.key, nil)
	// A flight of this request finds its slot gone and installs nothing.
	delete(cs.narrowed, req.key)
	cs.mu.Unlock()
	if err := writeTokenRecord(ctx, s, r.Config, rec); err != nil {
		b.Logger().Warn("could not drop a deleted role's token from storage; the config's next change drops it", "role", name, "error", err)
	}
	cs.mu.Lock()
	cs.rec = rec
	cs.mu.Unlock()
	return nil
}

// newInstanceID is a config instance's random id.
func newInstanceID() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b[:])
}

// unloadAll empties memory at cleanup, storing first every rotated secret
// only memory holds (its storage write failed earlier).
func (b *backend) unloadAll(ctx context.Context) {
	b.mu.Lock()
	states := b.states
	b.states = map[string]*configState{}
	b.mu.Unlock()
	for _, st := range states {
		st.lockOwner()
		st.mu.Lock()
		unstored, rec := st.unstored && st.cfg != nil, st.rec
		st.mu.Unlock()
		if unstored && b.storage != nil {
			b.storeRotationOwned(ctx, b.storage, st, rec, "")
		}
		st.mu.Lock()
		st.unloadLocked()
		st.mu.Unlock()
		st.owner.Unlock()
	}
}
