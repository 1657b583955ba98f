// Command grpcload is the compiled load client of bench/grpc_claims.py (issue 12): it offers
// unary gRPC calls open loop and times them, at a small fraction of the CPU per call of a
// Python client, so that on a two-core machine the load takes little from the server it
// measures.
//
// It is driven by the harness over a pipe: one JSON command a line on stdin, one JSON answer
// a line on stdout (the protocol of bench/grpc_claims.py's Python client, which it replaces).
// Requests arrive as bytes the harness built and serialized (base64 in the JSON) before the
// clock starts; calls go out with a codec that passes bytes through, and answers are never
// parsed: a CommitUpdate is the BeginUpdate answer's bytes followed by the "suffix" bytes
// (the request's cell_id field; bench/grpc_claims.py says why that is a CommitUpdateRequest).
//
// Open loop: call k is due at k / rate seconds after the start whatever became of the earlier
// ones, released by a pacer that never waits for answers, and timed from when it was due.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// rawCodec passes request and answer bytes through untouched.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: %T is not *[]byte", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: %T is not *[]byte", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

// Name gives the content-type application/grpc+proto: the bytes are protobuf.
func (rawCodec) Name() string { return "proto" }

// Status names as gRPC spells them everywhere else (Python's grpc.StatusCode names).
var names = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN", codes.InvalidArgument: "INVALID_ARGUMENT",
	codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

type command struct {
	Op          string   `json:"op"`
	Count       int      `json:"count"`
	Rate        float64  `json:"rate"`
	DeadlineS   float64  `json:"deadline_s"`
	ProbeEveryS float64  `json:"probe_every_s"`
	First       string   `json:"first"`  // method of the first call of a pair
	Second      string   `json:"second"` // method of the second call
	Requests    [][]byte `json:"requests"`
	Suffix      []byte   `json:"suffix"` // appended to the first answer: the second request
}

// step is what bench/grpc_claims.py's Step.from_json reads.
type step struct {
	Offered  int               `json:"offered"`
	Begin    []float64         `json:"begin"`
	Commit   []float64         `json:"commit"`
	Pair     []float64         `json:"pair"`
	Probe    []float64         `json:"probe"`
	Shed     []float64         `json:"shed"` // BeginUpdate's RESOURCE_EXHAUSTED, from the due time
	Statuses map[string]int    `json:"statuses"`
	Messages map[string]string `json:"messages"`
	Lag      float64           `json:"lag"`
	WallS    float64           `json:"wall_s"`
	CPUS     float64           `json:"cpu_s"`

	mu sync.Mutex
}

func (s *step) count(call string, err error) {
	name := "OK"
	message := ""
	if err != nil {
		st, _ := status.FromError(err)
		name, message = names[st.Code()], st.Message()
		if name == "" {
			name = st.Code().String()
		}
	}
	key := call + " " + name
	s.Statuses[key]++
	if _, seen := s.Messages[key]; err != nil && !seen {
		s.Messages[key] = message
	}
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return math.NaN()
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds()
}

// due is how many of total calls are released elapsed seconds after the start (bench.steady_latency.due).
func due(rate, elapsed float64, total int) int {
	if elapsed < 0 {
		return 0
	}
	return min(total, int(math.Floor(elapsed*rate+1e-9))+1)
}

type client struct {
	conns []*grpc.ClientConn
	probe *grpc.ClientConn
	auth  metadata.MD
}

func dial(target string) *grpc.ClientConn {
	// Each ClientConn has its own HTTP/2 connection.
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpcload:", err)
		os.Exit(2)
	}
	return conn
}

const liveness = "/gitlab.cells.topology_service.HealthService/LivenessProbe"

func (c *client) live(ctx context.Context) error {
	var in, out []byte
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return c.probe.Invoke(ctx, liveness, &in, &out)
}

func (c *client) floor(count int) []float64 {
	latencies := make([]float64, 0, count)
	for range count {
		started := time.Now()
		if err := c.live(context.Background()); err == nil {
			latencies = append(latencies, time.Since(started).Seconds())
		}
	}
	return latencies
}

