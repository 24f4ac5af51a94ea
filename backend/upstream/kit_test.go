package upstream

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestDoAddsTheDefaultHintOnlyWhereClassifyGaveNone: a 5xx a provider's
// classify left without a hint says the broker is failing; a hint of the
// provider's own is kept; a 4xx gets none.
func TestDoAddsTheDefaultHintOnlyWhereClassifyGaveNone(t *testing.T) {
	cases := []struct {
		name   string
		status int
		own    string
		want   string
	}{
		{"5xx without a hint", 500, "", "Test is failing; try again later"},
		{"5xx with the provider's hint", 500, "ask the broker", "ask the broker"},
		{"4xx without a hint", 400, "", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(tc.status) }))
			defer srv.Close()
			c, _ := New(Options{Broker: "Test"})
			call := Call{Method: "POST", URL: srv.URL, Op: "POST /x"}
			_, err := c.Do(context.Background(), call, func(r *Response) *Error {
				e := c.GenericError(call, r)
				e.Hint = tc.own
				return e
			})
			if ue, ok := AsError(err); !ok || ue.Hint != tc.want {
				t.Fatalf("err = %v, want hint %q", err, tc.want)
			}
		})
	}
}

// TestNotExpectedJSONDescribesNeverQuotes: the message for an unreadable
// 2xx answer repeats none of the body.
func TestNotExpectedJSONDescribesNeverQuotes(t *testing.T) {
	resp := &Response{Status: 200, Header: http.Header{"Content-Type": {"text/html"}}, Body: []byte("<html>at-secret</html>")}
	got := NotExpectedJSON(resp, "")
	if got != "response is not the expected JSON (a 22-byte text/html body)" || strings.Contains(got, "secret") {
		t.Fatalf("got %q", got)
	}
	if got := NotExpectedJSON(resp, "truncated"); !strings.HasSuffix(got, "body: truncated)") {
		t.Fatalf("got %q", got)
	}
	if e := BadResponseError("Test", "POST /x", got); e.Failure != BadResponse || e.Broker != "Test" || e.Op != "POST /x" {
		t.Fatalf("got %+v", e)
	}
}
