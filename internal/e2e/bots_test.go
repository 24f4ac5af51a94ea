package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
	"github.com/brokervault/vault-plugin-secrets-broker/internal/vaulttest"
)

// botTokenLifetime is the sandbox's Finam JWT lifetime for the bot tests:
// long enough that a token is never handed out near its end on a busy
// machine, short enough to see one token change in half a minute.
const botTokenLifetime = 30 * time.Second

// systemPython is the interpreter the Python example is documented with:
// Debian's, where python3-hvac installs.
const systemPython = "/usr/bin/python3"

// botPolicy is the policy docs/examples/*/README.md give a bot: read one
// config's creds, renew and revoke those leases (lease id in the URL).
func botPolicy(config string) string {
	return fmt.Sprintf(`path "broker/creds/%[1]s" { capabilities = ["read"] }
path "sys/leases/renew/broker/creds/%[1]s/*"  { capabilities = ["update"] }
path "sys/leases/revoke/broker/creds/%[1]s/*" { capabilities = ["update"] }
`, config)
}

// exampleBot runs one of the example bots; both take the same flags.
type exampleBot struct {
	name string
	argv []string
}

// requirePythonHvac fails (never skips) when the system Python lacks hvac:
// the Python example is part of the test suite.
func requirePythonHvac(t *testing.T) {
	t.Helper()
	out, err := exec.Command(systemPython, "-c", "import hvac").CombinedOutput()
	if err != nil {
		t.Fatalf("the Python bot example needs the Debian package python3-hvac for %s: apt-get install -y python3-hvac (%v: %s)", systemPython, err, bytes.TrimSpace(out))
	}
}

// buildGoBot builds docs/examples/go-bot inside its own module (vetting it
// first: nothing else vets that module).
func buildGoBot(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(vaulttest.RepoRoot(), "docs", "examples", "go-bot")
	bin := filepath.Join(t.TempDir(), "go-bot")
	for _, args := range [][]string{{"vet", "./..."}, {"build", "-o", bin, "."}} {
		cmd := exec.Command("go", args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go %s in docs/examples/go-bot: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return bin
}

func exampleBots(t *testing.T) []exampleBot {
	requirePythonHvac(t)
	return []exampleBot{
		{"python", []string{systemPython, filepath.Join(vaulttest.RepoRoot(), "docs", "examples", "python-bot", "bot.py")}},
		{"go", []string{buildGoBot(t)}},
	}
}

// botEvent is one line of a bot's output: event=<name> k=v ...
type botEvent struct {
	at     time.Time
	name   string
	fields map[string]string
	line   string
}

func (ev botEvent) seconds(k string) float64 {
	f, err := strconv.ParseFloat(strings.TrimSuffix(ev.fields[k], "s"), 64)
	if err != nil {
		return -1
	}
	return f
}

// parseBotLine reads "<time> event=name k=v k=\"quoted v\"".
func parseBotLine(line string) (botEvent, bool) {
	ts, rest, ok := strings.Cut(line, " ")
	if !ok {
		return botEvent{}, false
	}
	at, err := time.Parse(time.RFC3339Nano, ts)
	if err != nil {
		return botEvent{}, false
	}
	ev := botEvent{at: at, fields: map[string]string{}, line: line}
	for rest != "" {
		rest = strings.TrimLeft(rest, " ")
		k, after, ok := strings.Cut(rest, "=")
		if !ok {
			return botEvent{}, false
		}
		var v string
		if strings.HasPrefix(after, `"`) {
			q, err := strconv.QuotedPrefix(after)
			if err != nil {
				return botEvent{}, false
			}
			v, _ = strconv.Unquote(q)
			rest = after[len(q):]
		} else {
			v, rest, _ = strings.Cut(after, " ")
		}
		ev.fields[k] = v
	}
	ev.name = ev.fields["event"]
	return ev, ev.name != ""
}

// botRun is one finished bot process.
type botRun struct {
	code   int
	out    string // stdout and stderr
	events []botEvent
}

func (r botRun) named(name string) []botEvent {
	var out []botEvent
	for _, ev := range r.events {
		if ev.name == name {
			out = append(out, ev)
		}
	}
	return out
}

// runBot runs a bot to its end (or kills it at timeout) with the AppRole's
// files and VAULT_ADDR, and nothing else of the caller's VAULT_*.
func runBot(t *testing.T, v *vaulttest.Vault, b exampleBot, role *vaulttest.AppRole, timeout time.Duration, args ...string) botRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	argv := append(append([]string(nil), b.argv...), "--role-id-file="+role.RoleIDFile, "--secret-id-file="+role.SecretIDFile)
	cmd := exec.CommandContext(ctx, argv[0], append(argv[1:], args...)...)
	cmd.WaitDelay = 5 * time.Second
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, "VAULT_ADDR="+v.Addr)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	r := botRun{out: out.String()}
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Errorf("%s bot still running after %s: killed\n%s", b.name, timeout, r.out)
		r.code = -1
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		// Errorf, not Fatalf: runBot also runs on other goroutines.
		t.Errorf("running the %s bot: %v", b.name, err)
		r.code = -1
	}
	for _, line := range strings.Split(r.out, "\n") {
		if ev, ok := parseBotLine(strings.TrimSpace(line)); ok {
			r.events = append(r.events, ev)
		}
	}
	return r
}