func (c *client) offer(cmd command) *step {
	s := &step{Offered: cmd.Count, Begin: []float64{}, Commit: []float64{}, Pair: []float64{}, Probe: []float64{},
		Shed: []float64{}, Statuses: map[string]int{}, Messages: map[string]string{}}
	base := metadata.NewOutgoingContext(context.Background(), c.auth)
	deadline := time.Duration(cmd.DeadlineS * float64(time.Second))
	stopProbe := make(chan struct{})
	probed := make(chan struct{})
	go func() { // the floor beside the step: one LivenessProbe at a time
		defer close(probed)
		if cmd.ProbeEveryS <= 0 {
			return
		}
		every := time.Duration(cmd.ProbeEveryS * float64(time.Second))
		for {
			started := time.Now()
			if err := c.live(context.Background()); err == nil {
				elapsed := time.Since(started).Seconds()
				s.mu.Lock()
				s.Probe = append(s.Probe, elapsed)
				s.mu.Unlock()
			}
			select {
			case <-stopProbe:
				return
			case <-time.After(every - time.Since(started)):
			}
		}
	}()
	var wg sync.WaitGroup
	one := func(k int, at time.Time) {
		defer wg.Done()
		lag := time.Since(at).Seconds()
		conn := c.conns[k%len(c.conns)]
		var answer, done []byte
		var request []byte // GetCellsRequest: no fields, no bytes
		if k < len(cmd.Requests) {
			request = cmd.Requests[k]
		}
		ctx, cancel := context.WithTimeout(base, deadline)
		err := conn.Invoke(ctx, cmd.First, &request, &answer)
		cancel()
		begun := time.Now()
		s.mu.Lock()
		s.Lag = max(s.Lag, lag)
		s.count("begin", err)
		if err == nil {
			s.Begin = append(s.Begin, begun.Sub(at).Seconds())
		} else if status.Code(err) == codes.ResourceExhausted {
			s.Shed = append(s.Shed, begun.Sub(at).Seconds())
		}
		s.mu.Unlock()
		if err != nil {
			return
		}
		second := append(answer, cmd.Suffix...)
		ctx, cancel = context.WithTimeout(base, deadline)
		err = conn.Invoke(ctx, cmd.Second, &second, &done)
		cancel()
		finished := time.Now()
		s.mu.Lock()
		s.count("commit", err)
		if err == nil {
			s.Commit = append(s.Commit, finished.Sub(begun).Seconds())
			s.Pair = append(s.Pair, finished.Sub(at).Seconds())
		}
		s.mu.Unlock()
	}
	cpuStarted := cpuSeconds()
	start := time.Now().Add(5 * time.Millisecond)
	scheduled := func(k int) time.Time {
		return start.Add(time.Duration(float64(k) / cmd.Rate * float64(time.Second)))
	}
	released := 0
	for released < cmd.Count {
		upto := due(cmd.Rate, time.Since(start).Seconds(), cmd.Count)
		for k := released; k < upto; k++ {
			wg.Add(1)
			go one(k, scheduled(k))
		}
		released = max(released, upto)
		if released < cmd.Count {
			time.Sleep(time.Until(scheduled(released)))
		}
	}
	wg.Wait()
	s.WallS = time.Since(start).Seconds()
	s.CPUS = cpuSeconds() - cpuStarted
	close(stopProbe)
	<-probed
	return s
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: grpcload HOST:PORT TOKEN CHANNELS (then JSON commands on stdin)")
		os.Exit(2)
	}
	var channels int
	if _, err := fmt.Sscan(os.Args[3], &channels); err != nil || channels < 1 {
		channels = 1
	}
	c := &client{probe: dial(os.Args[1]), auth: metadata.Pairs("authorization", "Bearer "+os.Args[2])}
	for range channels {
		c.conns = append(c.conns, dial(os.Args[1]))
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 256<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var cmd command
		if err := json.Unmarshal(in.Bytes(), &cmd); err != nil {
			fmt.Fprintln(os.Stderr, "grpcload: bad command:", err)
			os.Exit(2)
		}
		var answer any
		switch cmd.Op {
		case "floor":
			answer = c.floor(cmd.Count)
		case "step":
			answer = c.offer(cmd)
		default:
			fmt.Fprintln(os.Stderr, "grpcload: unknown command", cmd.Op)
			os.Exit(2)
		}
		if err := out.Encode(answer); err != nil {
			fmt.Fprintln(os.Stderr, "grpcload:", err)
			os.Exit(2)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "grpcload:", err)
		os.Exit(2)
	}
}
