package backend

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/vault/sdk/framework"

	"github.com/brokervault/vault-plugin-secrets-broker/backend/provider"
)

// What the registered providers' Specs make of the public API: the config
// fields each provider takes, the options that apply to it and the lines of
// help that describe it. Nothing here names a broker: a provider added to
// the registry (or passed in Options.Providers) shows up everywhere.

// providerFields builds the schema of the provider-specific config fields:
// the union of the registered providers' Fields (a field two providers
// share gets one schema whose description joins theirs) and the options
// that apply to at least one of them.
func (b *backend) providerFields() map[string]*framework.FieldSchema {
	fields := map[string]*framework.FieldSchema{}
	descs := map[string][]perProvider{}
	for _, name := range b.names {
		spec := b.specs[name]
		for _, f := range spec.Fields {
			if fields[f.Name] == nil {
				fields[f.Name] = &framework.FieldSchema{Type: framework.TypeString}
			}
			if f.Secret {
				fields[f.Name].DisplayAttrs = &framework.DisplayAttributes{Sensitive: true}
			}
			descs[f.Name] = append(descs[f.Name], perProvider{name, strings.TrimSuffix(f.Description, ".")})
		}
	}
	for fname, fs := range fields {
		fs.Description = joinPerProvider(descs[fname], "; ") + "."
		if fs.DisplayAttrs != nil {
			fs.Description += " Write-only."
		}
	}
	for _, opt := range slices.Sorted(maps.Keys(providerOptions)) {
		o := providerOptions[opt]
		var ds []perProvider
		for _, name := range b.names {
			spec := b.specs[name]
			if !o.applies(spec) {
				continue
			}
			d := o.describe(spec)
			if note := spec.OptionNotes[opt]; note != "" {
				d += " " + note
			}
			ds = append(ds, perProvider{name, d})
		}
		if len(ds) == 0 {
			continue // no registered provider takes it
		}
		s := o.schema
		s.Description = joinPerProvider(ds, " ")
		fields[opt] = &s
	}
	return fields
}

// providerFieldNames lists the registered providers' own fields (not the
// options), each once, in registry order.
func (b *backend) providerFieldNames() []string {
	var out []string
	for _, name := range b.names {
		for _, f := range b.specs[name].Fields {
			if !slices.Contains(out, f.Name) {
				out = append(out, f.Name)
			}
		}
	}
	return out
}

// perProvider is one provider's text about a field.
type perProvider struct{ name, text string }

// joinPerProvider writes "a: text" for each provider, "a, b: text" for
// providers with the same text.
func joinPerProvider(ps []perProvider, sep string) string {
	var out []string
	for i := 0; i < len(ps); {
		names := []string{ps[i].name}
		j := i + 1
		for ; j < len(ps) && ps[j].text == ps[i].text; j++ {
			names = append(names, ps[j].name)
		}
		out = append(out, strings.Join(names, ", ")+": "+ps[i].text)
		i = j
	}
	return strings.Join(out, sep)
}

// providersWhere lists the registered providers a predicate holds for.
func (b *backend) providersWhere(f func(provider.Spec) bool) []string {
	var out []string
	for _, name := range b.names {
		if f(b.specs[name]) {
			out = append(out, name)
		}
	}
	return out
}

// orList writes "a, b or c".
func orList(names []string) string { return list(names, " or ") }

// andList writes "a, b and c".
func andList(names []string) string { return list(names, " and ") }

func list(names []string, last string) string {
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + last + names[len(names)-1]
}

// helpTable writes one line per provider, continuation lines indented.
func (b *backend) helpTable(line func(provider.Spec) string) string {
	var sb strings.Builder
	for _, name := range b.names {
		text := line(b.specs[name])
		if text == "" {
			continue
		}
		text = strings.ReplaceAll(text, "\n", "\n  "+strings.Repeat(" ", b.nameWidth()+1))
		fmt.Fprintf(&sb, "  %-*s %s\n", b.nameWidth(), name, text)
	}
	return strings.TrimRight(sb.String(), "\n")
}

func (b *backend) nameWidth() int {
	w := 8
	for _, name := range b.names {
		w = max(w, len(name))
	}
	return w
}

// configFieldsLine is a provider's line of config help: its fields
// (optional ones marked) and the options that apply to it.
func configFieldsLine(s provider.Spec) string {
	var fields []string
	for _, f := range s.Fields {
		if f.Required {
			fields = append(fields, f.Name)
		} else {
			fields = append(fields, "optional "+f.Name)
		}
	}
	line := strings.Join(fields, ", ")
	var opts []string
	for _, opt := range slices.Sorted(maps.Keys(providerOptions)) {
		if providerOptions[opt].applies(s) {
			opts = append(opts, opt)
		}
	}
	if len(opts) > 0 {
		sep := "; "
		if len(line)+len(sep)+len(strings.Join(opts, ", ")) > 60 {
			sep = ";\n"
		}
		line += sep + strings.Join(opts, ", ")
	}
	return line
}

// shortDuration writes 24h rather than 24h0m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}
