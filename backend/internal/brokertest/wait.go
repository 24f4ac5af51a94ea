package brokertest

import (
	"testing"
	"time"
)

// WaitBound is how long a test waits for something another goroutine
// should do at once (a held call reaching the broker, a write finishing).
// A few seconds: a slip that makes it never happen then fails that test,
// naming what did not happen, instead of hanging the package until go
// test's 10-minute panic, which names nothing.
const WaitBound = 10 * time.Second

// Wait receives from ch, failing the test with what (what did not happen)
// if nothing arrives within WaitBound. Call it from the test's goroutine.
func Wait[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(WaitBound):
		t.Fatalf("timed out after %s: %s", WaitBound, what)
		var zero T
		return zero
	}
}

// Send sends v on ch, failing the test with what if nobody takes it within
// WaitBound. Call it from the test's goroutine.
func Send[T any](t testing.TB, ch chan<- T, v T, what string) {
	t.Helper()
	select {
	case ch <- v:
	case <-time.After(WaitBound):
		t.Fatalf("timed out after %s: %s", WaitBound, what)
	}
}

// Held blocks a test double (a fake broker call, a held storage write) until
// release is closed or sent on, and reports false if that did not happen
// within WaitBound: the double then fails its call rather than hang the
// goroutine that made it, and the test's own bounded wait says what did not
// happen.
func Held[T any](release <-chan T) bool {
	select {
	case <-release:
		return true
	case <-time.After(WaitBound):
		return false
	}
}
