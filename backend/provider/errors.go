package provider

import "errors"

// ErrGuard marks a token refused because it reaches more than the config
// allows (accounts outside allowed_accounts, trading rights under
// require_readonly). A provider that narrows a token at the broker and finds
// the broker ignored the narrowing wraps this error. The backend answers it
// with 403 on creds and 400 on a config write, never as a broker failure.
var ErrGuard = errors.New("guard refused the token")
