package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// Roles (roles/<name>, creds/<role>; issue 21), in three parts:
//
// Ratio: a cached creds/<role> read against a cached creds/<config> read of
// the role's own config, at 16 clients. The role is read-only over Finam's
// read-only secret, so it shares the config's JWT (Finam cannot narrow, and
// a guard that only checks a token never splits the cache): both reads
// answer the same token from memory, and what the role read adds is
// finding the role and checking its guards. The two take turns in short
// slices, round after round, the order alternating, as P1 does for creds
// and kvext, so machine noise falls on both.
//
// Memory: 1,000 roles over 10 configs (half Finam over the read-only
// secret, half ALOR), each read once, and the plugin's RSS before the roles
// and after. ALOR roles cycle through every subset of the login's three
// portfolios, so each ALOR config also holds the tokens minted narrowed to
// them (6 a config; the full set asks for the config's own token). Both
// readings are taken the same way (settledMem): after a few seconds of
// light reads, so the Go runtime has collected and returned what earlier
// bursts left, and once RSS holds still.
//
// Cold: N readers released at once on an ALOR role narrowed by
// allowed_accounts of its own, whose token has never been minted, while the
// broker answers slowly (so they overlap the mint): the single flight must
// make exactly one upstream mint (POST /refresh), one token for all, and
// that token narrowed to the role's portfolios.

type rolesConfig struct {
	// Ratio part.
	Clients int
	Rounds  int
	Slice   time.Duration
	Warm    time.Duration
	// Memory part (Roles 0: not run).
	Roles   int
	Configs int
	// Cold part (ColdReaders 0: not run).
	ColdReaders   int
	BrokerLatency time.Duration
}

type rolesResult struct {
	Ratio  *roleRatio  `json:"role_vs_config"`
	Memory *roleMemory `json:"many_roles,omitempty"`
	Cold   *roleCold   `json:"cold_narrowed_role,omitempty"`
}

type roleRatio struct {
	Clients int     `json:"clients"`
	Rounds  int     `json:"rounds"`
	SliceS  float64 `json:"slice_s"`
	Config  string  `json:"config_path"`
	Role    string  `json:"role_path"`
	// SameToken: the role's creds carried the config's JWT (they share one
	// cached token).
	SameToken    bool    `json:"role_shares_config_token"`
	ConfigStats  stats   `json:"config"`
	RoleStats    stats   `json:"role"`
	P50RoleOverC float64 `json:"p50_role_over_config"`
	P99RoleOverC float64 `json:"p99_role_over_config"`
	RPSRoleOverC float64 `json:"throughput_role_over_config"`
	// The p50 ratio round by round: its spread is the machine's noise.
	P50ByRound []float64 `json:"p50_role_over_config_by_round"`
	// Upstream mints during the timed reads (want 0: both are cached).
	Mints int `json:"upstream_mints_during_reads"`
}

type roleMemory struct {
	Configs      int `json:"configs"`
	FinamConfigs int `json:"finam_configs"`
	AlorConfigs  int `json:"alor_configs"`
	Roles        int `json:"roles"`
	// NarrowedRoles are ALOR roles asking for a token narrowed to accounts
	// of their own; NarrowedTokens the distinct narrowings among them (each
	// a token of its own, minted at the role's first read).
	NarrowedRoles  int     `json:"narrowed_roles"`
	NarrowedTokens int     `json:"narrowed_tokens"`
	WriteSeconds   float64 `json:"role_write_seconds"`
	RoleWritesPerS float64 `json:"role_writes_per_s"`
	ReadSeconds    float64 `json:"role_read_seconds"`
	UpstreamMints  int     `json:"upstream_mints_during_role_reads"`
	Errors         int     `json:"errors"`
	LastError      string  `json:"last_error,omitempty"`
	RSSStart       procMem `json:"plugin_before_configs"`
	RSSBefore      procMem `json:"plugin_before_roles"`
	RSSAfter       procMem `json:"plugin_after_roles"`
	AddedMB        float64 `json:"rss_added_by_roles_mb"`
	PerRoleKB      float64 `json:"rss_per_role_kb"`
	FDsBefore      int     `json:"plugin_open_fds_before_roles"`
	FDsAfter       int     `json:"plugin_open_fds_after_roles"`
	// SettledS is how long each reading waited for RSS to hold still.
	SettledBeforeS float64 `json:"settled_s_before_roles"`
	SettledAfterS  float64 `json:"settled_s_after_roles"`
	// The plugin's Go heap in use (go_memstats_heap_inuse_bytes from
	// <mount>/metrics) at the two readings: what the heap holds, without
	// what the runtime keeps mapped or has not yet returned.
	HeapBeforeMB float64 `json:"plugin_go_heap_inuse_mb_before_roles"`
	HeapAfterMB  float64 `json:"plugin_go_heap_inuse_mb_after_roles"`
	Note         string  `json:"note"`
}

