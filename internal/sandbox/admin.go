package sandbox

import (
	"encoding/json"
	"net/http"
	"time"
)

// The admin API lets scripts and tests outside this process drive the
// sandbox: read call counts and flip the switches.
func (s *Server) registerAdmin() {
	s.mux.HandleFunc("GET /_sandbox/calls", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.AllCalls())
	})
	s.mux.HandleFunc("POST /_sandbox/reset", func(w http.ResponseWriter, r *http.Request) {
		s.ResetCalls()
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/settings", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Latency            *string `json:"latency"`
			FinamTokenLifetime *string `json:"finam_token_lifetime"`
			FinamRateLimit     *int    `json:"finam_rate_limit"`
			// FinamNumericQuoteLevel sends quote_level as a number.
			FinamNumericQuoteLevel *bool `json:"finam_numeric_quote_level"`
		}
		if !decode(w, r, &req) {
			return
		}
		apply := []struct {
			v   *string
			set func(time.Duration)
		}{{req.Latency, s.SetLatency}, {req.FinamTokenLifetime, s.SetFinamTokenLifetime}}
		for _, a := range apply {
			if a.v == nil {
				continue
			}
			d, err := time.ParseDuration(*a.v)
			if err != nil {
				http.Error(w, "bad duration: "+err.Error(), http.StatusBadRequest)
				return
			}
			a.set(d)
		}
		if req.FinamRateLimit != nil {
			s.SetFinamRateLimit(*req.FinamRateLimit)
		}
		if req.FinamNumericQuoteLevel != nil {
			s.SetFinamNumericQuoteLevel(*req.FinamNumericQuoteLevel)
		}
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/fault", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Endpoint string `json:"endpoint"`
			Status   int    `json:"status"`
			Count    int    `json:"count"`
		}
		if !decode(w, r, &req) {
			return
		}
		s.InjectFault(req.Endpoint, req.Status, req.Count)
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/finam/secrets", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Secret     string   `json:"secret"`
			AccountIDs []string `json:"account_ids"`
			ReadOnly   bool     `json:"readonly"`
		}
		if !decode(w, r, &req) {
			return
		}
		s.AddFinamSecret(req.Secret, req.AccountIDs, req.ReadOnly)
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_sandbox/finam/revoke", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Secret string `json:"secret"`
		}
		if !decode(w, r, &req) {
			return
		}
		s.RevokeFinamSecret(req.Secret)
		w.WriteHeader(http.StatusNoContent)
	})
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}
