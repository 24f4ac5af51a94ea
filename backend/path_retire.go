package backend

import (
	"context"
	"errors"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

func (b *backend) pathRetire() []*framework.Path {
	return []*framework.Path{{
		Pattern: "config/" + framework.GenericNameRegex("name") + "/retire$",
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the config whose tokens to retire.", Required: true},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRetireWrite, Summary: "Incident switch: no lease issued from now on carries a token minted before now.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
		},
		HelpSynopsis:    "Retire every token of a config: the next creds read gets a freshly minted one.",
		HelpDescription: strings.TrimSpace(retireHelp),
	}}
}

const retireHelp = `
Use with "vault lease revoke -prefix broker/creds/<name>" when a token may have
leaked. After this call no lease receives a token minted before it, including
one a mint in progress was about to deliver. Brokers offer no API to kill a
minted token: tokens already handed out stay valid until their own expiry,
which the response shows. To kill them sooner, act at the broker (see the
"note" field).
`

func (b *backend) pathRetireWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	cfg, old, err := b.retireConfig(ctx, req.Storage, name)
	if errors.Is(err, errConfigNotFound) {
		return logical.ErrorResponse("no config named %q", name), nil
	}
	if err != nil {
		return nil, err
	}
	spec := b.specs[cfg.Provider]
	data := map[string]any{
		"retired_at":              formatTime(b.now()),
		"issued_tokens_expire_at": "",
		// What kills tokens already handed out, at the broker.
		"note": spec.RetireNote,
	}
	if old != nil {
		data["issued_tokens_expire_at"] = formatTime(old.ExpiresAt)
	}
	resp := &logical.Response{Data: data}
	if spec.Issuance == provider.Passthrough {
		resp.AddWarning("retiring does not change a " + spec.Display + " token: " + spec.RetireNote)
	}
	return resp, nil
}