type roleCold struct {
	Readers         int     `json:"readers"`
	BrokerLatencyMs float64 `json:"broker_latency_ms"`
	RoleAccounts    string  `json:"role_allowed_accounts"`
	ConfigAccounts  string  `json:"config_allowed_accounts"`
	Mints           int     `json:"upstream_mints"`
	OK              int     `json:"ok"`
	DistinctTokens  int     `json:"distinct_tokens"`
	// Portfolios is the portfolios claim of the token the readers got.
	Portfolios   string  `json:"token_portfolios"`
	Narrowed     bool    `json:"token_narrowed_to_role"`
	WaitedOnMint int     `json:"readers_that_waited_on_the_mint"`
	Latency      stats   `json:"latency"`
	Seconds      float64 `json:"seconds"`
}

const (
	rolesRatioConfig = "rr-config"
	rolesRatioRole   = "rr-role"
	rolesColdConfig  = "rcold-config"
	rolesColdRole    = "rcold-role"
)

// alorPortfolios are the sandbox's ALOR login P012345's portfolios
// (sandbox.AlorRefreshToken and every token AddAlorRefreshToken makes).
var alorPortfolios = []string{"D12345", "D67890", "G11111"}

func runRoles(ctx context.Context, e *env, cfg rolesConfig) (*rolesResult, error) {
	// Long-lived tokens and leases: no lease of this phase expires (to be
	// revoked through the plugin) during a later one.
	e.sb.SetFinamTokenLifetime(24 * time.Hour)
	e.sb.SetAlorTokenLifetime(24 * time.Hour)
	e.sb.SetLatency(0)
	res := &rolesResult{}
	var err error
	// Memory first: the cold readers' burst and the 16 clients leave the
	// plugin's heap (and RSS) larger for a while, which would hide what
	// the roles hold.
	if cfg.Roles > 0 {
		if res.Memory, err = rolesMemory(ctx, e, cfg.Roles, cfg.Configs); err != nil {
			return nil, err
		}
	}
	if res.Ratio, err = rolesRatio(ctx, e, cfg); err != nil {
		return nil, err
	}
	if cfg.ColdReaders > 0 {
		if res.Cold, err = rolesCold(ctx, e, cfg.ColdReaders, cfg.BrokerLatency); err != nil {
			return nil, err
		}
	}
	return res, nil
}

// credsToken reads creds/<name> and returns its access token.
func (e *env) credsToken(ctx context.Context, name string) (string, error) {
	var out struct {
		Data struct {
			AccessToken string `json:"access_token"`
		} `json:"data"`
	}
	if err := e.c.apiJSON(ctx, "GET", brokerMount+"/creds/"+name, nil, &out); err != nil {
		return "", err
	}
	return out.Data.AccessToken, nil
}

