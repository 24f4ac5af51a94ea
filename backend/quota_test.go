package backend

import (
	"testing"
)

// TestQuotaKeyKeepsStoredCounts pins where a login's daily count is
// stored: the key the backend used when it hashed the ChatApp login itself
// (sha256 of lower(email) NUL app_id), so an upgrade keeps today's count.
func TestQuotaKeyKeepsStoredCounts(t *testing.T) {
	b := New(Options{})
	var quoted int
	for _, name := range b.names {
		q := b.specs[name].Quota
		if q == nil {
			continue
		}
		quoted++
		if q.Call == "" || q.Key == nil || q.DefaultBudget < 1 || q.DefaultBudget > q.Limit {
			t.Errorf("%s declares an incomplete quota: %+v", name, *q)
		}
		if name != "chatapp" {
			continue
		}
		cfg := &brokerConfig{Provider: name, Secrets: map[string]string{"email": "Ops@Example.com", "app_id": "app-42", "password": "p"}}
		if got, want := quotaKey(q, cfg), "makes/88bac7dc602d70c6caabc8e1"; got != want {
			t.Fatalf("quota key = %s, want %s (the key existing counts are stored under)", got, want)
		}
	}
	if quoted == 0 {
		t.Fatal("no registered provider declares a quota")
	}
}

// TestSpecsAreComplete: every registered provider says what the backend
// shows for it (retire note, creds details) and describes its fields.
func TestSpecsAreComplete(t *testing.T) {
	for _, s := range ProviderSpecs() {
		if s.Name == "" || s.Display == "" || s.RetireNote == "" || s.DetailsHelp == "" || len(s.Environments) == 0 {
			t.Errorf("%s: incomplete Spec (name, display, retire note, details help, environments)", s.Name)
		}
		for _, f := range s.Fields {
			if f.Description == "" {
				t.Errorf("%s: field %s has no description", s.Name, f.Name)
			}
		}
		for opt := range s.OptionNotes {
			o, ok := providerOptions[opt]
			if !ok || !o.applies(s) {
				t.Errorf("%s: a note for option %s, which does not apply to it", s.Name, opt)
			}
		}
	}
}
