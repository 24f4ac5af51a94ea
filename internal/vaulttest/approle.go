package vaulttest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// AppRole is a role's login material, written to files as a bot or an
// Agent would be given it.
type AppRole struct {
	Name         string
	RoleID       string
	RoleIDFile   string
	SecretIDFile string
}

// EnableAppRole mounts the AppRole auth method at approle/ (once).
func (v *Vault) EnableAppRole() error {
	r := v.CLI("auth", "list", "-format=json")
	if r.OK() && strings.Contains(r.Stdout, `"approle/"`) {
		return nil
	}
	if r := v.CLI("auth", "enable", "approle"); !r.OK() {
		return fmt.Errorf("auth enable approle: %s", r)
	}
	return nil
}

// NewAppRole writes policy name (policyHCL), creates role name bound to it
// (and to Vault's default policy, which lets a token renew itself), issues a
// secret_id, and writes role-id and secret-id files (0600) under dir/name.
func (v *Vault) NewAppRole(dir, name, policyHCL string, roleArgs ...string) (*AppRole, error) {
	if err := v.EnableAppRole(); err != nil {
		return nil, err
	}
	d := filepath.Join(dir, name)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return nil, err
	}
	pol := filepath.Join(d, "policy.hcl")
	if err := os.WriteFile(pol, []byte(policyHCL), 0o600); err != nil {
		return nil, err
	}
	if r := v.CLI("policy", "write", name, pol); !r.OK() {
		return nil, fmt.Errorf("policy write %s: %s", name, r)
	}
	args := append([]string{"write", "auth/approle/role/" + name, "token_policies=" + name}, roleArgs...)
	if r := v.CLI(args...); !r.OK() {
		return nil, fmt.Errorf("approle role %s: %s", name, r)
	}
	var rid struct {
		Data struct {
			RoleID string `json:"role_id"`
		} `json:"data"`
	}
	if r := v.CLIJSON(&rid, "read", "-format=json", "auth/approle/role/"+name+"/role-id"); !r.OK() {
		return nil, fmt.Errorf("role-id of %s: %s", name, r)
	}
	var sid struct {
		Data struct {
			SecretID string `json:"secret_id"`
		} `json:"data"`
	}
	if r := v.CLIJSON(&sid, "write", "-format=json", "-f", "auth/approle/role/"+name+"/secret-id"); !r.OK() {
		return nil, fmt.Errorf("secret-id of %s: %s", name, r)
	}
	a := &AppRole{Name: name, RoleID: rid.Data.RoleID, RoleIDFile: filepath.Join(d, "role-id"), SecretIDFile: filepath.Join(d, "secret-id")}
	if err := os.WriteFile(a.RoleIDFile, []byte(rid.Data.RoleID+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(a.SecretIDFile, []byte(sid.Data.SecretID+"\n"), 0o600); err != nil {
		return nil, err
	}
	return a, nil
}

// Login logs in with the role's files and returns the client token.
func (v *Vault) Login(a *AppRole) (string, error) {
	secretID, err := os.ReadFile(a.SecretIDFile)
	if err != nil {
		return "", err
	}
	var out struct {
		Auth struct {
			ClientToken string `json:"client_token"`
		} `json:"auth"`
	}
	r := v.CLIJSON(&out, "write", "-format=json", "auth/approle/login", "role_id="+a.RoleID, "secret_id="+strings.TrimSpace(string(secretID)))
	if !r.OK() {
		return "", fmt.Errorf("approle login %s: %s", a.Name, r)
	}
	return out.Auth.ClientToken, nil
}

// CLIAs runs the vault CLI with token instead of the root token.
func (v *Vault) CLIAs(token string, args ...string) CLIResult {
	cmd := exec.Command(v.Bin, args...)
	cmd.Env = append(cleanEnv(), "VAULT_ADDR="+v.Addr, "VAULT_TOKEN="+token)
	cmd.Dir = v.Dir
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return CLIResult{Stdout: out.String(), Stderr: errb.String(), Err: err}
}

// LeaseExists reports whether Vault still holds lease id.
func (v *Vault) LeaseExists(id string) (bool, error) {
	var out json.RawMessage
	r := v.CLIJSON(&out, "write", "-format=json", "sys/leases/lookup", "lease_id="+id)
	if r.OK() {
		return true, nil
	}
	if strings.Contains(r.Stderr, "invalid lease") || strings.Contains(r.Stderr, "lease not found") {
		return false, nil
	}
	return false, fmt.Errorf("lease lookup: %s", r)
}