func rolesRatio(ctx context.Context, e *env, cfg rolesConfig) (*roleRatio, error) {
	body := map[string]any{"provider": "finam", "secret": sandbox.FinamReadOnlySecret, "base_url": e.sbURL, "verify": true}
	if err := e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+rolesRatioConfig, body, nil); err != nil {
		return nil, err
	}
	if err := e.c.apiJSON(ctx, "POST", brokerMount+"/roles/"+rolesRatioRole,
		map[string]any{"config": rolesRatioConfig, "require_readonly": true}, nil); err != nil {
		return nil, err
	}
	mints := e.sb.Calls(sessionsEP)
	ct, err := e.credsToken(ctx, rolesRatioConfig)
	if err != nil {
		return nil, err
	}
	rt, err := e.credsToken(ctx, rolesRatioRole)
	if err != nil {
		return nil, err
	}
	res := &roleRatio{Clients: cfg.Clients, Rounds: cfg.Rounds, SliceS: cfg.Slice.Seconds(),
		Config: brokerMount + "/creds/" + rolesRatioConfig, Role: brokerMount + "/creds/" + rolesRatioRole,
		SameToken: ct != "" && ct == rt}
	if n := e.sb.Calls(sessionsEP) - mints; n != 0 {
		e.logf("roles: the first reads of the config and its role made %d mint(s) (the config write verified: want 0)", n)
	}

	targets := []struct {
		name, path string
		acc        *sample
	}{{"config", res.Config, &sample{}}, {"role", res.Role, &sample{}}}
	for _, t := range targets {
		if s := closedLoop(ctx, e.c, t.path, cfg.Clients, cfg.Warm, nil); s.errors > 0 {
			return nil, fmt.Errorf("roles: warm-up of %s: %d errors, last: %s", t.path, s.errors, s.lastErr)
		}
	}
	mints = e.sb.Calls(sessionsEP)
	for r := range cfg.Rounds {
		p50 := map[string]float64{}
		for i := range targets {
			t := targets[(i+r)%len(targets)] // alternate who goes first
			s := closedLoop(ctx, e.c, t.path, cfg.Clients, cfg.Slice, nil)
			p50[t.name] = s.stats().P50ms
			t.acc.merge(s)
		}
		res.P50ByRound = append(res.P50ByRound, ratio(p50["role"], p50["config"]))
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
	res.Mints = e.sb.Calls(sessionsEP) - mints
	res.ConfigStats, res.RoleStats = targets[0].acc.stats(), targets[1].acc.stats()
	res.P50RoleOverC = ratio(res.RoleStats.P50ms, res.ConfigStats.P50ms)
	res.P99RoleOverC = ratio(res.RoleStats.P99ms, res.ConfigStats.P99ms)
	res.RPSRoleOverC = ratio(res.RoleStats.RPS, res.ConfigStats.RPS)
	e.logf("roles: %d clients: creds/<role> p50 %.3f p99 %.3f ms, creds/<config> p50 %.3f p99 %.3f ms (role/config p50 %.2f, p99 %.2f; rounds %v); same token %v",
		cfg.Clients, res.RoleStats.P50ms, res.RoleStats.P99ms, res.ConfigStats.P50ms, res.ConfigStats.P99ms,
		res.P50RoleOverC, res.P99RoleOverC, res.P50ByRound, res.SameToken)
	return res, nil
}

func rolesCold(ctx context.Context, e *env, readers int, brokerLatency time.Duration) (*roleCold, error) {
	roleAccts := []string{"D12345", "G11111"}
	// verify=false: nothing minted at the config write. The role write
	// checks its guards against the config's token (minting that one);
	// the role's narrowed token is minted only when first read.
	if err := e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+rolesColdConfig, map[string]any{
		"provider": "alor", "refresh_token": sandbox.AlorRefreshToken, "base_url": e.sbURL,
		"allowed_accounts": strings.Join(alorPortfolios, ","), "verify": false}, nil); err != nil {
		return nil, err
	}
	if err := e.c.apiJSON(ctx, "POST", brokerMount+"/roles/"+rolesColdRole, map[string]any{
		"config": rolesColdConfig, "allowed_accounts": strings.Join(roleAccts, ",")}, nil); err != nil {
		return nil, err
	}
	e.sb.SetLatency(brokerLatency)
	defer e.sb.SetLatency(0)
	mints := e.sb.Calls(sandbox.AlorRefreshEP)

	start := make(chan struct{})
	var (
		wg, ready sync.WaitGroup
		mu        sync.Mutex
		tokens    = map[string]int{}
		s         = &sample{}
	)
	for range readers {
		wg.Add(1)
		ready.Add(1)
		go func() {
			defer wg.Done()
			ready.Done()
			<-start
			t := time.Now()
			r := e.c.do(ctx, http.MethodGet, brokerMount+"/creds/"+rolesColdRole, nil, true)
			s.add(time.Since(t), r)
			if r.err == nil && r.status == http.StatusOK {
				var out struct {
					Data struct {
						AccessToken string `json:"access_token"`
					} `json:"data"`
				}
				if json.Unmarshal(r.body, &out) == nil {
					mu.Lock()
					tokens[out.Data.AccessToken]++
					mu.Unlock()
				}
			}
		}()
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	wg.Wait()
	res := &roleCold{
		Readers:         readers,
		BrokerLatencyMs: ms(brokerLatency),
		RoleAccounts:    strings.Join(roleAccts, ","),
		ConfigAccounts:  strings.Join(alorPortfolios, ","),
		Mints:           e.sb.Calls(sandbox.AlorRefreshEP) - mints,
		OK:              len(s.lat),
		DistinctTokens:  len(tokens),
		WaitedOnMint:    s.countOver(brokerLatency / 2),
		Latency:         s.stats(),
		Seconds:         round(time.Since(t0).Seconds(), 2),
	}
	for tok := range tokens {
		if claims, err := provider.JWTClaims(tok); err == nil {
			p, _ := claims["portfolios"].(string)
			res.Portfolios = p
			got := strings.Fields(p)
			slices.Sort(got)
			res.Narrowed = slices.Equal(got, roleAccts)
		}
		break
	}
	e.logf("roles: %d cold readers of a narrowed ALOR role: %d ok, %d upstream mint(s), %d token(s) reaching %q, %d waited on the mint",
		readers, res.OK, res.Mints, res.DistinctTokens, res.Portfolios, res.WaitedOnMint)
	if s.errors > 0 {
		e.logf("roles: cold reads: %d errors, last: %s", s.errors, s.lastErr)
	}
	return res, nil
}

