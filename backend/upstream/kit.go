package upstream

// The provider kit: what every provider would otherwise write for itself
// when its broker fails. A provider's classify says what is particular to
// its broker; anything it leaves unsaid comes from here.

// DefaultHint is what to do about a failure of the given kind when the
// provider's classify gives no hint of its own. Client.Do adds it to every
// classified answer (a non-2xx response) that has none. Only a failure that
// says the same thing for every broker has one: today a 5xx.
func DefaultHint(broker string, f Failure) string {
	switch f {
	case Unavailable:
		return broker + " is failing; try again later"
	}
	return ""
}

// BadResponseError is the error for an answer the provider cannot use (not
// the JSON it expects, a field missing or malformed). msg must not quote a
// 2xx body: it may carry a fresh token (see NotExpectedJSON).
func BadResponseError(broker, op, msg string) *Error {
	return &Error{Broker: broker, Op: op, Failure: BadResponse, Message: msg}
}

// NotExpectedJSON is the message for a successful answer that does not
// decode: the body described (DescribeBody), never quoted. why, when not
// empty, says what the decoder found wrong, in words that repeat no value.
func NotExpectedJSON(resp *Response, why string) string {
	msg := "response is not the expected JSON (" + DescribeBody(resp)
	if why != "" {
		msg += ": " + why
	}
	return msg + ")"
}
