package backend

import (
	"container/heap"
	"sync"
	"time"
)

// The schedule: the configs with periodic work in a min-heap keyed by due
// time, so a tick costs time in proportion to what is due, not to the
// number of configs. When each config is due is periodic.go's policy
// (nextDue); the persisted index of the schedule is schedule_index.go.

type dueItem struct {
	name  string
	at    time.Time
	index int
}

type dueHeap []*dueItem

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].index = i; h[j].index = j }
func (h *dueHeap) Push(x any)        { it := x.(*dueItem); it.index = len(*h); *h = append(*h, it) }
func (h *dueHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	it.index = -1
	return it
}

// schedule is the set of configs with periodic work and when it is due.
type schedule struct {
	mu     sync.Mutex
	loaded bool
	h      dueHeap
	items  map[string]*dueItem
	// pending are the index's hours not read yet, in order.
	pending []int64
	// idxMu serialises writes of the persisted index; persisted is the
	// hour each config's index entry is under, where known; unpersisted
	// are configs whose entry could not be written (written again at the
	// next tick).
	idxMu       sync.Mutex
	persisted   map[string]int64
	unpersisted map[string]bool
}

func newSchedule() *schedule {
	return &schedule{items: map[string]*dueItem{}, persisted: map[string]int64{}, unpersisted: map[string]bool{}}
}

// set schedules name at at (zero time: no periodic work).
func (s *schedule) set(name string, at time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	it, ok := s.items[name]
	switch {
	case at.IsZero() && ok:
		heap.Remove(&s.h, it.index)
		delete(s.items, name)
	case at.IsZero():
	case ok:
		it.at = at
		heap.Fix(&s.h, it.index)
	default:
		it = &dueItem{name: name, at: at}
		heap.Push(&s.h, it)
		s.items[name] = it
	}
}

// setIfAbsent schedules name at at unless it is already scheduled (a
// write or a refresh since knows better).
func (s *schedule) setIfAbsent(name string, at time.Time) {
	s.mu.Lock()
	_, ok := s.items[name]
	s.mu.Unlock()
	if !ok {
		s.set(name, at)
	}
}

// popDue removes and returns up to max names due at now.
func (s *schedule) popDue(now time.Time, max int) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for len(s.h) > 0 && !s.h[0].at.After(now) && len(out) < max {
		it := heap.Pop(&s.h).(*dueItem)
		delete(s.items, it.name)
		out = append(out, it.name)
	}
	return out
}

func (s *schedule) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.h)
}
