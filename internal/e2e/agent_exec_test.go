package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// agentExecLifetime is the sandbox's Finam JWT lifetime for the exec test:
// three child starts (two token changes) take about two lifetimes.
const agentExecLifetime = 30 * time.Second

// childStart is one start of the supervised child, as it logged it.
type childStart struct {
	at        time.Time
	pid       int
	token     string // fingerprint
	expiresAt time.Time
	status    string // what the broker answered the child's first call
	line      string
}

func parseChildStart(line string) (childStart, error) {
	f := strings.Fields(line)
	if len(f) != 5 {
		return childStart{}, fmt.Errorf("child log line %q: want 5 fields", line)
	}
	sec, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return childStart{}, err
	}
	pid, err := strconv.Atoi(f[1])
	if err != nil {
		return childStart{}, err
	}
	exp, err := time.Parse(time.RFC3339, f[3])
	if err != nil {
		return childStart{}, fmt.Errorf("child started without FINAM_EXPIRES_AT (%q): %v", line, err)
	}
	return childStart{at: time.Unix(0, int64(sec*1e9)), pid: pid, token: f[2], expiresAt: exp, status: f[4], line: line}, nil
}

// TestAgentExecRestartsBotPerToken runs Vault Agent in process-supervisor
// mode (env_template + exec, as docs/agent.md shows it) with AppRole login,
// and watches the child through two token changes. The child asks the
// sandbox's Finam API whether its token works the moment it starts. It must
// never start with a token the broker refuses or one past its expiry, must
// be restarted once per new token and never with the token it already had,
// and the old child must be gone before the new one starts.
func TestAgentExecRestartsBotPerToken(t *testing.T) {
	t.Parallel()
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatalf("this test's child calls the broker with curl: install curl (%v)", err)
	}
	e := start(t, sandbox.Options{FinamTokenLifetime: agentExecLifetime})
	dir := filepath.Join(e.vault.Dir, "agent-exec")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	e.cli("write", "broker/config/finam", "provider=finam", "secret="+sandbox.FinamSecret, "base_url="+e.sbURL)
	role, err := e.vault.NewAppRole(dir, "tradebot", `path "broker/creds/finam" { capabilities = ["read"] }`+"\n", "token_ttl=1h")
	if err != nil {
		t.Fatal(err)
	}

	// The child: records when it started, with which token (a fingerprint)
	// and expiry, and what the broker said to the token; then idles as a
	// bot would until the Agent stops it.
	childLog := filepath.Join(dir, "child.log")
	child := filepath.Join(dir, "tradebot.sh")
	childScript := fmt.Sprintf(`#!/bin/sh
started=$(date +%%s.%%N)
code=$(printf '{"token":"%%s"}' "$FINAM_ACCESS_TOKEN" | %q -s -o /dev/null -w '%%{http_code}' -H 'Content-Type: application/json' --data-binary @- %q)
fp=$(printf %%s "$FINAM_ACCESS_TOKEN" | sha256sum | cut -c1-12)
echo "$started $$ $fp ${FINAM_EXPIRES_AT:-none} $code" >> %q
exec sleep 300
`, curl, e.sbURL+"/v1/sessions/details", childLog)
	if err := os.WriteFile(child, []byte(childScript), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killChildren(childLog) })

	hcl := fmt.Sprintf(`
vault {
  address = %q
}
auto_auth {
  method "approle" {
    config = {
      role_id_file_path                   = %q
      secret_id_file_path                 = %q
      remove_secret_id_file_after_reading = false
    }
  }
}
env_template "FINAM_ACCESS_TOKEN" {
  contents             = "{{ with secret \"broker/creds/finam\" }}{{ .Data.access_token }}{{ end }}"
  error_on_missing_key = true
}
env_template "FINAM_EXPIRES_AT" {
  contents             = "{{ with secret \"broker/creds/finam\" }}{{ .Data.expires_at }}{{ end }}"
  error_on_missing_key = true
}
exec {
  command                   = [%q]
  restart_on_secret_changes = "always"
  restart_stop_signal       = "SIGTERM"
}
`, e.vault.Addr, role.RoleIDFile, role.SecretIDFile, child)

	mintsBefore := e.sb.Calls("POST /v1/sessions")
	began := time.Now()
	agent := startAgent(t, e.vault, dir, "exec-agent", hcl)

	const wantStarts = 3
	var starts []childStart
	var stillRunning []string // a previous child alive when the next one started
	deadline := began.Add(3*agentExecLifetime + 20*time.Second)
	for time.Now().Before(deadline) && len(starts) < wantStarts {
		if gone, err := agent.exited(); gone {
			t.Fatalf("vault agent exited early (%v):\n%s", err, tailLines(agent.logText(), 40))
		}
		lines := readLines(childLog)
		for _, l := range lines[len(starts):] {
			s, err := parseChildStart(l)
			if err != nil {
				t.Fatal(err)
			}
			if n := len(starts); n > 0 {
				if _, err := os.Stat(fmt.Sprintf("/proc/%d", starts[n-1].pid)); err == nil {
					stillRunning = append(stillRunning, fmt.Sprintf("pid %d when pid %d started", starts[n-1].pid, s.pid))
				}
			}
			starts = append(starts, s)
		}
		time.Sleep(100 * time.Millisecond)
	}
	mints := e.sb.Calls("POST /v1/sessions") - mintsBefore
	rereads := len(logTimes(t, agent.logText(), "vault.read(broker/creds/finam): renewer done"))

	for i, s := range starts {
		line := fmt.Sprintf("child start %d at %s: token %s, %.1fs of its life left (%.0f%%), broker answered %s",
			i+1, s.at.Format("15:04:05.000"), s.token, s.expiresAt.Sub(s.at).Seconds(),
			100*s.expiresAt.Sub(s.at).Seconds()/agentExecLifetime.Seconds(), s.status)
		if i > 0 {
			// For the record (docs/consumers.md): how long the previous
			// child held its token after that token expired (negative:
			// replaced with life to spare).
			line += fmt.Sprintf("; the previous child's token expired %.1fs before this start", s.at.Sub(starts[i-1].expiresAt).Seconds())
		}
		t.Log(line)
	}
	t.Logf("%d child start(s), %d Agent re-read(s) of creds, %d mint(s) at the sandbox, in %.0fs",
		len(starts), rereads, mints, time.Since(began).Seconds())

	if len(starts) < wantStarts {
		t.Fatalf("the child started %d time(s) in %s, want %d (two token changes): the Agent does not restart it on a new token\n%s",
			len(starts), time.Since(began).Round(time.Second), wantStarts, tailLines(agent.logText(), 30))
	}
	for i, s := range starts {
		if s.status != "200" {
			t.Errorf("start %d: the broker answered %s to the token the child was started with", i+1, s.status)
		}
		if !s.at.Before(s.expiresAt) {
			t.Errorf("start %d at %s with a token that expired at %s", i+1, s.at.Format(time.RFC3339Nano), s.expiresAt.Format(time.RFC3339))
		}
		if i > 0 && s.token == starts[i-1].token {
			t.Errorf("start %d: restarted with the token it already had (%s)", i+1, s.token)
		}
		if i > 0 && !s.expiresAt.After(starts[i-1].expiresAt) {
			t.Errorf("start %d: the new token does not outlive the old one", i+1)
		}
	}
	if len(stillRunning) > 0 {
		t.Errorf("a new child started while the old one still ran: %v", stillRunning)
	}
	// One start per token: never more starts than tokens minted (the first
	// child's token may come from the config write, before mintsBefore).
	if len(starts) > mints+1 {
		t.Errorf("%d child starts for %d new tokens minted", len(starts), mints)
	}
}
