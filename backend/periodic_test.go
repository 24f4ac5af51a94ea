package backend

import (
	"fmt"
	"testing"
	"time"
)

func TestSchedulePopsOnlyWhatIsDue(t *testing.T) {
	now := time.Now()
	cases := []struct {
		name    string
		configs int
		due     int
		max     int
		want    int
	}{
		{"nothing due", 1000, 0, 256, 0},
		{"one percent due", 10000, 100, 256, 100},
		{"more due than a tick takes", 1000, 600, 256, 256},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newSchedule()
			for i := range tc.configs {
				at := now.Add(time.Duration(i+1) * time.Hour)
				if i < tc.due {
					at = now.Add(-time.Duration(i+1) * time.Second)
				}
				s.set(fmt.Sprintf("c%d", i), at)
			}
			got := s.popDue(now, tc.max)
			if len(got) != tc.want {
				t.Fatalf("popped %d, want %d", len(got), tc.want)
			}
			if s.size() != tc.configs-tc.want {
				t.Fatalf("left %d", s.size())
			}
		})
	}
}

func TestScheduleReschedulesAndRemoves(t *testing.T) {
	now := time.Now()
	s := newSchedule()
	s.set("a", now.Add(time.Hour))
	s.set("b", now.Add(-time.Minute))
	s.set("b", now.Add(2*time.Hour)) // moved later: no longer due
	s.set("c", now.Add(-time.Second))
	s.set("c", time.Time{}) // removed
	if got := s.popDue(now, 10); len(got) != 0 {
		t.Fatalf("popped %v", got)
	}
	s.set("a", now.Add(-time.Second))
	if got := s.popDue(now, 10); len(got) != 1 || got[0] != "a" {
		t.Fatalf("popped %v", got)
	}
}

func TestExpiryWarning(t *testing.T) {
	now := time.Now()
	cases := []struct {
		name    string
		expires time.Time
		window  time.Duration
		want    string
	}{
		{"unknown expiry", time.Time{}, 0, ""},
		{"far away", now.Add(200 * 24 * time.Hour), 0, ""},
		{"inside the default 30 days", now.Add(10*24*time.Hour + time.Hour), 0, "in 10 days"},
		{"custom window", now.Add(50 * 24 * time.Hour), 60 * 24 * time.Hour, "in 50 days"},
		{"expired", now.Add(-time.Hour), 0, "expired at"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &brokerConfig{Provider: "alor", SecretExpiresAt: tc.expires, ExpiryWarning: tc.window}
			got := c.expiryWarning(now)
			if (tc.want == "") != (got == "") || !containsAll(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}
