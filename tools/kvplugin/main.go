// Command vault-plugin-secrets-kv builds HashiCorp's kv secrets engine
// (github.com/hashicorp/vault-plugin-secrets-kv, the same code Vault bundles
// as its built-in kv) as an external plugin binary. The benchmark
// (internal/bench) registers it through the plugin catalog, exactly like the
// broker plugin, so its reads pay the same gRPC hop: it is the honest floor
// for a creds read. It lives in its own module so the plugin's go.mod never
// depends on it; scripts/build-kvplugin.sh builds it once and caches it.
//
// This is upstream's cmd/vault-plugin-secrets-kv/main.go.
package main

import (
	"os"

	hclog "github.com/hashicorp/go-hclog"
	kv "github.com/hashicorp/vault-plugin-secrets-kv"
	"github.com/hashicorp/vault/api"
	"github.com/hashicorp/vault/sdk/plugin"
)

func main() {
	apiClientMeta := &api.PluginAPIClientMeta{}
	flags := apiClientMeta.FlagSet()
	if err := flags.Parse(os.Args[1:]); err != nil {
		fatal(err)
	}
	tlsConfig := apiClientMeta.GetTLSConfig()
	if err := plugin.ServeMultiplex(&plugin.ServeOpts{
		BackendFactoryFunc: kv.Factory,
		// Kept from upstream: plugin TLS for Vaults without AutoMTLS.
		TLSProviderFunc: api.VaultPluginTLSProvider(tlsConfig),
	}); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	hclog.New(&hclog.LoggerOptions{}).Error("plugin shutting down", "error", err)
	os.Exit(1)
}
