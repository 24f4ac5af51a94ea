package upstream

import (
	"fmt"
	"mime"
)

// DescribeBody says what a body was without repeating any of it: its media
// type and length. A successful (2xx) answer may carry a fresh token, and
// Scrub only knows the secrets the plugin sent, so what a broker said in a
// 2xx body must never reach an error, last_error or a log.
func DescribeBody(resp *Response) string {
	if resp == nil || len(resp.Body) == 0 {
		return "an empty body"
	}
	return fmt.Sprintf("a %d-byte %s body", len(resp.Body), mediaType(resp.Header.Get("Content-Type")))
}

// knownTypes are the media types named as sent; any other is not repeated,
// since a broker controls the header as much as the body.
var knownTypes = map[string]bool{
	"application/json": true, "application/problem+json": true, "application/xml": true,
	"application/grpc": true, "application/octet-stream": true, "application/x-www-form-urlencoded": true,
	"text/html": true, "text/plain": true, "text/xml": true, "text/css": true, "text/javascript": true,
}

// mediaType is the Content-Type's media type when it is a known one.
func mediaType(ct string) string {
	if ct == "" {
		return "untyped"
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil || !knownTypes[mt] {
		return "unrecognised-type"
	}
	return mt
}
