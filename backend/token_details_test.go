package backend

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

// A token's details are kept encoded in memory (toStored); what a read
// shows, and what storage holds, is what it was before: an object under
// "details", shown field by field, the same after a restart.
func TestTokenDetailsShowTheSameFromMemoryAndStorage(t *testing.T) {
	h := newSandboxHarness(t, sandbox.Options{})
	h.writeFinam("f", nil)
	first := h.ok(logical.ReadOperation, "creds/f", nil).Data["md_permissions"]
	if perms, _ := first.([]any); len(perms) != 2 {
		t.Fatalf("md_permissions = %#v, want the sandbox's two", first)
	}

	e, err := h.storage.Get(context.Background(), tokenPrefix+"f")
	if err != nil || e == nil {
		t.Fatalf("token record: %v %v", e, err)
	}
	var raw struct {
		Token struct {
			Details map[string]json.RawMessage `json:"details"`
		} `json:"token"`
	}
	if err := json.Unmarshal(e.Value, &raw); err != nil || raw.Token.Details["md_permissions"] == nil {
		t.Fatalf("stored details are not an object holding md_permissions: %s (%v)", e.Value, err)
	}

	mints := h.sb.Calls(sessionsEP)
	b2 := h.newBackend(nil)
	for _, path := range []string{"creds/f", "config/f"} {
		resp, err := h.doOn(b2, logical.ReadOperation, path, nil)
		if err != nil || resp == nil || resp.IsError() {
			t.Fatalf("%s after restart: %v %v", path, resp, err)
		}
		if got := resp.Data["md_permissions"]; !reflect.DeepEqual(got, first) {
			t.Errorf("%s after restart shows md_permissions %#v, before %#v", path, got, first)
		}
	}
	if n := h.sb.Calls(sessionsEP) - mints; n != 0 {
		t.Fatalf("the restarted backend minted %d tokens; the stored one was good", n)
	}
}

// Details damaged in storage hide themselves; the token is still served.
func TestDamagedTokenDetailsDoNotFailTheRead(t *testing.T) {
	for _, bad := range []string{`"not an object"`, `[1,2]`, `null`} {
		t.Run(bad, func(t *testing.T) {
			h := newSandboxHarness(t, sandbox.Options{})
			h.writeFinam("f", nil)
			tok := h.ok(logical.ReadOperation, "creds/f", nil).Data["access_token"]

			rec, err := readTokenRecord(context.Background(), h.storage, "f")
			if err != nil || rec.Token == nil {
				t.Fatalf("token record: %v", err)
			}
			rec.Token.Details = json.RawMessage(bad)
			if err := writeTokenRecord(context.Background(), h.storage, "f", rec); err != nil {
				t.Fatal(err)
			}
			mints := h.sb.Calls(sessionsEP)
			b2 := h.newBackend(nil)
			resp, err := h.doOn(b2, logical.ReadOperation, "creds/f", nil)
			if err != nil || resp == nil || resp.IsError() {
				t.Fatalf("creds after damage: %v %v", resp, err)
			}
			if resp.Data["access_token"] != tok || h.sb.Calls(sessionsEP) != mints {
				t.Fatalf("served %v (minted %d), want the stored token", resp.Data["access_token"], h.sb.Calls(sessionsEP)-mints)
			}
			if _, shown := resp.Data["md_permissions"]; shown {
				t.Fatalf("damaged details shown: %#v", resp.Data["md_permissions"])
			}
		})
	}
}

type failingMarshaler struct{ secret string }

func (f failingMarshaler) MarshalJSON() ([]byte, error) {
	return nil, errors.New("cannot encode " + f.secret)
}

// A provider's details that are not JSON are dropped with an error naming
// the key and its type, never quoting the value: json's own errors may.
func TestUnencodableDetailsNameTheKeyNotTheValue(t *testing.T) {
	const secret = "sk-live-SECRET123"
	cases := []struct {
		name    string
		details map[string]any
		wantKey string
	}{
		{"invalid json.Number", map[string]any{"ok": "x", "n": json.Number(secret)}, `"n" (json.Number)`},
		{"failing marshaler", map[string]any{"m": failingMarshaler{secret}}, `"m" (backend.failingMarshaler)`},
		{"unsupported type", map[string]any{"f": func() {}}, `"f" (func())`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := encodeDetails(tc.details)
			if err == nil || raw != nil {
				t.Fatalf("encoded %s, err %v", raw, err)
			}
			if strings.Contains(err.Error(), secret) || !strings.Contains(err.Error(), tc.wantKey) {
				t.Fatalf("error %q: want %s named and no value quoted", err, tc.wantKey)
			}
		})
	}
	if raw, err := encodeDetails(map[string]any{"a": []string{"b"}}); err != nil || string(raw) != `{"a":["b"]}` {
		t.Fatalf("plain details: %s %v", raw, err)
	}
}
