// Command go-bot is a minimal trading bot that takes its broker token from
// Vault, the way docs/consumers.md recommends for a long-running Go program:
//
//   - it logs in with its own AppRole (a policy that can read one
//     broker/creds/<name> and renew or revoke those leases, nothing else);
//   - it reads broker/creds/<name> and calls the broker with the token the
//     way that broker's API wants it (Finam: the JWT in the body of
//     POST /v1/sessions/details; T-Invest: Authorization: Bearer on
//     UsersService/GetAccounts);
//   - a vault/api LifetimeWatcher renews the lease while the token lives and
//     says when renewals can no longer extend it: the bot then reads creds
//     again and gets the next token (or the same one, still valid);
//   - a refused guard (403) or a broker error ends in a one-line message and
//     an exit code, not a stack trace.
//
// It never prints a token: a token is shown as the first 12 hex digits of
// its SHA-256, enough to tell two tokens apart in the log.
//
// Every event is one line of key=value pairs on stdout, for people and for
// the e2e test (internal/e2e/bots_test.go) alike.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	vault "github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/api/auth/approle"
)

// Exit codes, the same as the Python bot's.
const (
	exitOK      = 0
	exitSetup   = 1 // bad flags, login refused, Vault unreachable at start
	exitRefused = 3 // Vault refused the creds: a guard or the policy said no
	exitBroker  = 4 // no usable token: the broker (through Vault or directly) keeps failing
)

type options struct {
	config       string
	brokerURL    string
	roleIDFile   string
	secretIDFile string
	callEvery    time.Duration
	runFor       time.Duration
	tokens       int
}

func main() {
	var o options
	flag.StringVar(&o.config, "config", "finam", "name of the broker config: the bot reads broker/creds/<config>")
	flag.StringVar(&o.brokerURL, "broker-url", "", "the broker's API root (Finam: scheme and host; T-Invest: the REST root ending in /rest)")
	flag.StringVar(&o.roleIDFile, "role-id-file", "role-id", "file holding the AppRole role_id")
	flag.StringVar(&o.secretIDFile, "secret-id-file", "secret-id", "file holding the AppRole secret_id")
	flag.DurationVar(&o.callEvery, "call-every", 5*time.Second, "how often to call the broker")
	flag.DurationVar(&o.runFor, "run", 0, "stop after this long (0: until SIGINT or SIGTERM)")
	flag.IntVar(&o.tokens, "tokens", 0, "stop after a broker call succeeded with this many distinct tokens (0: never)")
	flag.Parse()
	if o.brokerURL == "" {
		logEvent("error", "message", "-broker-url is required")
		os.Exit(exitSetup)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.runFor > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.runFor)
		defer cancel()
	}
	os.Exit(run(ctx, o))
}

// bot is the state of one run.
type bot struct {
	o      options
	vc     *vault.Client
	http   *http.Client
	used   map[string]bool // fingerprints of tokens a broker call succeeded with
	lease  *vault.Secret   // the creds lease held now
	token  string
	expiry time.Time // the token's own expiry; zero when the broker does not tell (T-Invest)
	// changed: the last creds read returned a token other than the one
	// held before it.
	changed bool
	// refusedInRow counts broker 401s in a row: one means "read creds
	// again", several mean the config's secret no longer works.
	refusedInRow int
}

