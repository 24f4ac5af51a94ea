package brokertest

import "testing"

func TestShown(t *testing.T) {
	const secret = "fz-Secret-7Qx9LmN2"
	for _, c := range []struct {
		name, text, without string
		secrets             []string
		want                string
	}{
		{"whole", "bad secret fz-Secret-7Qx9LmN2 given", "", []string{secret}, secret},
		{"whole, even if the broker said it", "echo fz-Secret-7Qx9LmN2", "echo fz-Secret-7Qx9LmN2", []string{secret}, secret},
		{"cut short by an excerpt", "…fz-Secre…", "", []string{secret}, secret},
		{"the second of two", "ab fz-Other-1", "", []string{secret, "fz-Other-1"}, "fz-Other-1"},
		{"a leading piece the broker's words explain", "prefix fz-Secre is a word here", "fz-Secre is a word here", []string{secret}, ""},
		{"less than a leading piece", "fz-Secr", "", []string{secret}, ""},
		{"a short secret is its own head", "key abcd", "abc", []string{"abcd"}, "abcd"},
		{"heads are counted in characters, not bytes", "ыыыы", "", []string{"ыыыыыыыыы!"}, ""},
		{"none", "Finam POST /v1/sessions: HTTP 401", "", []string{secret}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := Shown(c.text, c.without, c.secrets...); got != c.want {
				t.Fatalf("Shown(%q, %q) = %q, want %q", c.text, c.without, got, c.want)
			}
		})
	}
}
