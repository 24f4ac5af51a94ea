package provider

import (
	"encoding/base64"
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/internal/brokertest"
)

// Fuzz targets for the JWT helpers every minted provider reads broker
// tokens with. The broker (or whatever answers in its place) controls the
// input entirely. Run one with, e.g.:
//
//	go test -run '^$' -fuzz '^FuzzJWTClaims$' -fuzztime 30s ./backend/provider

// FuzzJWTClaims: a token the parser accepts has three parts and a JSON
// object payload whose claims survive a round trip through JSON; a token it
// refuses gets a short error that quotes none of the payload (ALOR's provider
// relies on that to keep the JWT out of its error text).
func FuzzJWTClaims(f *testing.F) {
	for _, p := range []string{
		`{"iss":"broker-sandbox/finam","sub":"client-1a2b3c","jti":"5f0c","iat":1767225600,"exp":1767226500}`,
		`{"sub":"P012345","ein":"99001","clientid":"12345","agreements":"1234567 7654321","portfolios":"D12345 D67890 G11111","scope":"OrdersRead OrdersCreate Trades Personal Stats","iss":"Alor.Identity","aud":"Client WARP","iat":1767225600,"exp":1767227400}`,
		`{"exp":1.7672265005e9,"iat":0,"nested":{"a":[1,2,{"b":null}]},"uni":"Брокерский счёт"}`,
		`{}`, `[]`, `"exp"`, `{"exp":`, ``,
	} {
		f.Add(brokertest.JWT(`{"alg":"HS256","typ":"JWT"}`, p))
	}
	f.Add("eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjE3NjcyMjc0MDB9.")
	f.Add("a.b")
	f.Add("a.b.c.d")
	f.Add("..")
	f.Add("x.eyJleHAiOjE3NjcyMjc0MDB9==.y") // padded payload
	f.Add("x.eyJleHAiOjE3NjcyMjc0MDB9%.y")
	f.Fuzz(checkJWTClaims)
}

// TestFuzzFindingNullPayload: a JWT whose payload is JSON null is accepted
// with a nil claims map and no error, though the parser's contract (and its
// own error text) is that the payload is a JSON object.
func TestFuzzFindingNullPayload(t *testing.T) {
	checkJWTClaims(t, brokertest.JWT(`{"alg":"HS256"}`, `null`))
}

func checkJWTClaims(t *testing.T, token string) {
	claims, err := JWTClaims(token)
	parts := strings.Split(token, ".")
	if err != nil {
		if claims != nil {
			t.Fatalf("claims %v with error %v", claims, err)
		}
		msg := err.Error()
		if len(msg) > 300 {
			t.Fatalf("error is %d bytes long", len(msg))
		}
		if len(parts) == 3 {
			if p := parts[1]; len(p) >= 12 && strings.Contains(msg, p) {
				t.Fatalf("error quotes the encoded payload: %q", msg)
			}
			raw, derr := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
			if p := string(raw); derr == nil && len(p) >= 12 && strings.ContainsAny(p, `{":`) && strings.Contains(msg, p) {
				t.Fatalf("error quotes the payload: %q", msg)
			}
		}
		return
	}
	if len(parts) != 3 {
		t.Fatalf("accepted a token of %d parts", len(parts))
	}
	if claims == nil {
		t.Fatal("accepted a token with no claims object")
	}
	// Round trip: the claims, encoded into a token again, read the same.
	b, err := json.Marshal(claims)
	if err != nil {
		t.Fatalf("claims do not marshal: %v", err)
	}
	again, err := JWTClaims(parts[0] + "." + base64.RawURLEncoding.EncodeToString(b) + "." + parts[2])
	if err != nil {
		t.Fatalf("re-encoded claims refused: %v", err)
	}
	if !reflect.DeepEqual(claims, again) {
		t.Fatalf("claims changed in a round trip:\n%#v\n%#v", claims, again)
	}
}

// FuzzNumericDate: a positive NumericDate is read as that many seconds after
// the epoch, in UTC, to the second; nothing else is read as a date.
func FuzzNumericDate(f *testing.F) {
	for _, s := range []string{
		`{"exp":1767226500}`, `{"exp":1767226500.75}`, `{"exp":0}`, `{"exp":-1}`,
		`{"exp":"1767226500"}`, `{"exp":null}`, `{"exp":true}`, `{"exp":1e12}`,
		`{"exp":253402300799}`, `{"exp":4e-324}`, `{}`,
	} {
		f.Add(s)
	}
	f.Fuzz(checkNumericDate)
}