// checkClean fails on what a bot must never print: a traceback or panic, and
// a token (every JWT starts with "eyJ"; the T-Invest token is named).
func checkClean(t *testing.T, r botRun, secrets ...string) {
	t.Helper()
	for _, bad := range []string{"Traceback", "panic:", "goroutine ", "eyJ"} {
		if strings.Contains(r.out, bad) {
			t.Errorf("bot output holds %q:\n%s", bad, r.out)
		}
	}
	for _, s := range secrets {
		if s != "" && strings.Contains(r.out, s) {
			t.Errorf("bot output holds a token")
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(r.out), "\n") {
		if _, ok := parseBotLine(line); !ok && line != "" {
			t.Errorf("bot printed a line that is not an event: %q", line)
		}
	}
}

// TestBots runs the example bots of docs/examples (Python with hvac through
// /usr/bin/python3, Go with vault/api) against a dev Vault and the sandbox,
// each with its own AppRole and a policy for one config:
//   - over one Finam token change: every token it used was accepted by the
//     sandbox's broker API, its lease was renewed, it moved to the new token
//     before the old one expired, and on exit its lease was revoked;
//   - T-Invest: GetAccounts with the token as a Bearer;
//   - a broker error on the bot's own call is reported and survived;
//   - a guard refusal (403) and a broker that refuses the secret end with a
//     clear message and an exit code, no traceback.
func TestBots(t *testing.T) {
	t.Parallel()
	bots := exampleBots(t)
	e := start(t, sandbox.Options{FinamTokenLifetime: botTokenLifetime})
	dir := filepath.Join(e.vault.Dir, "bots")
	roles := map[string]*vaulttest.AppRole{}
	role := func(config string) *vaulttest.AppRole {
		t.Helper()
		if r := roles[config]; r != nil {
			return r
		}
		r, err := e.vault.NewAppRole(dir, "bot-"+config, botPolicy(config), "token_ttl=1h", "token_max_ttl=4h")
		if err != nil {
			t.Fatal(err)
		}
		roles[config] = r
		return r
	}
	finam := func(name string, extra ...string) {
		e.cli(append([]string{"write", "broker/config/" + name, "provider=finam", "secret=" + sandbox.FinamSecret, "base_url=" + e.sbURL}, extra...)...)
	}

	t.Run("one token change", func(t *testing.T) {
		// Both bots at once, each on its own config (so each sees its own
		// token change), to keep the suite short.
		runs := make([]botRun, len(bots))
		detailsBefore := e.sb.Calls("POST /v1/sessions/details")
		var wg sync.WaitGroup
		for i, b := range bots {
			cfg := "finam-" + b.name
			finam(cfg)
			r := role(cfg)
			wg.Add(1)
			go func() {
				defer wg.Done()
				runs[i] = runBot(t, e.vault, b, r, 3*botTokenLifetime+30*time.Second,
					"--config="+cfg, "--broker-url="+e.sbURL, "--call-every=2s", "--tokens=2", fmt.Sprintf("--run=%ds", int(3*botTokenLifetime/time.Second)))
			}()
		}
		wg.Wait()
		brokerCalls := 0
		for i, b := range bots {
			r := runs[i]
			brokerCalls += len(r.named("broker_ok")) + len(r.named("broker_error"))
			t.Run(b.name, func(t *testing.T) {
				t.Logf("%s bot:\n%s", b.name, r.out)
				checkClean(t, r)
				if r.code != 0 {
					t.Fatalf("exit %d", r.code)
				}
				cfg := "finam-" + b.name
				if l := r.named("login"); len(l) != 1 || !strings.Contains(l[0].fields["policies"], "bot-"+cfg) {
					t.Errorf("no AppRole login with policy bot-%s: %v", cfg, l)
				}
				// Every token the bot used was accepted by the sandbox's
				// TokenDetails (it accepts only live JWTs it minted) and the
				// sandbox's expiry of it is the one Vault gave.
				expiresAt := map[string]string{}
				for _, c := range r.named("creds") {
					expiresAt[c.fields["token"]] = c.fields["expires_at"]
					if c.seconds("token_left") <= 0 {
						t.Errorf("Vault handed out an expired token: %s", c.line)
					}
				}
				used := map[string]bool{}
				for _, ok := range r.named("broker_ok") {
					tok := ok.fields["token"]
					used[tok] = true
					if ok.fields["accounts"] != "1899011,1899012" {
						t.Errorf("broker call did not return the sandbox's accounts: %s", ok.line)
					}
					if !sameSecond(ok.fields["broker_expires_at"], expiresAt[tok]) {
						t.Errorf("the broker's expiry %q of token %s is not the one Vault gave (%q)", ok.fields["broker_expires_at"], tok, expiresAt[tok])
					}
				}
				if len(used) < 2 {
					t.Fatalf("the bot used %d distinct token(s), want 2 (one token change)", len(used))
				}
				if len(r.named("broker_error")) > 0 {
					t.Errorf("the broker refused a call: %v", r.named("broker_error"))
				}
				// The lease was renewed while the token lived.
				if len(r.named("renew")) == 0 {
					t.Errorf("the bot never renewed its lease")
				}
				// It moved on before the token ended: every re-read happened
				// with time left on the token held.
				rereads := r.named("reread")
				if len(rereads) == 0 {
					t.Errorf("the bot never read creds again")
				}
				for _, rr := range rereads {
					if rr.seconds("token_left") <= 0 {
						t.Errorf("re-read only after the token expired: %s", rr.line)
					}
				}
				// A token change costs a few reads, not one per call.
				if n := len(r.named("creds")); n > 4*len(used) {
					t.Errorf("%d creds reads for %d tokens", n, len(used))
				}
				// On exit the bot ended its lease with its narrow policy.
				revoked := r.named("revoked")
				if len(revoked) == 0 {
					t.Fatalf("the bot did not revoke its lease on exit")
				}
				last := revoked[len(revoked)-1].fields["lease"]
				if exists, err := e.vault.LeaseExists(last); err != nil || exists {
					t.Errorf("lease %s still exists after the bot revoked it (err %v)", last, err)
				}
			})
		}
		// The bot's calls reached the sandbox's broker API: the counter grew
		// by at least as many calls as the bots report.
		if got := e.sb.Calls("POST /v1/sessions/details") - detailsBefore; got < brokerCalls {
			t.Errorf("the sandbox counted %d TokenDetails calls, the bots report %d", got, brokerCalls)
		}
	})

	t.Run("the policy in docs/examples/README.md is the one tested", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(vaulttest.RepoRoot(), "docs", "examples", "README.md"))
		if err != nil {
			t.Fatal(err)
		}
		_, after, ok := strings.Cut(string(b), "```hcl\n# bot-finam.hcl\n")
		block, _, _ := strings.Cut(after, "```")
		if !ok || block != botPolicy("finam") {
			t.Errorf("docs/examples/README.md's bot-finam.hcl block differs from the policy the bots are tested with:\n%s\nwant:\n%s", block, botPolicy("finam"))
		}
	})

	t.Run("the policy allows one config's creds and nothing else", func(t *testing.T) {
		tok, err := e.vault.Login(role("finam-python"))
		if err != nil {
			t.Fatal(err)
		}
		if r := e.vault.CLIAs(tok, "read", "broker/creds/finam-python"); !r.OK() {
			t.Errorf("the bot's token cannot read its creds: %s", r)
		}
		for _, p := range []string{"broker/creds/finam-go", "broker/config/finam-python"} {
			if r := e.vault.CLIAs(tok, "read", p); r.OK() || !strings.Contains(r.Stderr, "permission denied") {
				t.Errorf("the bot's token can read %s: %s", p, r)
			}
		}
	})

	// T-Invest's token is the long-lived one: the bot sends it as a Bearer.
	e.cli("write", "broker/config/tbank", "provider=tinvest", "token="+sandbox.TInvestReadOnlyToken,
		"base_url="+e.sbURL+sandbox.TInvestPrefix, "require_readonly=true")
	// A guard that cannot hold: require_readonly on a secret that can trade,
	// stored unchecked, so the refusal comes at creds read (403).
	finam("guarded", "require_readonly=true", "verify=false")
	// A secret the broker does not know, stored unchecked: every mint fails.
	e.cli("write", "broker/config/broken", "provider=finam", "secret=no-such-secret", "base_url="+e.sbURL, "verify=false")

	for _, b := range bots {
		t.Run(b.name+" T-Invest", func(t *testing.T) {
			before := e.sb.Calls(sandbox.TInvestGetAccountsEP)
			r := runBot(t, e.vault, b, role("tbank"), 60*time.Second,
				"--config=tbank", "--broker-url="+e.sbURL+sandbox.TInvestPrefix, "--call-every=500ms", "--tokens=1", "--run=30s")
			t.Logf("%s bot:\n%s", b.name, r.out)
			checkClean(t, r, sandbox.TInvestReadOnlyToken)
			if r.code != 0 {
				t.Fatalf("exit %d", r.code)
			}
			ok := r.named("broker_ok")
			if len(ok) != 1 || ok[0].fields["access"] != "READ_ONLY" || !strings.Contains(ok[0].fields["accounts"], "2000000001") {
				t.Fatalf("want one GetAccounts answered with the read-only token's accounts, got %v", ok)
			}
			if e.sb.Calls(sandbox.TInvestGetAccountsEP) <= before {
				t.Errorf("the sandbox saw no GetAccounts call")
			}
		})

		t.Run(b.name+" broker error on its own call", func(t *testing.T) {
			cfg := "fault-" + b.name
			finam(cfg) // a fresh token: the plugin calls no TokenDetails meanwhile
			e.sb.InjectFault("POST /v1/sessions/details", 503, 1)
			defer e.sb.InjectFault("POST /v1/sessions/details", 0, 0)
			r := runBot(t, e.vault, b, role(cfg), 60*time.Second,
				"--config="+cfg, "--broker-url="+e.sbURL, "--call-every=500ms", "--tokens=1", "--run=30s")
			t.Logf("%s bot:\n%s", b.name, r.out)
			checkClean(t, r)
			if r.code != 0 {
				t.Fatalf("exit %d: a transient broker error must not end the bot", r.code)
			}
			be := r.named("broker_error")
			if len(be) != 1 || be[0].fields["status"] != "503" || !strings.Contains(be[0].fields["message"], "unavailable") {
				t.Fatalf("want one broker_error status=503 with the broker's message, got %v", be)
			}
			if len(r.named("broker_ok")) != 1 {
				t.Errorf("the next call did not succeed")
			}
		})

		t.Run(b.name+" guard refused", func(t *testing.T) {
			r := runBot(t, e.vault, b, role("guarded"), 60*time.Second, "--config=guarded", "--broker-url="+e.sbURL, "--run=30s")
			t.Logf("%s bot:\n%s", b.name, r.out)
			checkClean(t, r)
			if r.code != 3 {
				t.Errorf("exit %d, want 3 (refused)", r.code)
			}
			ref := r.named("refused")
			if len(ref) != 1 || !strings.Contains(ref[0].fields["what"], "guard") || !strings.Contains(ref[0].fields["message"], `"guarded"`) {
				t.Fatalf("want one refused event naming the guard and the config, got %v", ref)
			}
			if len(r.named("broker_ok")) > 0 {
				t.Errorf("the bot called the broker without a token")
			}
		})

		t.Run(b.name+" broker refuses the secret", func(t *testing.T) {
			r := runBot(t, e.vault, b, role("broken"), 60*time.Second, "--config=broken", "--broker-url="+e.sbURL, "--run=30s")
			t.Logf("%s bot:\n%s", b.name, r.out)
			checkClean(t, r)
			if r.code != 4 {
				t.Errorf("exit %d, want 4 (no usable token)", r.code)
			}
			ce := r.named("creds_error")
			if len(ce) == 0 || !strings.Contains(ce[0].fields["message"], `"broken"`) {
				t.Fatalf("want a creds_error with Vault's message naming the config, got %v", ce)
			}
			if len(r.named("giving_up")) != 1 {
				t.Errorf("no giving_up event")
			}
		})
	}
}

// sameSecond compares two RFC 3339 times to the second.
func sameSecond(a, b string) bool {
	ta, err1 := time.Parse(time.RFC3339, a)
	tb, err2 := time.Parse(time.RFC3339, b)
	return err1 == nil && err2 == nil && ta.Truncate(time.Second).Equal(tb.Truncate(time.Second))
}
