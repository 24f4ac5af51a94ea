#!/usr/bin/python3
"""A minimal trading bot that takes its broker token from Vault.

What it shows (docs/consumers.md explains why):

* it logs in with its own AppRole: a policy that can read one
  broker/creds/<name> and renew or revoke those leases, nothing else;
* it reads broker/creds/<name> and calls the broker with the token the way
  that broker's API wants it (Finam: the JWT in the body of
  POST /v1/sessions/details; T-Invest: Authorization: Bearer on
  UsersService/GetAccounts);
* it renews its lease at two thirds of the lease's life, and reads creds
  again when a renewal can no longer extend the lease (the token is near its
  end): that read returns the next token, or the same one while it is still
  valid;
* a refused guard (403) or a broker error ends in a one-line message and an
  exit code, never a traceback.

It never prints a token: a token is shown as the first 12 hex digits of its
SHA-256, enough to tell two tokens apart.

Every event is one line of key=value pairs on stdout, for people and for the
e2e test (internal/e2e/bots_test.go) alike.

Needs python3-hvac (Debian/Ubuntu: apt-get install python3-hvac).
"""

import argparse
import datetime
import hashlib
import json
import random
import re
import signal
import sys
import time

try:
    import hvac
    import hvac.exceptions
    import requests
except ImportError as e:  # the one dependency: say which package to install
    print(
        "event=error message=%s"
        % json.dumps(
            "the Python module %r is missing: install the Debian package "
            "python3-hvac (apt-get install python3-hvac)" % e.name
        ),
        file=sys.stderr,
    )
    sys.exit(1)

# Exit codes, the same as the Go bot's.
EXIT_OK = 0
EXIT_SETUP = 1  # bad arguments, login refused, Vault unreachable at start
EXIT_REFUSED = 3  # Vault refused the creds: a guard or the policy said no
EXIT_BROKER = 4  # no usable token: the broker (through Vault or directly) keeps failing

TINVEST_GET_ACCOUNTS = "/tinkoff.public.invest.api.contract.v1.UsersService/GetAccounts"


