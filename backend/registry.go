package backend

import (
	"github.com/brokervault/vault-plugin-secrets-broker/backend/alor"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/bcs"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/chatapp"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/finam"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/tinvest"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// registry builds the built-in providers, in the order messages, help and
// the provider field's allowed values list them. Adding a broker is one
// package implementing provider.Provider and one line here; everything the
// backend says or accepts about a broker comes from its Spec.
//
// This is the only file of the generic backend that names a broker. clock
// is the backend's: T-Invest's per-user budgets refill and wait on it.
func registry(clock upstream.Clock) []provider.Provider {
	return []provider.Provider{
		finam.New(),
		tinvest.NewWithClock(clock),
		alor.New(),
		chatapp.New(),
		bcs.New(),
	}
}

// ProviderNames lists the built-in providers' names (the values of the
// config field "provider"), in registry order. Tests and tools that cover
// every provider take their list from here.
func ProviderNames() []string {
	specs := ProviderSpecs()
	out := make([]string, len(specs))
	for i, s := range specs {
		out[i] = s.Name
	}
	return out
}

// ProviderSpecs returns the built-in providers' Specs, in registry order.
func ProviderSpecs() []provider.Spec {
	ps := registry(upstream.SystemClock{})
	out := make([]provider.Spec, len(ps))
	for i, p := range ps {
		out[i] = p.Spec()
	}
	return out
}
