package tinvest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Access levels GetAccounts reports per account.
const (
	AccessFull     = "ACCOUNT_ACCESS_LEVEL_FULL_ACCESS"
	AccessReadOnly = "ACCOUNT_ACCESS_LEVEL_READ_ONLY"
	AccessNone     = "ACCOUNT_ACCESS_LEVEL_NO_ACCESS"
)

// Enum names by number, from the contract's users.proto. A proto3 JSON
// reader must accept an enum as its number too, so numbers are mapped to
// these names; values beyond a table are shown as sent.
var (
	accessLevels = []string{"ACCOUNT_ACCESS_LEVEL_UNSPECIFIED", AccessFull, AccessReadOnly, AccessNone}
	accountTypes = []string{"ACCOUNT_TYPE_UNSPECIFIED", "ACCOUNT_TYPE_TINKOFF", "ACCOUNT_TYPE_TINKOFF_IIS",
		"ACCOUNT_TYPE_INVEST_BOX", "ACCOUNT_TYPE_INVEST_FUND", "ACCOUNT_TYPE_DEBIT", "ACCOUNT_TYPE_SAVING", "ACCOUNT_TYPE_DFA"}
	accountStatuses = []string{"ACCOUNT_STATUS_UNSPECIFIED", "ACCOUNT_STATUS_NEW", "ACCOUNT_STATUS_OPEN",
		"ACCOUNT_STATUS_CLOSED", "ACCOUNT_STATUS_ALL"}
)

// getInfoResponse is UsersService/GetInfo (REST JSON is lowerCamelCase).
type getInfoResponse struct {
	PremStatus           bool     `json:"premStatus"`
	QualStatus           bool     `json:"qualStatus"`
	QualifiedForWorkWith []string `json:"qualifiedForWorkWith"`
	Tariff               string   `json:"tariff"`
	UserID               string   `json:"userId"`
	RiskLevelCode        string   `json:"riskLevelCode"`
}

// getAccountsResponse is UsersService/GetAccounts. proto3 JSON omits an
// empty list, so `{}` is a valid answer with no accounts.
type getAccountsResponse struct {
	Accounts []account `json:"accounts"`
}

type account struct {
	ID          string     `json:"id"`
	Type        flexString `json:"type"`
	Name        string     `json:"name"`
	Status      flexString `json:"status"`
	OpenedDate  string     `json:"openedDate"`
	ClosedDate  string     `json:"closedDate"`
	AccessLevel flexString `json:"accessLevel"`
}

// errorBody is the REST gateway's error, e.g.
// {"code":16,"message":"authentication token is missing or invalid","description":"40003"}.
// code is the gRPC status, description T-Invest's own code.
type errorBody struct {
	Code        flexString `json:"code"`
	Message     string     `json:"message"`
	Description flexString `json:"description"`
}

// flexString reads a JSON string or number as a string: T-Invest sends
// `description` either way, and proto3 JSON allows enums as numbers.
type flexString string

func (f *flexString) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	switch {
	case bytes.Equal(b, []byte("null")):
		*f = ""
		return nil
	case len(b) > 0 && b[0] == '"':
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		*f = flexString(s)
		return nil
	}
	var n json.Number
	if err := json.Unmarshal(b, &n); err != nil {
		return errors.New("want a string or a number")
	}
	*f = flexString(n.String())
	return nil
}

// enum names the value: as sent when it is a name, looked up when it is a
// number the table knows.
func (f flexString) enum(names []string) string {
	if n, err := strconv.Atoi(string(f)); err == nil && n >= 0 && n < len(names) {
		return names[n]
	}
	return string(f)
}

// decodeProblem says why a body did not decode without repeating any of it:
// encoding/json's messages can quote a value (a type error names the Go
// type, a syntax error the offending character).
func decodeProblem(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return fmt.Sprintf("malformed JSON at byte %d", syn.Offset)
	case errors.As(err, &typ):
		if typ.Field != "" {
			return "field " + typ.Field + " has the wrong type"
		}
		return "a value has the wrong type"
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "the JSON is cut short"
	case errors.Is(err, errNotObject), errors.Is(err, errTrailing):
		return err.Error()
	}
	return "a field could not be read"
}

var (
	errNotObject = errors.New("not a JSON object")
	errTrailing  = errors.New("trailing data after the JSON object")
)

// decodeJSON decodes exactly one JSON object, so a body cut short, glued to
// garbage or holding `null` is a bad response rather than half a result.
func decodeJSON(body []byte, out any) error {
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return errNotObject
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	if err := dec.Decode(out); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errTrailing
	}
	return nil
}
