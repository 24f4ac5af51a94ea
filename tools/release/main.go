// Command release builds the plugin's release artifacts reproducibly:
// static binaries for each target, one zip per target, and SHA256SUMS over
// all of them (docs/install.md). Two runs on one commit and one Go version
// give byte-identical files.
//
//	go run ./tools/release -version v0.2.0 -out dist
//	go run ./tools/release -version v0.2.0 -check   # build twice, compare
//
// It is a small stdlib program rather than goreleaser: `go run` of
// goreleaser downloads and compiles a large module tree on every fresh
// machine, far more than these four builds cost on two cores, and the
// project needs nothing from it that archive/zip does not give.
package main

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"time"
)

const plugin = "vault-plugin-secrets-broker"

// defaultTargets are what Vault servers run on.
var defaultTargets = []string{"linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64"}

// zipTime is every zip entry's modification time: a build's wall clock
// would make each zip differ. 1980-01-01 is the earliest time a zip's DOS
// date can hold.
var zipTime = time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)

var semver = regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$`)

func main() {
	version := flag.String("version", "", "release version, vX.Y.Z (stamped into the binary as its running version)")
	out := flag.String("out", "dist", "output directory (emptied first)")
	targets := flag.String("targets", strings.Join(defaultTargets, ","), "comma-separated GOOS/GOARCH list")
	check := flag.Bool("check", false, "build twice into temporary directories and fail unless SHA256SUMS are identical")
	flag.Parse()
	if !semver.MatchString(*version) {
		fatal(fmt.Errorf("-version %q: want vX.Y.Z", *version))
	}
	tl := strings.Split(*targets, ",")
	for _, t := range tl {
		if !strings.Contains(t, "/") {
			fatal(fmt.Errorf("-targets: %q is not GOOS/GOARCH", t))
		}
	}
	root, err := moduleRoot()
	if err != nil {
		fatal(err)
	}
	if !*check {
		if err := release(root, *version, *out, tl); err != nil {
			fatal(err)
		}
		return
	}
	if err := reproducible(root, *version, tl); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "release:", err)
	os.Exit(1)
}

// moduleRoot is the directory of the main module's go.mod, so the tool works
// from any directory of the clone.
func moduleRoot() (string, error) {
	b, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(b))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the plugin's module")
	}
	return filepath.Dir(gomod), nil
}

// release writes every target's binary and zip, and SHA256SUMS, into out.
func release(root, version, out string, targets []string) error {
	began := time.Now()
	if err := os.RemoveAll(out); err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	bare := strings.TrimPrefix(version, "v")
	var files []string
	for _, t := range targets {
		goos, goarch, _ := strings.Cut(t, "/")
		base := fmt.Sprintf("%s_%s_%s_%s", plugin, bare, goos, goarch)
		bin := filepath.Join(out, base)
		tb := time.Now()
		if err := build(root, version, goos, goarch, bin); err != nil {
			return err
		}
		if goos == runtime.GOOS && goarch == runtime.GOARCH {
			if err := stamped(bin, version); err != nil {
				return err
			}
		}
		if err := zipBinary(bin, filepath.Join(out, base+".zip")); err != nil {
			return err
		}
		fmt.Printf("%-14s %s\n", t, time.Since(tb).Round(100*time.Millisecond))
		files = append(files, base, base+".zip")
	}
	if err := writeSums(out, files); err != nil {
		return err
	}
	fmt.Printf("%s: %d targets in %s\n", out, len(targets), time.Since(began).Round(100*time.Millisecond))
	return nil
}

// build compiles one static binary. -trimpath drops the clone's path,
// -buildvcs=false the checkout state (a dirty tree must not differ from a
// clean one only by a flag), and -buildid= the content hash chain of the
// build cache; -s -w drop the symbol table and DWARF (stack traces keep
// their function names and lines).
func build(root, version, goos, goarch, out string) error {
	abs, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false",
		"-ldflags", "-s -w -buildid= -X main.version="+version,
		"-o", abs, "./cmd/"+plugin)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+goos, "GOARCH="+goarch, "GOFLAGS=")
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = os.Stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build %s/%s: %w\n%s", goos, goarch, err, stderr.Bytes())
	}
	return nil
}

// zipBinary writes a zip holding the binary under the plugin's name, with a
// fixed time and mode so the zip depends only on the binary.
func zipBinary(bin, out string) error {
	data, err := os.ReadFile(bin)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	h := &zip.FileHeader{Name: plugin, Method: zip.Deflate, Modified: zipTime}
	h.SetMode(0o755)
	w, err := zw.CreateHeader(h)
	if err != nil {
		return err
	}
	if _, err := w.Write(data); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return os.WriteFile(out, buf.Bytes(), 0o644)
}

// writeSums writes SHA256SUMS in sha256sum's format, sorted by name, so
// `sha256sum -c SHA256SUMS` verifies every file in the directory.
func writeSums(dir string, files []string) error {
	slices.Sort(files)
	var b strings.Builder
	for _, f := range files {
		sum, err := fileSHA256(filepath.Join(dir, f))
		if err != nil {
			return err
		}
		fmt.Fprintf(&b, "%s  %s\n", sum, f)
	}
	return os.WriteFile(filepath.Join(dir, "SHA256SUMS"), []byte(b.String()), 0o644)
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// reproducible builds the release twice and compares SHA256SUMS. The second
// build uses its own empty build cache: with a shared one it would reuse the
// first build's compiled packages and only the link and the zips would be
// compared.
func reproducible(root, version string, targets []string) error {
	tmp, err := os.MkdirTemp("", "release-check-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	a, b := filepath.Join(tmp, "a"), filepath.Join(tmp, "b")
	if err := release(root, version, a, targets); err != nil {
		return err
	}
	cache := filepath.Join(tmp, "gocache")
	if err := os.Setenv("GOCACHE", cache); err != nil {
		return err
	}
	if err := release(root, version, b, targets); err != nil {
		return err
	}
	sa, err := os.ReadFile(filepath.Join(a, "SHA256SUMS"))
	if err != nil {
		return err
	}
	sb, err := os.ReadFile(filepath.Join(b, "SHA256SUMS"))
	if err != nil {
		return err
	}
	if !bytes.Equal(sa, sb) {
		return fmt.Errorf("two builds differ:\n--- first (shared cache)\n%s--- second (empty cache)\n%s", sa, sb)
	}
	fmt.Printf("reproducible: both builds give\n%s", sa)
	return nil
}

// stamped checks that the binary (of the host's own target, which can run
// here) reports the version and is static: -trimpath keeps -ldflags out of the
// build info, so the binary is asked, and build info shows CGO_ENABLED=0.
func stamped(bin, version string) error {
	got, err := exec.Command(bin, "-version").Output()
	if err != nil {
		return fmt.Errorf("%s -version: %w", bin, err)
	}
	if want := plugin + " " + version + "\n"; string(got) != want {
		return fmt.Errorf("%s -version says %q, want %q", bin, got, want)
	}
	info, err := exec.Command("go", "version", "-m", bin).Output()
	if err != nil {
		return fmt.Errorf("go version -m %s: %w", bin, err)
	}
	for _, want := range []string{"\tCGO_ENABLED=0\n", "\t-trimpath=true\n"} {
		if !bytes.Contains(info, []byte(want)) {
			return fmt.Errorf("%s: build info lacks %q:\n%s", bin, strings.TrimSpace(want), info)
		}
	}
	fmt.Printf("%s: %s, static (CGO_ENABLED=0)\n", filepath.Base(bin), strings.TrimSpace(string(got)))
	return nil
}
