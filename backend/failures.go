package backend

import (
	"errors"
	"net/http"

	"github.com/hashicorp/vault/sdk/logical"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
	"github.com/brokervault/vault-plugin-secrets-broker/backend/upstream"
)

// callSite is the request a failed broker call or guard answers: it decides
// whose mistake a refusal is.
type callSite int

const (
	// verifying: a config write checks the secret it brings. A refusal is
	// the caller's input error, and nothing is stored.
	verifying callSite = iota
	// issuing: a creds read or rotate-root uses the stored secret. The
	// broker refusing it is a failing upstream, not the reader's mistake.
	issuing
	// renewing: a lease renew that asks the broker again (passthrough). A
	// refused token cannot be renewed: the caller must read creds again.
	renewing
)

// failureStatus is the one map from a failure to its HTTP status:
//
//	guard refused the token      400 verifying, 403 otherwise
//	declared expiry passed       400
//	daily quota spent, HTTP 429  429
//	broker refused the secret    400 verifying and renewing, 502 issuing
//	broker refused (other 4xx)   400 verifying, 502 otherwise
//	anything else                502
func failureStatus(at callSite, err error) int {
	switch {
	case errors.Is(err, provider.ErrGuard):
		if at == verifying {
			return http.StatusBadRequest
		}
		return http.StatusForbidden
	case errors.Is(err, errSecretExpired):
		return http.StatusBadRequest
	case errors.Is(err, errQuotaSpent):
		return http.StatusTooManyRequests
	}
	if ue, ok := upstream.AsError(err); ok {
		switch ue.Failure {
		case upstream.RateLimited:
			return http.StatusTooManyRequests
		case upstream.Unauthorized:
			if at != issuing {
				return http.StatusBadRequest
			}
		case upstream.Rejected:
			if at == verifying {
				return http.StatusBadRequest
			}
		}
	}
	return http.StatusBadGateway
}

// failed answers err with its status and msg (which names the config or
// the provider, and says what to do). A config write's 400 is an error
// response, which the CLI prints as is; every other failure is a coded
// error.
func failed(at callSite, msg string, err error) (*logical.Response, error) {
	status := failureStatus(at, err)
	if at == verifying && status == http.StatusBadRequest {
		return logical.ErrorResponse(msg), nil
	}
	return nil, logical.CodedError(status, msg)
}
