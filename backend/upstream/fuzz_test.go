package upstream

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
)

// Fuzz targets for what every broker sends back through this package: the
// rate-limit headers it reads and the body excerpts it quotes.

// FuzzRetryAfter: how long a broker asks us to wait is never negative, is
// the number of seconds it sent when that is a plain count, and Retry-After
// wins over x-ratelimit-reset.
func FuzzRetryAfter(f *testing.F) {
	for _, s := range [][2]string{
		{"7", ""}, {"", "12"}, {"3", "12"}, {"soon", ""}, {"", "-5"}, {"Wed, 21 Oct 2015 07:28:00 GMT", ""},
		{time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat), ""}, {"0", "0"}, {" 5", ""},
		{"99999999999", ""}, {"1e3", ""}, {"+4", ""}, {"A", "100000"}, {"3600", ""}, {"", "3601"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(checkRetryAfter)
}

// TestFuzzFindingRetryAfterOverflow: a wait in seconds past the int64 range
// of nanoseconds overflows into a negative (or a wrapped) duration.
func TestFuzzFindingRetryAfterOverflow(t *testing.T) {
	checkRetryAfter(t, "", "9223372036854775807")
	checkRetryAfter(t, "9300000000", "")
}

func checkRetryAfter(t *testing.T, retryAfter, reset string) {
	h := http.Header{}
	if retryAfter != "" {
		h.Set("Retry-After", retryAfter)
	}
	if reset != "" {
		h.Set("x-ratelimit-reset", reset)
	}
	got := RetryAfter(h, time.Now())
	if got < 0 {
		t.Fatalf("Retry-After %q / x-ratelimit-reset %q read as a negative wait %v", retryAfter, reset, got)
	}
	// A count of seconds reads as that many seconds; a huge one may be
	// capped, but not below an hour, and never read as more than asked.
	asked := func(v string) (time.Duration, bool) {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			return 0, false
		}
		if n > int64(time.Hour/time.Second) {
			if got < time.Hour || (n < int64(1<<62/time.Second) && got > time.Duration(n)*time.Second) {
				t.Fatalf("Retry-After %q / x-ratelimit-reset %q (%d s) read as %v", retryAfter, reset, n, got)
			}
			return got, true
		}
		return time.Duration(n) * time.Second, true
	}
	if want, ok := asked(retryAfter); ok {
		if got != want {
			t.Fatalf("Retry-After %q read as %v", retryAfter, got)
		}
		return
	}
	if _, err := http.ParseTime(retryAfter); err != nil {
		if want, ok := asked(reset); ok && got != want {
			t.Fatalf("x-ratelimit-reset %q read as %v", reset, got)
		}
	}
	// Whatever was asked, a retry waits at least that long up to the
	// cap, and never longer than the cap.
	for _, limit := range []time.Duration{MaxForegroundWait, MaxBackgroundWait} {
		if d := backoff(1, got, limit); d < min(got, limit) || d > limit {
			t.Fatalf("backoff %v for a wait of %v (cap %v)", d, got, limit)
		}
	}
}

// FuzzScrubExcerpt: a scrubbed excerpt is short, has no control characters,
// is valid UTF-8 and never shows a secret of four or more bytes that was in
// the body.
func FuzzScrubExcerpt(f *testing.F) {
	f.Add(`{"message":"secret hunter2-secret is invalid"}`, "hunter2-secret")
	f.Add(strings.Repeat("x", 195)+"hunter2-secret", "hunter2-secret")
	f.Add("line\none\r\x00\ttab", "abc")
	f.Add("\xff\xfe invalid utf-8 hunter2", "hunter2")
	f.Add(strings.Repeat("ы", 300), "ыыыы")
	f.Fuzz(func(t *testing.T, body, secret string) {
		out := Excerpt([]byte(Scrub(body, secret)))
		if utf8.RuneCountInString(out) > 201 {
			t.Fatalf("excerpt of %d runes", utf8.RuneCountInString(out))
		}
		if !utf8.ValidString(out) {
			t.Fatalf("excerpt is not UTF-8: %q", out)
		}
		if strings.ContainsFunc(out, func(r rune) bool { return r < 0x20 }) {
			t.Fatalf("excerpt has control characters: %q", out)
		}
		// A secret of the kind brokers issue (no blanks or control
		// characters, not part of the "[redacted]" marker) never shows,
		// whole or cut short.
		clean := len(secret) >= 4 && utf8.ValidString(secret) && !strings.Contains("[redacted]…", secret) &&
			!strings.ContainsFunc(secret, func(r rune) bool { return r <= ' ' || r == utf8.RuneError || r == '…' })
		if clean && brokertest.Shown(out, body, secret) != "" {
			t.Fatalf("excerpt shows the secret %q: %q", secret, out)
		}
	})
}
