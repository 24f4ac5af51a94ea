// Command broker-sandbox serves local fakes of the brokers' token APIs on a
// loopback address, for `make dev`, the end-to-end tests and benchmarks.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/brokervault/vault-plugin-secrets-broker/internal/sandbox"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "broker-sandbox:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("broker-sandbox", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:9400", "loopback address to listen on")
	finamTTL := fs.Duration("finam-token-ttl", 15*time.Minute, "lifetime of minted Finam JWTs")
	finamLimit := fs.Int("finam-rate-limit", 200, "Finam requests a minute per method")
	latency := fs.Duration("latency", 0, "delay added to every broker response")
	if err := fs.Parse(args); err != nil {
		return err
	}
	host, _, err := net.SplitHostPort(*addr)
	if err != nil {
		return fmt.Errorf("-addr: %w", err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return errors.New("-addr must be a loopback address: the sandbox is for this machine only")
	}
	srv := sandbox.New(sandbox.Options{FinamTokenLifetime: *finamTTL, FinamRateLimit: *finamLimit, Latency: *latency})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second}
	fmt.Printf("broker-sandbox listening on http://%s\n", ln.Addr())
	fmt.Printf("  finam secrets: %s (trading), %s (read-only)\n", sandbox.FinamSecret, sandbox.FinamReadOnlySecret)
	fmt.Printf("  bcs tokens:    curl -XPOST http://%s/_sandbox/bcs/tokens -d '{\"readonly\":true}'\n", ln.Addr())
	fmt.Printf("  call counts:   curl http://%s/_sandbox/calls\n", ln.Addr())

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = hs.Shutdown(sctx)
	}()
	if err := hs.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