func run(ctx context.Context, o options) int {
	cfg := vault.DefaultConfig() // VAULT_ADDR, VAULT_CACERT, ... from the environment
	if cfg.Error != nil {
		logEvent("error", "message", cfg.Error.Error())
		return exitSetup
	}
	vc, err := vault.NewClient(cfg)
	if err != nil {
		logEvent("error", "message", err.Error())
		return exitSetup
	}
	// Never pick up a VAULT_TOKEN from the environment: the bot's identity is
	// its AppRole.
	vc.ClearToken()
	b := &bot{o: o, vc: vc, http: &http.Client{Timeout: 10 * time.Second}, used: map[string]bool{}}

	authSecret, err := b.login(ctx)
	if err != nil {
		logEvent("login_failed", "message", vaultMessage(err))
		return exitSetup
	}
	// The bot's Vault token must outlive its leases (Vault revokes a token's
	// leases with it), so it is renewed too, and the bot logs in again when
	// it can no longer be renewed.
	authWatcher, err := vc.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: authSecret})
	if err != nil {
		logEvent("error", "message", err.Error())
		return exitSetup
	}
	go authWatcher.Start()
	defer func() { authWatcher.Stop() }()

	ticker := time.NewTicker(o.callEvery)
	defer ticker.Stop()
	for {
		code, done := b.readCreds(ctx)
		if done {
			return code
		}
		if code, done := b.callBroker(ctx); done {
			b.revoke()
			return code
		}

		// Renew at two thirds of the lease; DoneCh fires once the lease
		// cannot be extended past its grace period (the token is near its
		// end) or renewals kept failing until then. A re-read that returned
		// the token already held means renewals have stopped extending it
		// and the next token was not ready yet: do not renew, just read
		// again when this lease ends.
		behavior := vault.RenewBehaviorIgnoreErrors
		if !b.changed {
			behavior = vault.RenewBehaviorRenewDisabled
		}
		watcher, err := vc.NewLifetimeWatcher(&vault.LifetimeWatcherInput{
			Secret:        b.lease,
			Increment:     b.lease.LeaseDuration,
			RenewBehavior: behavior,
		})
		if err != nil {
			logEvent("error", "message", err.Error())
			return exitSetup
		}
		go watcher.Start()

		reread := false
		for !reread {
			select {
			case <-ctx.Done():
				watcher.Stop()
				b.revoke()
				logEvent("stop", "tokens_used", strconv.Itoa(len(b.used)))
				return exitOK
			case r := <-watcher.RenewCh():
				logEvent("renew", "lease", r.Secret.LeaseID, "ttl", seconds(r.Secret.LeaseDuration), "token_left", b.left())
			case err := <-watcher.DoneCh():
				reason := "the lease cannot be extended: the token is near its end"
				if !b.changed {
					reason = "waiting for the next token"
				}
				if err != nil {
					reason = "renewal failed: " + vaultMessage(err)
				}
				logEvent("reread", "reason", reason, "token_left", b.left())
				reread = true
			case err := <-authWatcher.DoneCh():
				// Our Vault token is at its end: log in again. Its leases
				// go with the old token, so read creds again too.
				if err != nil {
					logEvent("vault_token", "message", vaultMessage(err))
				}
				secret, err := b.login(ctx)
				if err != nil {
					logEvent("login_failed", "message", vaultMessage(err))
					watcher.Stop()
					return exitSetup
				}
				authWatcher.Stop()
				if authWatcher, err = vc.NewLifetimeWatcher(&vault.LifetimeWatcherInput{Secret: secret}); err != nil {
					logEvent("error", "message", err.Error())
					watcher.Stop()
					return exitSetup
				}
				go authWatcher.Start()
				reread = true
			case <-ticker.C:
				if !b.expiry.IsZero() && time.Until(b.expiry) < time.Second {
					// The watcher should have moved us on already (Vault
					// unreachable?): never send an expired token.
					logEvent("reread", "reason", "the token is about to expire", "token_left", b.left())
					reread = true
					continue
				}
				code, done := b.callBroker(ctx)
				if done {
					watcher.Stop()
					b.revoke()
					return code
				}
				if code == exitBroker {
					// The broker refused the token itself: read again.
					reread = true
				}
			}
		}
		watcher.Stop()
	}
}

// login authenticates with AppRole and makes the token the client's.
func (b *bot) login(ctx context.Context) (*vault.Secret, error) {
	roleID, err := os.ReadFile(b.o.roleIDFile)
	if err != nil {
		return nil, fmt.Errorf("reading the role_id: %w", err)
	}
	auth, err := approle.NewAppRoleAuth(strings.TrimSpace(string(roleID)), &approle.SecretID{FromFile: b.o.secretIDFile})
	if err != nil {
		return nil, err
	}
	secret, err := b.vc.Auth().Login(ctx, auth)
	if err != nil {
		return nil, err
	}
	if secret == nil || secret.Auth == nil {
		return nil, errors.New("AppRole login returned no token")
	}
	logEvent("login", "policies", strings.Join(secret.Auth.Policies, ","), "ttl", seconds(secret.Auth.LeaseDuration))
	return secret, nil
}

