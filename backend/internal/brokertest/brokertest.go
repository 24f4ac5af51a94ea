// Package brokertest holds what the tests of the code that reads brokers'
// answers share: the check that no secret leaks into an error, the check
// that a broker's words are quoted only as an excerpt, and unsigned JWTs to
// feed the parsers. Only tests import it; it imports nothing of the plugin,
// so that every package under backend/ (upstream and provider included)
// can use it.
package brokertest

import (
	"encoding/base64"
	"strings"
	"testing"
	"unicode/utf8"
)

// headRunes is how long a leading piece of a secret must be to count as
// shown: a secret cut short by an excerpt still leaks its first part.
const headRunes = 8

// Shown returns the first of secrets that text shows: whole, or as a
// leading piece of 8 characters (the whole secret if shorter) that without,
// the broker's own words with the secrets taken out, does not explain.
// It returns "" if text shows none.
func Shown(text, without string, secrets ...string) string {
	for _, s := range secrets {
		if strings.Contains(text, s) {
			return s
		}
		head, n := s, 0
		for i := range s {
			if n == headRunes {
				head = s[:i]
				break
			}
			n++
		}
		if strings.Contains(text, head) && !strings.Contains(without, head) {
			return s
		}
	}
	return ""
}

// CheckLeak fails t if an error's text shows one of secrets (see Shown).
func CheckLeak(t testing.TB, text, without string, secrets ...string) {
	t.Helper()
	if s := Shown(text, without, secrets...); s != "" {
		t.Fatalf("error shows the secret %q: %q", s, text)
	}
}

// CheckExcerpt fails t if an error quotes a broker beyond an excerpt: what
// the broker said reaches Vault's responses, a config's last_error and the
// server log, so its message is bounded, its code is at most an excerpt's
// 200 characters and "…", and the error's text has no control characters.
func CheckExcerpt(t testing.TB, text, message, code string) {
	t.Helper()
	if m, c := utf8.RuneCountInString(message), utf8.RuneCountInString(code); m > 512 || c > 201 {
		t.Fatalf("error is not an excerpt: message of %d runes, code of %d", m, c)
	}
	if strings.ContainsFunc(text, func(r rune) bool { return r < 0x20 }) {
		t.Fatalf("error carries control characters: %q", text)
	}
}

// JWT returns a compact JWT of header and claims (JSON, or anything a
// broker might send) with a dummy signature: the providers read a broker's
// JWT claims and never verify its signature, which is the broker's to check.
func JWT(header, claims string) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(header)) + "." + enc([]byte(claims)) + ".c2ln"
}
