package backend

import (
	"fmt"
	"strings"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// checkGuards applies require_readonly and allowed_accounts to what the
// broker reported about tok. The error names the offending accounts.
func checkGuards(cfg *brokerConfig, tok *storedToken) error {
	if cfg.RequireReadOnly && !tok.ReadOnly {
		return fmt.Errorf("%w: require_readonly is set but %s reports this token can trade (accounts %s); issue a read-only token at the broker, or unset require_readonly", provider.ErrGuard, cfg.Provider, strings.Join(tok.AccountIDs, ", "))
	}
	if len(cfg.AllowedAccounts) > 0 && len(tok.AccountIDs) == 0 {
		// No evidence is not evidence of nothing: the broker did not say
		// which accounts the token reaches.
		return fmt.Errorf("%w: %s listed no account for this token, so allowed_accounts cannot be checked; unset allowed_accounts or use a secret whose token names its accounts", provider.ErrGuard, cfg.Provider)
	}
	if len(cfg.AllowedAccounts) > 0 {
		allowed := map[string]bool{}
		for _, a := range cfg.AllowedAccounts {
			allowed[a] = true
		}
		var outside []string
		for _, a := range tok.AccountIDs {
			if !allowed[a] {
				outside = append(outside, a)
			}
		}
		if len(outside) > 0 {
			return fmt.Errorf("%w: the token reaches accounts outside allowed_accounts: %s; limit the token to those accounts at the broker, or add them to allowed_accounts", provider.ErrGuard, strings.Join(outside, ", "))
		}
	}
	return nil
}