class Stop(Exception):
    """Ends the bot with an exit code, after its message was logged."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def log(event, **kv):
    """One line: time, event, then key=value (quoted when needed)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    parts = [now.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (now.microsecond // 1000), "event=" + event]
    for k, v in kv.items():
        if v is None or v == "":
            continue
        v = str(v)
        if any(c in v for c in ' "=\t\n'):
            v = json.dumps(v)
        parts.append("%s=%s" % (k, v))
    print(" ".join(parts), flush=True)


def fingerprint(token):
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def vault_message(err):
    """What Vault said, without hvac's 'on GET url' suffix nor the
    "1 error occurred:" list Vault wraps a plugin's error in."""
    if isinstance(err, hvac.exceptions.VaultError) and err.errors:
        return "; ".join(unwrap(str(e)) for e in err.errors)
    if isinstance(err, requests.exceptions.RequestException):
        return "Vault is unreachable: %s" % type(err).__name__
    return str(err)


def unwrap(msg):
    m = re.match(r"^\d+ errors? occurred:(.*)$", msg, re.S)
    if not m:
        return msg.strip()
    items = [line.strip() for line in m.group(1).split("\n") if line.strip()]
    return "; ".join(i[2:] if i.startswith("* ") else i for i in items)


def vault_status(err):
    codes = {
        hvac.exceptions.InvalidRequest: 400,
        hvac.exceptions.Unauthorized: 401,
        hvac.exceptions.Forbidden: 403,
        hvac.exceptions.InvalidPath: 404,
        hvac.exceptions.RateLimitExceeded: 429,
        hvac.exceptions.InternalServerError: 500,
        hvac.exceptions.BadGateway: 502,
        hvac.exceptions.VaultDown: 503,
    }
    for cls, code in codes.items():
        if isinstance(err, cls):
            return str(code)
    return "unreachable" if isinstance(err, requests.exceptions.RequestException) else "error"


def duration(s):
    """Seconds from "90", "90s", "500ms", "1m30s" or "1h" (Go's duration
    syntax, so that both bots take the same flags)."""
    s = str(s).strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", s)
    if not parts or "".join(n + u for n, u in parts) != s:
        raise ValueError("not a duration: %r" % s)
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


def parse_time(s):
    """RFC 3339 as the plugin writes it (Z or an offset), to epoch seconds."""
    if not s:
        return None
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class Lease:
    """A creds lease: its id, when it ends, and when to act on it."""

    def __init__(self, resp, renew=True):
        self.id = resp["lease_id"]
        # False once a re-read returned the token already held: renewals
        # have stopped extending it, so the bot only reads again, at the
        # lease's end, until the next token comes.
        self.renew = renew
        self.ttl = int(resp["lease_duration"])
        self.renewable = bool(resp.get("renewable"))
        self.ends = time.time() + self.ttl
        # As Vault's own clients do: a grace of 10-20 % of the lease, within
        # which a renewal is pointless and the bot reads creds again.
        self.grace = self.ttl * random.uniform(0.1, 0.2)
        if not self.schedule():
            self.act_at = time.time()  # a lease this short: renew (and so re-read) at once

    def schedule(self):
        """Set act_at, the next renewal; False when the lease is already in
        its grace period, or would be by then: read creds again now."""
        left = self.ends - time.time()
        # Renew at two thirds of what is left, plus a third of the grace to
        # spread clients out (what Vault's LifetimeWatcher does).
        sleep = left * 2 / 3 + self.grace / 3
        self.act_at = time.time() + sleep
        return left > self.grace and left - sleep > self.grace


class Bot:
    def __init__(self, args):
        self.args = args
        # token="" so that a VAULT_TOKEN or ~/.vault-token is never picked
        # up: the bot's identity is its AppRole.
        self.vault = hvac.Client(token="", timeout=10)
        self.http = requests.Session()
        self.lease = None
        self.data = None
        self.token = ""
        self.expiry = None
        self.used = set()  # fingerprints a broker call succeeded with
        self.refused_in_row = 0
        self.vault_token_renew_at = None

    # --- Vault ----------------------------------------------------------

    def login(self):
        role_id = open(self.args.role_id_file).read().strip()
        secret_id = open(self.args.secret_id_file).read().strip()
        try:
            resp = self.vault.auth.approle.login(role_id=role_id, secret_id=secret_id)
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as e:
            log("login_failed", message=vault_message(e))
            raise Stop(EXIT_SETUP)
        auth = resp["auth"]
        log("login", policies=",".join(auth["policies"]), ttl="%ds" % auth["lease_duration"])
        self._schedule_vault_token(auth)

    def _schedule_vault_token(self, auth):
        # Vault revokes a token's leases with it: keep the bot's own token
        # alive, at two thirds of its TTL.
        ttl = int(auth.get("lease_duration") or 0)
        self.vault_token_renew_at = time.time() + ttl * 2 / 3 if ttl else None

    def keep_vault_token(self):
        if self.vault_token_renew_at is None or time.time() < self.vault_token_renew_at:
            return
        try:
            resp = self.vault.auth.token.renew_self()
            auth = resp["auth"]
            if int(auth["lease_duration"]) > 60:
                self._schedule_vault_token(auth)
                return
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as e:
            log("vault_token", message=vault_message(e))
        # At the token's max TTL (or renewal refused): log in again. The
        # leases went with the old token, so read creds again too.
        self.login()
        self.read_creds()

    def read_creds(self):
        path = "broker/creds/" + self.args.config
        backoff = 1.0
        while True:
            try:
                resp = self.vault.read(path)
                if not resp or "data" not in resp:
                    raise hvac.exceptions.InvalidPath("%s returned nothing" % path, errors=["%s returned nothing" % path])
                self.install(resp)
                return
            except hvac.exceptions.Forbidden as e:
                # 403: the policy does not allow this path, or a guard of
                # the config (require_readonly, allowed_accounts) refused the
                # token. Retrying will not help; an operator must act.
                msg = vault_message(e)
                what = "a guard of the config refused the token"
                if "permission denied" in msg:
                    what = "this bot's Vault policy does not allow " + path
                log("refused", config=self.args.config, what=what, message=msg)
                raise Stop(EXIT_REFUSED)
            except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as e:
                log("creds_error", config=self.args.config, status=vault_status(e), message=vault_message(e))
                # Keep working with the token held while it lives; without
                # one the bot cannot do anything useful.
                if not self.token or (self.expiry is not None and self.expiry - time.time() < 2 * backoff):
                    log("giving_up", config=self.args.config, message="no valid broker token and Vault cannot issue one")
                    raise Stop(EXIT_BROKER)
                time.sleep(backoff)
                backoff = min(2 * backoff, 30.0)

    def install(self, resp):
        data = resp["data"]
        token = data["access_token"]
        if self.lease is not None and self.lease.id != resp["lease_id"]:
            # The old token stays valid for its other holders until its own
            # expiry; only our lease on it ends.
            self.revoke()
        changed = token != self.token
        self.lease, self.data, self.token = Lease(resp, renew=changed), data, token
        self.expiry = parse_time(data.get("expires_at"))  # empty for T-Invest
        log(
            "creds",
            lease=self.lease.id,
            ttl="%ds" % self.lease.ttl,
            renewable=str(self.lease.renewable).lower(),
            token=fingerprint(token),
            new=str(changed).lower(),
            expires_at=data.get("expires_at"),
            token_left=self.left(),
            warnings="; ".join(resp.get("warnings") or []),
        )

    def renew_or_reread(self):
        """The lease's two-thirds point: renew it, or read creds again."""
        lease = self.lease
        if not lease.renewable:
            log("reread", reason="the lease is not renewable", token_left=self.left())
            self.read_creds()
            return
        if not lease.renew:
            # Vault already said this token cannot be extended and the new
            # one was not ready at the last read: ask again.
            log("reread", reason="waiting for the next token", token_left=self.left())
            self.read_creds()
            return
        try:
            # The lease-scoped path (lease id in the URL) is what the bot's
            # policy grants.
            resp = self.vault.adapter.put("/v1/sys/leases/renew/" + lease.id, json={"increment": lease.ttl})
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as e:
            log("renew_failed", lease=lease.id, status=vault_status(e), message=vault_message(e))
            if isinstance(e, hvac.exceptions.VaultError):
                # Vault answered but would not renew (a guard no longer
                # holds, the lease is gone): read again.
                self.read_creds()
            else:
                # Vault unreachable: keep the token, try again soon.
                lease.act_at = time.time() + max(1.0, (lease.ends - time.time()) / 3)
            return
        lease.ends = time.time() + int(resp["lease_duration"])
        log("renew", lease=lease.id, ttl="%ds" % resp["lease_duration"], token_left=self.left())
        if not lease.schedule():
            # The renewal was capped at the token's expiry.
            log("reread", reason="the lease cannot be extended: the token is near its end", token_left=self.left())
            self.read_creds()

    def revoke(self):
        """End our lease (lease-scoped path). The token itself is shared."""
        if self.lease is None:
            return
        lease_id, self.lease = self.lease.id, None
        try:
            self.vault.adapter.put("/v1/sys/leases/revoke/" + lease_id)
            log("revoked", lease=lease_id)
        except (hvac.exceptions.VaultError, requests.exceptions.RequestException) as e:
            log("revoke_failed", lease=lease_id, message=vault_message(e))

    # --- the broker -----------------------------------------------------

    def call_broker(self):
        """One API call with the current token. Returns True to ask for a
        re-read (the broker refused the token)."""
        provider = self.data.get("provider")
        base = self.args.broker_url.rstrip("/")
        try:
            if provider == "finam":
                # Finam's session calls take the JWT in the body and refuse
                # an Authorization header.
                r = self.http.post(base + "/v1/sessions/details", json={"token": self.token}, timeout=10)
            elif provider == "tinvest":
                r = self.http.post(
                    base + TINVEST_GET_ACCOUNTS,
                    json={},
                    headers={"Authorization": "Bearer " + self.token},
                    timeout=10,
                )
            else:
                log("error", message="this example calls Finam and T-Invest only, not %r" % provider)
                raise Stop(EXIT_SETUP)
        except requests.exceptions.RequestException as e:
            log("broker_error", provider=provider, status="unreachable", message=type(e).__name__)
            return False
        if r.status_code != 200:
            log(
                "broker_error",
                provider=provider,
                status=r.status_code,
                token=fingerprint(self.token),
                message=broker_message(r),
            )
            if r.status_code == 401:
                self.refused_in_row += 1
                if self.refused_in_row >= 3:
                    log("giving_up", provider=provider, message="the broker keeps refusing the tokens Vault issues")
                    raise Stop(EXIT_BROKER)
                return True
            return False
        self.refused_in_row = 0
        body = r.json()
        fields = {"provider": provider, "token": fingerprint(self.token), "token_left": self.left()}
        if provider == "finam":
            fields.update(
                accounts=",".join(body.get("account_ids") or []),
                readonly=str(bool(body.get("readonly"))).lower(),
                broker_expires_at=body.get("expires_at"),
            )
        else:
            accounts = body.get("accounts") or []
            levels = sorted({a.get("accessLevel", "").replace("ACCOUNT_ACCESS_LEVEL_", "") for a in accounts})
            fields.update(accounts=",".join(a.get("id", "") for a in accounts), access=",".join(levels))
        log("broker_ok", **fields)
        self.used.add(fingerprint(self.token))
        if self.args.tokens and len(self.used) >= self.args.tokens:
            raise Stop(EXIT_OK)
        return False

    def left(self):
        if self.expiry is None:
            return "unknown"
        return "%.1fs" % (self.expiry - time.time())

    # --- the loop -------------------------------------------------------

    def run(self):
        deadline = time.time() + self.args.run if self.args.run else None
        self.login()
        self.read_creds()
        if self.call_broker():
            self.read_creds()
        next_call = time.time() + self.args.call_every
        while deadline is None or time.time() < deadline:
            now = time.time()
            wake = min(next_call, self.lease.act_at, deadline or next_call)
            if wake > now:
                time.sleep(wake - now)
                continue
            self.keep_vault_token()
            if time.time() >= self.lease.act_at:
                self.renew_or_reread()
            if time.time() >= next_call:
                next_call = time.time() + self.args.call_every
                if self.expiry is not None and self.expiry - time.time() < 1:
                    # Renewal should have moved us on already (Vault
                    # unreachable?): never send an expired token.
                    log("reread", reason="the token is about to expire", token_left=self.left())
                    self.read_creds()
                    continue
                if self.call_broker():
                    self.read_creds()
        raise Stop(EXIT_OK)


def broker_message(r):
    """'message' from a broker's error body (Finam's google.rpc.Status,
    T-Invest's gateway error), else a short excerpt."""
    try:
        body = r.json()
        msg = body.get("message")
        if msg:
            desc = body.get("description")
            return "%s (%s)" % (msg, desc) if desc not in (None, "") else msg
    except ValueError:
        pass
    return r.text.strip()[:200]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="finam", help="name of the broker config: the bot reads broker/creds/<config>")
    p.add_argument(
        "--broker-url",
        required=True,
        help="the broker's API root (Finam: scheme and host; T-Invest: the REST root ending in /rest)",
    )
    p.add_argument("--role-id-file", default="role-id", help="file holding the AppRole role_id")
    p.add_argument("--secret-id-file", default="secret-id", help="file holding the AppRole secret_id")
    p.add_argument("--call-every", type=duration, default="5s", help="how often to call the broker (5s, 500ms, ...)")
    p.add_argument("--run", type=duration, default="0", help="stop after this long (0: until SIGINT or SIGTERM)")
    p.add_argument(
        "--tokens", type=int, default=0, help="stop after a broker call succeeded with this many distinct tokens (0: never)"
    )
    args = p.parse_args()

    def on_signal(signum, frame):
        raise Stop(EXIT_OK)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    bot = Bot(args)
    try:
        bot.run()
    except Stop as s:
        code = s.code
    except OSError as e:  # unreadable role-id/secret-id file and the like
        log("error", message=str(e))
        code = EXIT_SETUP
    try:
        bot.revoke()
    except Stop:
        pass
    log("stop", tokens_used=len(bot.used), exit=code)
    sys.exit(code)


if __name__ == "__main__":
    main()
