package provider

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// JWTClaims decodes a JWT's payload without verifying its signature. The
// plugin is not the token's audience: it reads claims only to learn what the
// broker granted (expiry, accounts), and the broker verifies the token.
func JWTClaims(token string) (map[string]any, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, errors.New("not a JWT: want three dot-separated parts")
	}
	raw, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return nil, fmt.Errorf("JWT payload is not base64url: %w", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(raw, &claims); err != nil {
		return nil, fmt.Errorf("JWT payload is not a JSON object: %w", err)
	}
	if claims == nil { // the payload "null" decodes without error
		return nil, errors.New("JWT payload is not a JSON object")
	}
	return claims, nil
}

// NumericDate reads a JWT NumericDate claim (seconds since the epoch).
func NumericDate(claims map[string]any, name string) (time.Time, bool) {
	v, ok := claims[name].(float64)
	// Past year 9999 is garbage, and would overflow time arithmetic.
	if !ok || v <= 0 || v >= 253402300800 {
		return time.Time{}, false
	}
	sec := int64(v)
	return time.Unix(sec, int64((v-float64(sec))*1e9)).UTC(), true
}

// Lifetime corrects a broker-reported [issued, expires] window for clock skew
// between the broker and this host: the token is taken to expire at whichever
// comes first, the broker's expiry or the receipt time plus the lifetime.
// A Vault host running behind the broker would otherwise hand out dead tokens.
func Lifetime(received, issued, expires time.Time) (time.Time, time.Time) {
	if issued.IsZero() || !issued.Before(expires) {
		return received, expires
	}
	life := expires.Sub(issued)
	local := received.Add(life)
	if local.Before(expires) {
		return received, local
	}
	return expires.Add(-life), expires
}