// alorSubsets are the non-empty subsets of the ALOR portfolios, the full
// set last.
func alorSubsets() [][]string {
	var out [][]string
	for m := 1; m < 1<<len(alorPortfolios); m++ {
		var s []string
		for i, p := range alorPortfolios {
			if m&(1<<i) != 0 {
				s = append(s, p)
			}
		}
		out = append(out, s)
	}
	slices.SortStableFunc(out, func(a, b []string) int { return len(a) - len(b) })
	return out
}

func rolesMemoryConfig(i int) string { return fmt.Sprintf("rm-c%02d", i) }
func rolesMemoryRole(i int) string   { return fmt.Sprintf("rm-r%04d", i) }

func rolesMemory(ctx context.Context, e *env, roles, configs int) (*roleMemory, error) {
	pid, err := e.pluginPID()
	if err != nil {
		return nil, err
	}
	res := &roleMemory{Configs: configs, Roles: roles,
		Note: "RSS before the roles is read with the configs written and their tokens minted; after, with every role written and read once (ALOR roles narrowed to accounts of their own mint their token at that read). Finam roles are read-only over the read-only secret and share their config's token. Each reading follows 3 s of reads of one config by 4 clients (so the Go runtime collects and returns what earlier bursts left) and waits until RSS holds still (within 0.3 MB for 2 s, at most 20 s)."}
	res.RSSStart, _ = readMem(pid)
	isAlor := func(c int) bool { return c%2 == 1 }

	// The configs, each warm (its own token minted), each ALOR config with
	// a refresh token of its own, as separate desks would have.
	errs := parallel(ctx, configs, 8, func(c int) error {
		body := map[string]any{"provider": "finam", "secret": sandbox.FinamReadOnlySecret, "base_url": e.sbURL, "verify": false}
		if isAlor(c) {
			tok := fmt.Sprintf("bench-alor-%02d", c)
			e.sb.AddAlorRefreshToken(tok)
			body = map[string]any{"provider": "alor", "refresh_token": tok, "base_url": e.sbURL,
				"allowed_accounts": strings.Join(alorPortfolios, ","), "verify": false}
		}
		if err := e.c.apiJSON(ctx, "POST", brokerMount+"/config/"+rolesMemoryConfig(c), body, nil); err != nil {
			return err
		}
		_, err := e.credsToken(ctx, rolesMemoryConfig(c))
		return err
	})
	if errs.n > 0 {
		return nil, fmt.Errorf("roles: %d config writes failed, last: %v", errs.n, errs.last)
	}
	for c := range configs {
		if isAlor(c) {
			res.AlorConfigs++
		} else {
			res.FinamConfigs++
		}
	}
	res.RSSBefore, res.SettledBeforeS = e.settledMem(ctx, pid, rolesMemoryConfig(0))
	res.HeapBeforeMB = e.pluginHeapMB(ctx)
	res.FDsBefore = openFDs(pid)

	// Role i is over config i%configs, with lease bounds (a day or more,
	// so no lease expires during a later phase). Finam roles: read-only,
	// the secret's one account. ALOR roles: the next subset of the
	// portfolios.
	subsets := alorSubsets()
	narrowings := map[string]bool{}
	roleBody := func(i int) map[string]any {
		c := i % configs
		body := map[string]any{"config": rolesMemoryConfig(c), "ttl": 86400 + i%7*3600, "max_ttl": 2 * 86400}
		if isAlor(c) {
			sub := subsets[(i/configs)%len(subsets)]
			body["allowed_accounts"] = strings.Join(sub, ",")
		} else {
			body["require_readonly"] = true
			body["allowed_accounts"] = "1899011"
		}
		return body
	}
	for i := range roles {
		c := i % configs
		if !isAlor(c) {
			continue
		}
		if sub := subsets[(i/configs)%len(subsets)]; len(sub) < len(alorPortfolios) {
			res.NarrowedRoles++
			narrowings[rolesMemoryConfig(c)+":"+strings.Join(sub, ",")] = true
		}
	}
	res.NarrowedTokens = len(narrowings)

	t0 := time.Now()
	errs = parallel(ctx, roles, 16, func(i int) error {
		return e.c.apiJSON(ctx, "POST", brokerMount+"/roles/"+rolesMemoryRole(i), roleBody(i), nil)
	})
	if errs.n > 0 {
		return nil, fmt.Errorf("roles: %d role writes failed, last: %v", errs.n, errs.last)
	}
	res.WriteSeconds = round(time.Since(t0).Seconds(), 2)
	res.RoleWritesPerS = round(float64(roles)/time.Since(t0).Seconds(), 1)

	mints := func() int { return e.sb.Calls(sessionsEP) + e.sb.Calls(sandbox.AlorRefreshEP) }
	m0 := mints()
	t0 = time.Now()
	// Fewer workers than ALOR's concurrency limit allows the plugin anyway
	// (it keeps 4 ALOR calls in flight at most).
	errs = parallel(ctx, roles, 16, func(i int) error {
		return e.c.do(ctx, http.MethodGet, brokerMount+"/creds/"+rolesMemoryRole(i), nil, false).check("creds/" + rolesMemoryRole(i))
	})
	res.ReadSeconds = round(time.Since(t0).Seconds(), 2)
	res.UpstreamMints = mints() - m0
	res.Errors = errs.n
	if errs.last != nil {
		res.LastError = errs.last.Error()
	}
	res.RSSAfter, res.SettledAfterS = e.settledMem(ctx, pid, rolesMemoryConfig(0))
	res.HeapAfterMB = e.pluginHeapMB(ctx)
	res.FDsAfter = openFDs(pid)
	res.AddedMB = round(res.RSSAfter.RSSMB-res.RSSBefore.RSSMB, 1)
	res.PerRoleKB = round(res.AddedMB*1024/float64(roles), 2)
	e.logf("roles: %d roles over %d configs written in %.1fs, read in %.1fs (%d mints for %d narrowings, %d errors); plugin RSS %.1f MB before the roles, %.1f MB after (%+.1f MB, %.1f KB a role); Go heap in use %.1f -> %.1f MB",
		roles, configs, res.WriteSeconds, res.ReadSeconds, res.UpstreamMints, res.NarrowedTokens, res.Errors,
		res.RSSBefore.RSSMB, res.RSSAfter.RSSMB, res.AddedMB, res.PerRoleKB, res.HeapBeforeMB, res.HeapAfterMB)
	return res, nil
}