// readCreds reads broker/creds/<config>. On a failure it keeps the current
// token while that is still valid, retrying; done reports that the bot must
// exit with code.
func (b *bot) readCreds(ctx context.Context) (code int, done bool) {
	path := "broker/creds/" + b.o.config
	backoff := time.Second
	for {
		secret, err := b.vc.Logical().ReadWithContext(ctx, path)
		if err == nil && (secret == nil || secret.Data == nil) {
			err = fmt.Errorf("%s returned nothing", path)
		}
		if err == nil {
			return b.install(secret), false
		}
		if ctx.Err() != nil {
			b.revoke()
			return exitOK, true
		}
		var re *vault.ResponseError
		if errors.As(err, &re) && re.StatusCode == http.StatusForbidden {
			// 403: the policy does not allow this path, or a guard of the
			// config (require_readonly, allowed_accounts) refused the token.
			// Retrying will not help; an operator must act.
			what := "a guard of the config refused the token"
			if strings.Contains(vaultMessage(err), "permission denied") {
				what = "this bot's Vault policy does not allow " + path
			}
			logEvent("refused", "config", b.o.config, "what", what, "message", vaultMessage(err))
			b.revoke()
			return exitRefused, true
		}
		status := "unreachable"
		if re != nil {
			status = strconv.Itoa(re.StatusCode)
		}
		logEvent("creds_error", "config", b.o.config, "status", status, "message", vaultMessage(err))
		// Keep working with the token held, while it lives; without one the
		// bot cannot do anything useful.
		if b.token == "" || (!b.expiry.IsZero() && time.Until(b.expiry) < 2*backoff) {
			logEvent("giving_up", "config", b.o.config, "message", "no valid broker token and Vault cannot issue one")
			b.revoke()
			return exitBroker, true
		}
		select {
		case <-ctx.Done():
			b.revoke()
			return exitOK, true
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// install makes a creds response the current token and lease, and ends the
// previous lease (the old token stays valid for others until its expiry).
func (b *bot) install(secret *vault.Secret) int {
	tok, _ := secret.Data["access_token"].(string)
	exp, _ := secret.Data["expires_at"].(string) // RFC 3339; empty for T-Invest
	var expiry time.Time
	if exp != "" {
		expiry, _ = time.Parse(time.RFC3339, exp)
	}
	if b.lease != nil && b.lease.LeaseID != secret.LeaseID {
		b.revoke()
	}
	changed := tok != b.token
	b.lease, b.token, b.expiry, b.changed = secret, tok, expiry, changed
	logEvent("creds", "lease", secret.LeaseID, "ttl", seconds(secret.LeaseDuration),
		"renewable", strconv.FormatBool(secret.Renewable), "token", fingerprint(tok),
		"new", strconv.FormatBool(changed), "expires_at", exp, "token_left", b.left(),
		"warnings", strings.Join(secret.Warnings, "; "))
	return exitOK
}

// revoke ends the lease held, through the lease-scoped path the bot's policy
// grants. It ends this lease only: the token is shared and stays valid for
// its other holders until its own expiry.
func (b *bot) revoke() {
	if b.lease == nil || b.lease.LeaseID == "" {
		return
	}
	id := b.lease.LeaseID
	b.lease = nil
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := b.vc.Logical().WriteWithContext(ctx, "sys/leases/revoke/"+id, nil); err != nil {
		logEvent("revoke_failed", "lease", id, "message", vaultMessage(err))
		return
	}
	logEvent("revoked", "lease", id)
}

// callBroker makes one API call with the current token. A broker error is
// logged and the bot carries on (exitBroker asks for a re-read when the
// broker refused the token); done reports that the bot has used as many
// tokens as -tokens asked for.
func (b *bot) callBroker(ctx context.Context) (code int, done bool) {
	provider, _ := b.lease.Data["provider"].(string)
	var req *http.Request
	var err error
	switch provider {
	case "finam":
		// Finam's session calls take the JWT in the body and refuse an
		// Authorization header.
		body, _ := json.Marshal(map[string]string{"token": b.token})
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(b.o.brokerURL, "/")+"/v1/sessions/details", bytes.NewReader(body))
	case "tinvest":
		req, err = http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(b.o.brokerURL, "/")+"/tinkoff.public.invest.api.contract.v1.UsersService/GetAccounts", strings.NewReader("{}"))
		if req != nil {
			req.Header.Set("Authorization", "Bearer "+b.token)
		}
	default:
		logEvent("error", "message", fmt.Sprintf("this example calls Finam and T-Invest only, not %q", provider))
		return exitSetup, true
	}
	if err != nil {
		logEvent("error", "message", err.Error())
		return exitSetup, true
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := b.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return exitOK, false
		}
		logEvent("broker_error", "provider", provider, "status", "unreachable", "message", err.Error())
		return exitOK, false
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		logEvent("broker_error", "provider", provider, "status", strconv.Itoa(resp.StatusCode), "token", fingerprint(b.token), "message", brokerMessage(raw))
		if resp.StatusCode == http.StatusUnauthorized {
			if b.refusedInRow++; b.refusedInRow >= 3 {
				logEvent("giving_up", "provider", provider, "message", "the broker keeps refusing the tokens Vault issues")
				return exitBroker, true
			}
			return exitBroker, false
		}
		return exitOK, false
	}
	b.refusedInRow = 0

	fields := []string{"provider", provider, "token", fingerprint(b.token), "token_left", b.left()}
	switch provider {
	case "finam":
		var d struct {
			AccountIDs []string `json:"account_ids"`
			ReadOnly   bool     `json:"readonly"`
			ExpiresAt  string   `json:"expires_at"`
		}
		_ = json.Unmarshal(raw, &d)
		fields = append(fields, "accounts", strings.Join(d.AccountIDs, ","), "readonly", strconv.FormatBool(d.ReadOnly), "broker_expires_at", d.ExpiresAt)
	case "tinvest":
		var d struct {
			Accounts []struct {
				ID          string `json:"id"`
				AccessLevel string `json:"accessLevel"`
			} `json:"accounts"`
		}
		_ = json.Unmarshal(raw, &d)
		var ids []string
		levels := map[string]bool{}
		for _, a := range d.Accounts {
			ids = append(ids, a.ID)
			levels[strings.TrimPrefix(a.AccessLevel, "ACCOUNT_ACCESS_LEVEL_")] = true
		}
		var lv []string
		for l := range levels {
			lv = append(lv, l)
		}
		sort.Strings(lv)
		fields = append(fields, "accounts", strings.Join(ids, ","), "access", strings.Join(lv, ","))
	}
	logEvent("broker_ok", fields...)
	b.used[fingerprint(b.token)] = true
	if b.o.tokens > 0 && len(b.used) >= b.o.tokens {
		logEvent("stop", "tokens_used", strconv.Itoa(len(b.used)))
		return exitOK, true
	}
	return exitOK, false
}

