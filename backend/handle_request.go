package backend

import (
	"context"
	"fmt"
	"strings"

	"github.com/hashicorp/vault/sdk/helper/errutil"
	"github.com/hashicorp/vault/sdk/logical"
)

// Vault's field conversion quotes a value it cannot convert in its error
// ("got unconvertible type ..., value: ..."). For a secret field given as a
// list or an object that would echo the secret, so those requests are
// refused here, before the framework sees them, with a message that names
// the field and not the value.

func (b *backend) secretTypeError(req *logical.Request) error {
	if !strings.HasPrefix(req.Path, "config/") || req.Data == nil {
		return nil
	}
	for _, name := range b.providerFieldNames() {
		if v, ok := req.Data[name]; ok {
			if _, isString := v.(string); !isString && v != nil {
				return fmt.Errorf("%s: must be a string", name)
			}
		}
	}
	return nil
}

// HandleRequest refuses every request on storage of a newer schema
// (migrations.go) and secret fields of the wrong type, then defers to the
// framework.
func (b *backend) HandleRequest(ctx context.Context, req *logical.Request) (*logical.Response, error) {
	if handled, err := b.refusal(req); handled {
		return nil, err
	}
	if err := b.secretTypeError(req); err != nil {
		return logical.ErrorResponse(err.Error()), nil
	}
	return b.Backend.HandleRequest(ctx, req)
}

// HandleExistenceCheck does the same for the existence check, which Vault
// runs before the request and which also converts fields.
func (b *backend) HandleExistenceCheck(ctx context.Context, req *logical.Request) (bool, bool, error) {
	// On storage of a newer schema the check would read it; "not checked"
	// lets the request through to HandleRequest's refusal.
	if b.refused.Load() != nil {
		return false, false, nil
	}
	if err := b.secretTypeError(req); err != nil {
		return false, false, errutil.UserError{Err: err.Error()}
	}
	return b.Backend.HandleExistenceCheck(ctx, req)
}