// settledMem reads the plugin's memory the same way each time: after 3 s of
// reads of creds/<name> by 4 clients (the Go runtime collects the garbage
// of earlier bursts and its scavenger returns the pages), once RSS has held
// within 0.3 MB for 2 s (at most 20 s). It returns the reading and how long
// it waited for RSS to hold still.
func (e *env) settledMem(ctx context.Context, pid int, name string) (procMem, float64) {
	closedLoop(ctx, e.c, brokerMount+"/creds/"+name, 4, 3*time.Second, nil)
	start := time.Now()
	var last []float64
	m, _ := readMem(pid)
	for time.Since(start) < 20*time.Second && ctx.Err() == nil {
		sleepCtx(ctx, 500*time.Millisecond)
		m, _ = readMem(pid)
		last = append(last, m.RSSMB)
		if n := len(last); n >= 5 {
			w := last[n-5:]
			if slices.Max(w)-slices.Min(w) <= 0.3 {
				break
			}
		}
	}
	return m, round(time.Since(start).Seconds(), 1)
}

// pluginHeapMB is the plugin's go_memstats_heap_inuse_bytes from
// <mount>/metrics, in MB (0 if it cannot be read).
func (e *env) pluginHeapMB(ctx context.Context) float64 {
	r := e.c.do(ctx, http.MethodGet, brokerMount+"/metrics", nil, true)
	if r.err != nil || r.status != http.StatusOK {
		return 0
	}
	for _, l := range strings.Split(string(r.body), "\n") {
		if v, ok := strings.CutPrefix(l, "go_memstats_heap_inuse_bytes "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err == nil {
				return round(f/1024/1024, 1)
			}
		}
	}
	return 0
}
