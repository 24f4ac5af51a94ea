package backend

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/vault/sdk/framework"
	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

func (b *backend) pathRotateRoot() []*framework.Path {
	return []*framework.Path{{
		Pattern: "rotate-root/" + framework.GenericNameRegex("name"),
		Fields: map[string]*framework.FieldSchema{
			"name": {Type: framework.TypeString, Description: "Name of the config whose long-lived secret to rotate.", Required: true},
		},
		Operations: map[logical.Operation]framework.OperationHandler{
			logical.UpdateOperation: &framework.PathOperation{Callback: b.pathRotateRootWrite, Summary: "Push the long-lived secret forward now, where the broker allows it.", ForwardPerformanceStandby: true, ForwardPerformanceSecondary: true},
		},
		HelpSynopsis:    "Rotate a config's long-lived secret now (" + strings.Join(b.providersWhere(rotating), ", ") + ": refresh the rotating secret).",
		HelpDescription: fmt.Sprintf(strings.TrimSpace(rotateHelp), orList(b.providersWhere(rotating)), andList(b.providersWhere(func(s provider.Spec) bool { return !rotating(s) }))),
	}}
}

const rotateHelp = `
For %s, refreshes the rotating secret now: the broker replaces the
refresh token, and the plugin stores the new one before anything uses it. The
response shows the new expiry times, never the tokens.

The long-lived secrets of %s cannot be rotated through an API:
create a new one at the broker's portal and write it to config/<name>.
`

func (b *backend) pathRotateRootWrite(ctx context.Context, req *logical.Request, d *framework.FieldData) (*logical.Response, error) {
	name := d.Get("name").(string)
	cfg, err := b.config(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	if cfg == nil {
		return logical.ErrorResponse("no config named %q", name), nil
	}
	if !b.rotates(cfg) {
		return logical.ErrorResponse("%s has no API to rotate its long-lived secret: create a new one at the broker's portal and write it to config/%s", cfg.Provider, name), nil
	}
	// One refresh now, shared with any that is already running.
	_, tok, err := b.refreshNow(ctx, req.Storage, name)
	if errors.Is(err, errConfigNotFound) {
		return logical.ErrorResponse("no config named %q", name), nil
	}
	if err != nil {
		return failed(issuing, fmt.Sprintf("config %q: rotation failed: %v", name, err), err)
	}
	_, rec, err := b.view(ctx, req.Storage, name)
	if err != nil {
		return nil, err
	}
	return &logical.Response{Data: map[string]any{
		"access_token_expires_at":  formatTime(tok.ExpiresAt),
		"refresh_token_expires_at": formatTime(rec.SecretExpiresAt),
		"rotated_at":               formatTime(rec.LastRefresh),
	}}, nil
}
