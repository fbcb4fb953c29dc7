// derpload: the DERP side of meshd's relay_aggregate example. PAIRS sender → receiver pairs of
// DERP clients (tailscale.com/derp/derphttp, the client tailscaled uses) connect to one derper
// and every sender sends as fast as its connection takes; prints what the receivers got in
// SECS seconds after one second of warm-up, and, with -pid, that process's CPU seconds
// (/proc/PID/stat) in the same interval.
//
//	go build -o derpload . && ./derpload -url http://127.0.0.1:3340/derp -pairs 50 -pid $(pidof derper)
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/types/key"
)

// cpuTicks is utime + stime of a process, fields 14 and 15 of /proc/PID/stat.
func cpuTicks(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		log.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	u, _ := strconv.ParseInt(f[11], 10, 64)
	k, _ := strconv.ParseInt(f[12], 10, 64)
	return u + k
}

func main() {
	url := flag.String("url", "http://127.0.0.1:3340/derp", "derper's DERP URL")
	pairs := flag.Int("pairs", 50, "sender → receiver pairs")
	secs := flag.Int("secs", 5, "seconds measured")
	size := flag.Int("size", 1312, "bytes per packet (a full WireGuard packet of a 1280-byte MTU)")
	pid := flag.Int("pid", 0, "derper's process id, for its CPU time")
	flag.Parse()

	ctx := context.Background()
	quiet := func(string, ...any) {}
	connect := func() (*derphttp.Client, key.NodePublic) {
		k := key.NewNode()
		c, err := derphttp.NewClient(k, *url, quiet, netmon.NewStatic())
		if err != nil {
			log.Fatal(err)
		}
		if err := c.Connect(ctx); err != nil {
			log.Fatal(err)
		}
		return c, k.Public()
	}
	var received atomic.Int64
	var counting atomic.Bool
	senders := make([]*derphttp.Client, *pairs)
	dsts := make([]key.NodePublic, *pairs)
	for i := range *pairs {
		senders[i], _ = connect()
		var rx *derphttp.Client
		rx, dsts[i] = connect()
		go func() {
			for {
				m, err := rx.Recv()
				if err != nil {
					return
				}
				if p, ok := m.(derp.ReceivedPacket); ok && counting.Load() {
					received.Add(int64(len(p.Data)))
				}
			}
		}()
	}
	stop := time.Now().Add(time.Duration(*secs+1) * time.Second)
	for i := range *pairs {
		go func() {
			pkt := make([]byte, *size)
			for time.Now().Before(stop) {
				if err := senders[i].Send(dsts[i], pkt); err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(time.Second)
	var ticks0 int64
	if *pid != 0 {
		ticks0 = cpuTicks(*pid)
	}
	counting.Store(true)
	start := time.Now()
	time.Sleep(time.Duration(*secs) * time.Second)
	counting.Store(false)
	elapsed := time.Since(start).Seconds()
	got := float64(received.Load())
	line := fmt.Sprintf("pairs %d  datagram %d B  received %.2f Gbit/s", *pairs, *size, got*8/elapsed/1e9)
	if *pid != 0 {
		// Linux reports /proc times in USER_HZ, 100 on every architecture Go runs on here.
		cpu := float64(cpuTicks(*pid)-ticks0) / 100
		line += fmt.Sprintf("  derper CPU %.2f s of %.1f s (%.2f s per GB)", cpu, elapsed, cpu/(got/1e9))
	}
	fmt.Println(line)
}
