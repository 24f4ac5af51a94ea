package sandbox

import (
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"strings"
)

// The sandbox signs its JWTs so that a tampered or foreign token is refused,
// as the real broker would: Finam's with HS256, ALOR's with ES256. Both are
// compact JWS (RFC 7515): base64url header, payload and signature, joined by
// dots, the signature covering "header.payload".

var b64 = base64.RawURLEncoding

// encodeJWS makes a compact JWS of header and claims, signed by sign.
func encodeJWS(header string, claims map[string]any, sign func(input []byte) ([]byte, error)) (string, error) {
	body, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	input := b64.EncodeToString([]byte(header)) + "." + b64.EncodeToString(body)
	sig, err := sign([]byte(input))
	if err != nil {
		return "", err
	}
	return input + "." + b64.EncodeToString(sig), nil
}

// parseJWS splits a compact JWS whose header names alg, and returns what
// its signature covers, the signature, and the claims. The caller checks
// the signature before it trusts the claims.
func parseJWS(token, alg string) (input string, sig []byte, claims map[string]any, err error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", nil, nil, errors.New("malformed token")
	}
	rawHdr, err := b64.DecodeString(parts[0])
	if err != nil {
		return "", nil, nil, errors.New("malformed header")
	}
	var hdr struct {
		Alg string `json:"alg"`
	}
	if json.Unmarshal(rawHdr, &hdr) != nil || hdr.Alg != alg {
		return "", nil, nil, errors.New("not an " + alg + " token")
	}
	if sig, err = b64.DecodeString(parts[2]); err != nil {
		return "", nil, nil, errors.New("bad signature")
	}
	raw, err := b64.DecodeString(parts[1])
	if err != nil || json.Unmarshal(raw, &claims) != nil {
		return "", nil, nil, errors.New("malformed payload")
	}
	return parts[0] + "." + parts[1], sig, claims, nil
}

// signHS256 makes Finam's JWTs.
func signHS256(key []byte, claims map[string]any) string {
	tok, _ := encodeJWS(`{"alg":"HS256","typ":"JWT"}`, claims, func(input []byte) ([]byte, error) {
		mac := hmac.New(sha256.New, key)
		mac.Write(input)
		return mac.Sum(nil), nil
	})
	return tok // the claims are the sandbox's own, and always marshal
}

// verifyHS256 checks the signature of one of Finam's JWTs and returns the
// claims.
func verifyHS256(key []byte, token string) (map[string]any, error) {
	input, sig, claims, err := parseJWS(token, "HS256")
	if err != nil {
		return nil, err
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(input))
	if !hmac.Equal(sig, mac.Sum(nil)) {
		return nil, errors.New("bad signature")
	}
	return claims, nil
}

// signES256 makes ALOR's JWTs: ECDSA P-256 and SHA-256, the signature being
// r||s as JWS requires (not ASN.1).
func signES256(key *ecdsa.PrivateKey, claims map[string]any) (string, error) {
	return encodeJWS(`{"alg":"ES256","typ":"JWT","cty":"JWT"}`, claims, func(input []byte) ([]byte, error) {
		sum := sha256.Sum256(input)
		r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
		if err != nil {
			return nil, err
		}
		sig := make([]byte, 64)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
		return sig, nil
	})
}

// verifyES256 checks the signature of one of ALOR's JWTs and returns the
// claims.
func verifyES256(pub *ecdsa.PublicKey, token string) (map[string]any, error) {
	input, sig, claims, err := parseJWS(token, "ES256")
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(input))
	if len(sig) != 64 || !ecdsa.Verify(pub, sum[:], new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])) {
		return nil, errors.New("bad signature")
	}
	return claims, nil
}
