// Command vault-plugin-secrets-broker is the Vault plugin binary.
package main

import (
	"fmt"
	"os"
	"time"

	hclog "github.com/hashicorp/go-hclog"
	"github.com/hashicorp/vault/sdk/plugin"

	"github.com/brokervault/vault-plugin-secrets-broker/backend"
)

// version is set at build time (-ldflags "-X main.version=v0.1.0") and
// reported to Vault as the plugin's running version; it must match the
// version the plugin is registered with.
var version = "v0.0.0-dev"

// walMinAgeEnv shortens how old a rotation record must be before Vault
// replays it, for the end-to-end test of crash recovery (set with
// `vault plugin register -env`). Production leaves it unset.
const walMinAgeEnv = "BROKER_WAL_ROLLBACK_MIN_AGE"

func main() {
	// An operator checks what a downloaded binary is before registering it
	// (docs/install.md); Vault starts plugins with no such argument.
	if len(os.Args) == 2 && (os.Args[1] == "-version" || os.Args[1] == "--version") {
		fmt.Println("vault-plugin-secrets-broker", version)
		return
	}
	// JSON lines are what Vault's plugin client parses into its own log at
	// each line's level; plain text it logs whole at DEBUG, which a server
	// at the default level drops, errors included.
	logger := hclog.New(&hclog.LoggerOptions{JSONFormat: true})
	opts := backend.Options{Version: version}
	if v := os.Getenv(walMinAgeEnv); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			logger.Error("ignoring an invalid "+walMinAgeEnv, "value", v)
		} else {
			opts.WALRollbackMinAge = d
		}
	}
	if err := plugin.ServeMultiplex(&plugin.ServeOpts{
		BackendFactoryFunc: backend.FactoryWith(opts),
		Logger:             logger,
	}); err != nil {
		logger.Error("plugin shutting down", "error", err)
		os.Exit(1)
	}
}
