package sandbox

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"strings"
	"testing"
)

// TestJWS: each broker's verifier takes the tokens its signer made, and
// only those: not tampered ones, not the other broker's, not another key's.
func TestJWS(t *testing.T) {
	hsKey, otherHSKey := []byte("finam-key"), []byte("other-key")
	esKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherESKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	claims := map[string]any{"sub": "client-1", "exp": 1772360100}
	hs := signHS256(hsKey, claims)
	es, err := signES256(esKey, claims)
	if err != nil {
		t.Fatal(err)
	}
	// tamper replaces part i of a token.
	tamper := func(tok string, i int, part string) string {
		p := strings.Split(tok, ".")
		p[i] = part
		return strings.Join(p, ".")
	}
	verifiers := map[string]func(string) (map[string]any, error){
		"HS256": func(tok string) (map[string]any, error) { return verifyHS256(hsKey, tok) },
		"ES256": func(tok string) (map[string]any, error) { return verifyES256(&esKey.PublicKey, tok) },
	}
	otherES, _ := signES256(otherESKey, claims)
	for _, c := range []struct {
		name, alg, token string
		ok               bool
	}{
		{"HS256 as signed", "HS256", hs, true},
		{"ES256 as signed", "ES256", es, true},
		{"HS256 of another key", "HS256", signHS256(otherHSKey, claims), false},
		{"ES256 of another key", "ES256", otherES, false},
		{"ES256 token to the HS256 verifier", "HS256", es, false},
		{"HS256 token to the ES256 verifier", "ES256", hs, false},
		{"HS256 payload changed", "HS256", tamper(hs, 1, b64.EncodeToString([]byte(`{"sub":"client-2","exp":1772360100}`))), false},
		{"ES256 payload changed", "ES256", tamper(es, 1, b64.EncodeToString([]byte(`{"sub":"client-2","exp":1772360100}`))), false},
		{"HS256 header says none", "HS256", tamper(hs, 0, b64.EncodeToString([]byte(`{"alg":"none"}`))), false},
		{"HS256 without its signature", "HS256", tamper(hs, 2, ""), false},
		{"ES256 signature not base64url", "ES256", tamper(es, 2, "!!"), false},
		{"two parts", "HS256", hs[:strings.LastIndex(hs, ".")], false},
		{"four parts", "ES256", es + ".x", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := verifiers[c.alg](c.token)
			if c.ok && (err != nil || got["sub"] != "client-1") {
				t.Fatalf("refused its own token: %v, %v", got, err)
			}
			if !c.ok && (err == nil || got != nil) {
				t.Fatalf("accepted: %v", got)
			}
		})
	}
}
