package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Linux /proc readers for the plugin process: its RSS, CPU time and open
// file descriptors.

// clockTick is USER_HZ, 100 on every Linux Go supports.
const clockTick = 10 * time.Millisecond

// findProcess returns the pid of the process running the binary at exe.
func findProcess(exe string) (int, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe")); err == nil && p == exe {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no process runs %s", exe)
}

// procMem is a process's resident memory.
type procMem struct {
	RSSMB  float64 `json:"rss_mb"`
	PeakMB float64 `json:"peak_rss_mb"`
}

func readMem(pid int) (procMem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procMem{}, err
	}
	var m procMem
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			m.RSSMB = round(kb/1024, 1)
		case "VmHWM:":
			m.PeakMB = round(kb/1024, 1)
		}
	}
	return m, nil
}

// cpuTime is user+system CPU the process has used.
func cpuTime(pid int) (time.Duration, error) { return procCPU(pid, false) }

// procCPU is user+system CPU of the process, and with children also of its
// children that have exited and been waited for (a plugin Vault restarted).
func procCPU(pid int, children bool) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces: count fields after ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("unexpected /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): utime is field 14, stime field 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	var sum int64
	n := 2
	if children {
		n = 4 // cutime, cstime (fields 16, 17)
	}
	for _, v := range f[11 : 11+n] {
		t, _ := strconv.ParseInt(v, 10, 64)
		sum += t
	}
	return time.Duration(sum) * clockTick, nil
}

// machineCPU is the CPU time all CPUs spent busy (not idle or waiting for
// I/O) since boot, from /proc/stat.
func machineCPU() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest time is in user already
			continue
		}
		t, _ := strconv.ParseInt(v, 10, 64)
		busy += t
	}
	return time.Duration(busy) * clockTick
}

// meter tells how much of the machine a phase had: the CPU its own
// processes used (this one, Vault and its plugins) and what everything else
// on the machine used meanwhile.
type meter struct {
	e        *env
	start    time.Time
	all, own time.Duration
}

// phaseLoad is a meter's reading, in cores (1.0 = one CPU busy throughout).
type phaseLoad struct {
	WallS      float64 `json:"wall_s"`
	BenchCores float64 `json:"bench_cores"`
	OtherCores float64 `json:"other_processes_cores"`
}

func (e *env) ownCPU() time.Duration {
	var sum time.Duration
	if t, err := procCPU(os.Getpid(), false); err == nil {
		sum += t
	}
	if e.v != nil {
		if t, err := procCPU(e.v.PID(), true); err == nil {
			sum += t
		}
	}
	for _, exe := range []string{e.plugin, e.kvExe} {
		if pid, err := findProcess(exe); err == nil {
			if t, err := cpuTime(pid); err == nil {
				sum += t
			}
		}
	}
	return sum
}

func (e *env) meter() *meter {
	return &meter{e: e, start: time.Now(), all: machineCPU(), own: e.ownCPU()}
}

func (m *meter) read() phaseLoad {
	wall := time.Since(m.start)
	all, own := machineCPU()-m.all, m.e.ownCPU()-m.own
	return phaseLoad{
		WallS:      round(wall.Seconds(), 1),
		BenchCores: round(own.Seconds()/wall.Seconds(), 2),
		OtherCores: round(max(0, (all-own).Seconds())/wall.Seconds(), 2),
	}
}

// openFDs counts the process's open file descriptors (sockets included).
func openFDs(pid int) int {
	e, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(e)
}

// threads is the process's OS thread count.
func threads(pid int) int {
	e, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return -1
	}
	return len(e)
}

// cpuTimeline samples the CPU time of Vault (its own, not its plugins') and
// of the broker plugin every step, to show when work happens.
type cpuTimeline struct {
	StepS    float64   `json:"step_s"`
	VaultMs  []float64 `json:"vault_cpu_ms"`
	PluginMs []float64 `json:"plugin_cpu_ms"`
	// Around token expiries: CPU in the window [expiry-1s, expiry+3s]
	// against the run's average for a window that long.
	AtExpiryVaultMs  float64 `json:"vault_cpu_ms_per_4s_at_token_expiries,omitempty"`
	AtExpiryPluginMs float64 `json:"plugin_cpu_ms_per_4s_at_token_expiries,omitempty"`
	AvgVaultMs       float64 `json:"vault_cpu_ms_per_4s_average,omitempty"`
	AvgPluginMs      float64 `json:"plugin_cpu_ms_per_4s_average,omitempty"`
}

// sampleCPU starts sampling; stop returns the timeline.
func (e *env) sampleCPU(step time.Duration) (stop func() *cpuTimeline) {
	tl := &cpuTimeline{StepS: step.Seconds()}
	done := make(chan struct{})
	finished := make(chan struct{})
	read := func() (time.Duration, time.Duration) {
		var v, p time.Duration
		if e.v != nil {
			v, _ = cpuTime(e.v.PID())
		}
		if pid, err := e.pluginPID(); err == nil {
			p, _ = cpuTime(pid)
		}
		return v, p
	}
	go func() {
		defer close(finished)
		t := time.NewTicker(step)
		defer t.Stop()
		v0, p0 := read()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			v, p := read()
			tl.VaultMs = append(tl.VaultMs, ms(v-v0))
			tl.PluginMs = append(tl.PluginMs, ms(p-p0))
			v0, p0 = v, p
		}
	}()
	return func() *cpuTimeline { close(done); <-finished; return tl }
}

// around fills the expiry window figures; at are seconds after the
// timeline's start.
func (tl *cpuTimeline) around(at []float64) {
	n := len(tl.VaultMs)
	if n == 0 {
		return
	}
	var tv, tp float64
	for i := range n {
		tv += tl.VaultMs[i]
		tp += tl.PluginMs[i]
	}
	per := 4 / tl.StepS // samples in 4 s
	tl.AvgVaultMs = round(tv/float64(n)*per, 1)
	tl.AvgPluginMs = round(tp/float64(n)*per, 1)
	var sv, sp float64
	k := 0
	for _, x := range at {
		lo, hi := int((x-1)/tl.StepS), int((x+3)/tl.StepS)
		if lo < 0 || hi > n {
			continue
		}
		for i := lo; i < hi; i++ {
			sv += tl.VaultMs[i]
			sp += tl.PluginMs[i]
		}
		k++
	}
	if k > 0 {
		tl.AtExpiryVaultMs = round(sv/float64(k), 1)
		tl.AtExpiryPluginMs = round(sp/float64(k), 1)
	}
}