// TestFuzzFindingNumericDateOverflow: an exp beyond the int64 range of
// seconds (or of time.Time) is read as ok with a time before the epoch (an
// overflow), instead of being refused. Fail-closed today (the token looks
// expired), but a wrong date all the same.
func TestFuzzFindingNumericDateOverflow(t *testing.T) {
	for _, p := range []string{`{"exp":1e300}`, `{"exp":9.22337203e18}`} {
		t.Run(p, func(t *testing.T) { checkNumericDate(t, p) })
	}
}

func checkNumericDate(t *testing.T, payload string) {
	var claims map[string]any
	if json.Unmarshal([]byte(payload), &claims) != nil {
		return
	}
	got, ok := NumericDate(claims, "exp")
	v, isNum := claims["exp"].(float64)
	if !ok {
		if !got.IsZero() {
			t.Fatalf("not ok but returned %v", got)
		}
		if isNum && v > 0 && v < 1e11 {
			t.Fatalf("refused a plain NumericDate %v", v)
		}
		return
	}
	if !isNum || v <= 0 {
		t.Fatalf("read %v (%T) as a date", claims["exp"], claims["exp"])
	}
	if got.Location() != time.UTC {
		t.Fatalf("not UTC: %v", got.Location())
	}
	// A positive NumericDate is not before the epoch, whatever its size:
	// an earlier time would be an int64 overflow read as a date.
	if got.Before(time.Unix(0, 0)) {
		t.Fatalf("exp %v read as %v (Unix %d), before the epoch", v, got, got.Unix())
	}
	if v < 1e15 {
		if want := int64(math.Floor(v)); got.Unix() != want {
			t.Fatalf("exp %v read as %d s, want %d", v, got.Unix(), want)
		}
	}
}

// FuzzLifetime: the skew-corrected window never ends after the broker's
// expiry, never ends later than the receipt time plus the broker's lifetime,
// and keeps the broker's lifetime.
func FuzzLifetime(f *testing.F) {
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	min15 := int64(15 * time.Minute)
	f.Add(base, base, base+min15)                      // clocks agree
	f.Add(base+int64(3*time.Minute), base, base+min15) // Vault ahead of the broker
	f.Add(base-int64(3*time.Minute), base, base+min15) // Vault behind the broker
	f.Add(base, int64(0), base+min15)                  // no iat
	f.Add(base, base+min15, base)                      // iat after exp
	f.Add(base, base, base)
	f.Fuzz(func(t *testing.T, receivedNs, issuedNs, expiresNs int64) {
		// Stay within a century of now so durations cannot saturate.
		const span = int64(100 * 365 * 24 * time.Hour)
		for _, v := range []int64{receivedNs, expiresNs} {
			if v < base-span || v > base+span {
				return
			}
		}
		if issuedNs != 0 && (issuedNs < base-span || issuedNs > base+span) {
			return
		}
		received, expires := time.Unix(0, receivedNs), time.Unix(0, expiresNs)
		var issued time.Time
		if issuedNs != 0 {
			issued = time.Unix(0, issuedNs)
		}
		gotIssued, gotExpires := Lifetime(received, issued, expires)
		if gotExpires.After(expires) {
			t.Fatalf("window ends %v, after the broker's expiry %v", gotExpires, expires)
		}
		if issued.IsZero() || !issued.Before(expires) {
			if !gotIssued.Equal(received) || !gotExpires.Equal(expires) {
				t.Fatalf("no usable iat: got [%v, %v], want [%v, %v]", gotIssued, gotExpires, received, expires)
			}
			return
		}
		life := expires.Sub(issued)
		if got := gotExpires.Sub(gotIssued); got != life {
			t.Fatalf("lifetime %v became %v", life, got)
		}
		if gotExpires.After(received.Add(life)) {
			t.Fatalf("window ends %v, after receipt+lifetime %v", gotExpires, received.Add(life))
		}
		if !gotExpires.Equal(expires) && !gotExpires.Equal(received.Add(life)) {
			t.Fatalf("window end %v is neither the broker's expiry nor receipt+lifetime", gotExpires)
		}
	})
}
