package upstream

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Every occurrence of every secret is scrubbed, not the first: a broker
// that echoes the request back (an error page quoting the body, a JSON
// error repeating the field) says the secret as often as it likes.
func TestScrubEveryOccurrence(t *testing.T) {
	const s1, s2 = "fz-Secret-7Qx9LmN2", "fz-Other-1Zt5"
	cases := []struct {
		name    string
		in      string
		secrets []string
		want    string
	}{
		{"once", "bad " + s1, []string{s1}, "bad [redacted]"},
		{"twice", s1 + " is not " + s1, []string{s1}, "[redacted] is not [redacted]"},
		{"back to back", s1 + s1, []string{s1}, "[redacted][redacted]"},
		{"three times", strings.Repeat(s1+",", 3), []string{s1}, strings.Repeat("[redacted],", 3)},
		{"two secrets twice each", s1 + s2 + " " + s2 + s1, []string{s1, s2}, "[redacted][redacted] [redacted][redacted]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := Scrub(tc.in, tc.secrets...); got != tc.want {
				t.Errorf("Scrub(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

// The same through a call: a broker's error body naming the secret twice
// reaches the error with neither.
func TestBrokerErrorEchoingTheSecretTwiceIsScrubbed(t *testing.T) {
	const secret = "fz-Secret-7Qx9LmN2"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"error":"token ` + secret + ` unknown","request":{"token":"` + secret + `"}}`))
	}))
	defer srv.Close()
	c, _ := New(Options{Broker: "Test"})
	_, err := c.Do(context.Background(), Call{Method: "POST", URL: srv.URL, Op: "POST /", Secrets: []string{secret}}, nil)
	if err == nil {
		t.Fatal("a 401 was not an error")
	}
	if strings.Contains(err.Error(), secret) || strings.Count(err.Error(), "[redacted]") != 2 {
		t.Fatalf("error = %q: want both occurrences redacted", err)
	}
}
