// Command vault builds the real HashiCorp Vault binary (server, CLI and Agent)
// used by the end-to-end tests and `make dev`. It lives in its own module so the
// plugin's go.mod never depends on Vault's main module.
package main

import (
	"os"

	"github.com/hashicorp/vault/command"
)

func main() {
	os.Exit(command.Run(os.Args[1:]))
}