// left is how long the held token still lives, for the log.
func (b *bot) left() string {
	if b.expiry.IsZero() {
		return "unknown"
	}
	return fmt.Sprintf("%.1fs", time.Until(b.expiry).Seconds())
}

// vaultMessage is what Vault said, without the request dump the client's
// error string carries.
func vaultMessage(err error) string {
	var re *vault.ResponseError
	if errors.As(err, &re) && len(re.Errors) > 0 {
		var msgs []string
		for _, e := range re.Errors {
			msgs = append(msgs, unwrap(e))
		}
		return strings.Join(msgs, "; ")
	}
	return err.Error()
}

// unwrap undoes the "1 error occurred:\n\t* ..." list Vault wraps a plugin's
// error in.
func unwrap(msg string) string {
	head, rest, ok := strings.Cut(msg, " occurred:")
	if !ok || !(strings.HasSuffix(head, " error") || strings.HasSuffix(head, " errors")) {
		return strings.TrimSpace(msg)
	}
	var items []string
	for _, line := range strings.Split(rest, "\n") {
		if line = strings.TrimSpace(line); line != "" {
			items = append(items, strings.TrimPrefix(line, "* "))
		}
	}
	return strings.Join(items, "; ")
}

// brokerMessage picks "message" out of a broker's error body (Finam's
// google.rpc.Status, T-Invest's gateway error), else a short excerpt.
func brokerMessage(raw []byte) string {
	var e struct {
		Message     string `json:"message"`
		Description any    `json:"description"`
	}
	if json.Unmarshal(raw, &e) == nil && e.Message != "" {
		if e.Description != nil && fmt.Sprint(e.Description) != "" {
			return fmt.Sprintf("%s (%v)", e.Message, e.Description)
		}
		return e.Message
	}
	s := strings.TrimSpace(string(raw))
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

func fingerprint(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return "sha256:" + hex.EncodeToString(sum[:6])
}

func seconds(n int) string { return strconv.Itoa(n) + "s" }

// logEvent prints one line: time, event, then key=value pairs (values with
// spaces or quotes are quoted).
func logEvent(event string, kv ...string) {
	var sb strings.Builder
	sb.WriteString(time.Now().UTC().Format("2006-01-02T15:04:05.000Z"))
	sb.WriteString(" event=")
	sb.WriteString(event)
	for i := 0; i+1 < len(kv); i += 2 {
		v := kv[i+1]
		if v == "" {
			continue
		}
		if strings.ContainsAny(v, " \"=\t\n") {
			v = strconv.Quote(v)
		}
		sb.WriteString(" " + kv[i] + "=" + v)
	}
	fmt.Println(sb.String())
}
