// Package sandbox serves local fakes of the brokers' token APIs (Finam,
// T-Invest, ALOR, ChatApp and BCS), following their published protocols
// (docs/sandbox.md): real signed JWTs with exp,
// the brokers' error bodies, rate limits, and switches to inject latency,
// faults and revocation. It counts calls per endpoint so tests and
// benchmarks can assert upstream traffic.
//
// One Server hosts every broker on one listener: their paths do not overlap.
// The admin API lives under /_sandbox/.
package sandbox

import (
	"crypto/rand"
	"encoding/json"
	"net/http"
	"sort"
	"sync"
	"time"
)

// Options set a Server's starting behaviour; all can be changed later.
type Options struct {
	// FinamTokenLifetime is how long minted Finam JWTs live (default 15m).
	FinamTokenLifetime time.Duration
	// FinamRateLimit is requests a minute per method (default 200).
	FinamRateLimit int
	// Latency is added before every broker response.
	Latency time.Duration
	// Now is the clock (tests); time.Now when nil.
	Now func() time.Time
}

// Server is the sandbox. Its zero value is not usable: call New.
type Server struct {
	now func() time.Time
	mux *http.ServeMux

	mu      sync.Mutex
	calls   map[string]int
	latency time.Duration
	faults  map[string]*fault

	finam *finamFake
	alor  *alorFake

	tinvest *tinvestFake
	chatapp *chatappFake
	bcs     *bcsFake
}

type fault struct {
	Status int `json:"status"`
	// Count is how many calls still fail; negative means every call.
	Count int `json:"count"`
}

// New builds a Server with the default accounts and secrets.
func New(opts Options) *Server {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.FinamTokenLifetime <= 0 {
		opts.FinamTokenLifetime = 15 * time.Minute
	}
	if opts.FinamRateLimit <= 0 {
		opts.FinamRateLimit = 200
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		panic("sandbox: no randomness: " + err.Error())
	}
	s := &Server{
		now:     opts.Now,
		mux:     http.NewServeMux(),
		calls:   map[string]int{},
		latency: opts.Latency,
		faults:  map[string]*fault{},
	}
	s.finam = newFinam(s, key, opts.FinamTokenLifetime, opts.FinamRateLimit)
	s.finam.register(s)
	s.tinvest = registerTInvest(s)
	s.alor = newAlor(s)
	s.chatapp = registerChatApp(s)
	s.bcs = registerBCS(s)
	s.registerAdmin()
	return s
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// handle registers a broker endpoint: counted, delayed and fault-injectable.
// faultBody renders an injected failure the way that broker would.
func (s *Server) handle(method, path string, faultBody func(status int) any, h http.HandlerFunc) {
	name := method + " " + path
	s.mux.HandleFunc(name, func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.calls[name]++
		lat := s.latency
		f := s.faults[name]
		status := 0
		if f != nil && f.Count != 0 {
			status = f.Status
			if f.Count > 0 {
				f.Count--
			}
		}
		s.mu.Unlock()
		if lat > 0 {
			select {
			case <-time.After(lat):
			case <-r.Context().Done():
				return
			}
		}
		if status != 0 {
			writeJSON(w, status, faultBody(status))
			return
		}
		h(w, r)
	})
}

// Calls returns how many requests reached endpoint ("POST /v1/sessions").
func (s *Server) Calls(endpoint string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[endpoint]
}

// AllCalls returns a copy of every endpoint's count.
func (s *Server) AllCalls() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int, len(s.calls))
	for k, v := range s.calls {
		out[k] = v
	}
	return out
}

// ResetCalls zeroes the counters.
func (s *Server) ResetCalls() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = map[string]int{}
}

// SetLatency delays every broker response by d.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = d
}

// InjectFault makes the next count calls to endpoint fail with status
// (count < 0: all of them; status 0 clears the fault).
func (s *Server) InjectFault(endpoint string, status, count int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if status == 0 {
		delete(s.faults, endpoint)
		return
	}
	s.faults[endpoint] = &fault{Status: status, Count: count}
}

// Endpoints lists the broker endpoints served.
func (s *Server) Endpoints() []string {
	eps := append([]string(nil), s.finam.endpoints()...)
	eps = append(eps, s.tinvest.endpoints()...)
	eps = append(eps, s.alor.endpoints()...)
	eps = append(eps, s.chatapp.endpoints()...)
	eps = append(eps, s.bcs.endpoints()...)
	sort.Strings(eps)
	return eps
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
