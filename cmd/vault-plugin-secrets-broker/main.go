// Command vault-plugin-secrets-broker is the Vault plugin binary.
package main

import (
	"os"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/plugin"

	"github.com/brokervault/vault-plugin-secrets-broker/backend"
)

// version is set at build time (-ldflags "-X main.version=v0.1.0") and
// reported to Vault as the plugin's running version; it must match the
// version the plugin is registered with.
var version = "v0.0.0-dev"

func main() {
	logger := hclog.New(&hclog.LoggerOptions{})
	if err := plugin.ServeMultiplex(&plugin.ServeOpts{
		BackendFactoryFunc: backend.Factory(version),
		Logger:             logger,
	}); err != nil {
		logger.Error("plugin shutting down", "error", err)
		os.Exit(1)
	}
}
