package backend

import (
	"context"
	"strings"
	"testing"

	"github.com/hashicorp/vault/sdk/logical"
)

func TestSchemaMigration(t *testing.T) {
	cases := []struct {
		name    string
		stored  *schemaRecord
		wantErr string
	}{
		{"unversioned storage is migrated", nil, ""},
		{"current storage is left alone", &schemaRecord{Version: schemaVersion}, ""},
		{"storage of a newer plugin is refused", &schemaRecord{Version: schemaVersion + 1}, "newer plugin"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := &logical.InmemStorage{}
			if tc.stored != nil {
				e, _ := logical.StorageEntryJSON(schemaKey, tc.stored)
				s.Put(context.Background(), e)
			}
			b := New(Options{Version: "test"})
			conf := logical.TestBackendConfig()
			conf.StorageView = s
			if err := b.Setup(context.Background(), conf); err != nil {
				t.Fatal(err)
			}
			err := b.initialize(context.Background(), &logical.InitializationRequest{Storage: s})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			e, _ := s.Get(context.Background(), schemaKey)
			var rec schemaRecord
			if e == nil || e.DecodeJSON(&rec) != nil || rec.Version != schemaVersion {
				t.Fatalf("schema after init: %+v", rec)
			}
		})
	}
}
