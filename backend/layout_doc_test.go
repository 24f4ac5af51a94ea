package backend

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDevelopmentDocListsTheBackendFiles keeps docs/development.md's
// layout true: every file it names exists, and every file of the backend
// package is named there, so a file added or renamed updates the map.
func TestDevelopmentDocListsTheBackendFiles(t *testing.T) {
	doc, err := os.ReadFile("../docs/development.md")
	if err != nil {
		t.Fatal(err)
	}
	start := strings.Index(string(doc), "## Layout")
	end := strings.Index(string(doc)[start:], "```\n\n")
	if start < 0 || end < 0 {
		t.Fatal("docs/development.md has no Layout block")
	}
	layout := string(doc)[start : start+end]
	named := map[string]bool{}
	for _, m := range regexp.MustCompile(`\b[a-z_]+\.go\b`).FindAllString(layout, -1) {
		named[m] = true
	}
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		have[f] = true
		if !named[f] {
			t.Errorf("backend/%s is not in docs/development.md's layout", f)
		}
	}
	for f := range named {
		if !have[f] {
			t.Errorf("docs/development.md's layout names backend/%s, which does not exist", f)
		}
	}
}
