// Command bertrec-loadgen drives a bertrec server with Recommend calls in a closed loop and prints
// one JSON document on stdout: {"calls", "errors", "elapsed_s", "qps", "p50_ms", "p99_ms"}.
//
// Why Go: `python -m bertrec.bench.server` measures a server on the machine that runs its load
// generator. The Python generator (grpc.aio) spends about as much CPU per call as the server it
// measures, so on a small machine it takes the cores that extra worker processes need; grpc-go
// spends a fraction of that, leaving the CPUs to the server.
//
// --concurrency callers each send their next call as soon as the previous one is answered,
// spread over --channels connections (one grpc.ClientConn each, so SO_REUSEPORT can hand them
// to different worker processes). Requests ask for the top --k of user --user-format (default
// "u%07d", as the Python generator's), the number drawn uniformly from [0, --users). --warmup-s of calls run first and
// are not counted. Plaintext only: it is a loopback benchmark tool.
//
// Exit status: 0 when it ran (errors are counted in the JSON), 2 on bad flags or no connection.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"sort"
	"sync"
	"time"

	bertrecv1 "bertrec.dev/clients/go/gen/bertrec/v1"
	"google.golang.org/grpc"
)

type result struct {
	Calls    int     `json:"calls"`
	Errors   int     `json:"errors"`
	ElapsedS float64 `json:"elapsed_s"`
	QPS      float64 `json:"qps"`
	P50Ms    float64 `json:"p50_ms"`
	P99Ms    float64 `json:"p99_ms"`
}

func main() {
	target := flag.String("target", "", "host:port of the server")
	concurrency := flag.Int("concurrency", 64, "callers, each with one call in flight")
	channels := flag.Int("channels", 1, "connections the callers are spread over")
	duration := flag.Float64("duration-s", 2, "seconds of counted calls")
	warmup := flag.Float64("warmup-s", 0.3, "seconds of calls before counting")
	users := flag.Int("users", 10000, "user numbers drawn from [0, users)")
	userFormat := flag.String("user-format", "u%07d", "user id of a user number (fmt verb)")
	k := flag.Int("k", 10, "items per call")
	timeout := flag.Float64("timeout-s", 30, "deadline of each call")
	flag.Parse()
	if *target == "" || *concurrency < 1 || *channels < 1 || *users < 1 || *duration <= 0 {
		fmt.Fprintln(os.Stderr, "bertrec-loadgen: need --target and positive counts")
		os.Exit(2)
	}
	stubs := make([]bertrecv1.RecommenderServiceClient, *channels)
	for i := range stubs {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		conn, err := grpc.DialContext(ctx, *target, grpc.WithInsecure(), grpc.WithBlock())
		cancel()
		if err != nil {
			fmt.Fprintf(os.Stderr, "bertrec-loadgen: connecting to %s: %v\n", *target, err)
			os.Exit(2)
		}
		defer conn.Close()
		stubs[i] = bertrecv1.NewRecommenderServiceClient(conn)
	}
	callTimeout := time.Duration(*timeout * float64(time.Second))
	load := func(length time.Duration) ([]time.Duration, int, time.Duration) {
		return run(stubs, *concurrency, *users, *userFormat, int32(*k), callTimeout, length)
	}
	load(seconds(*warmup))
	latencies, errors, elapsed := load(seconds(*duration))
	out := result{Calls: len(latencies), Errors: errors, ElapsedS: elapsed.Seconds()}
	out.QPS = float64(len(latencies)) / elapsed.Seconds()
	if len(latencies) > 0 {
		sort.Slice(latencies, func(a, b int) bool { return latencies[a] < latencies[b] })
		out.P50Ms = percentile(latencies, 0.50)
		out.P99Ms = percentile(latencies, 0.99)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(2)
	}
}

// run keeps `concurrency` calls in flight for `length`; returns the answered calls' latencies,
// the failed calls and the time taken.
func run(stubs []bertrecv1.RecommenderServiceClient, concurrency, users int, userFormat string,
	k int32, timeout, length time.Duration) ([]time.Duration, int, time.Duration) {
	var mu sync.Mutex
	var latencies []time.Duration
	errors := 0
	begin := time.Now()
	stop := begin.Add(length)
	var wg sync.WaitGroup
	for c := 0; c < concurrency; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			stub := stubs[c%len(stubs)]
			rng := rand.New(rand.NewSource(int64(c) + 1))
			own := make([]time.Duration, 0, 1024)
			failed := 0
			for time.Now().Before(stop) {
				request := &bertrecv1.RecommendRequest{
					UserId: fmt.Sprintf(userFormat, rng.Intn(users)), K: k,
				}
				ctx, cancel := context.WithTimeout(context.Background(), timeout)
				start := time.Now()
				_, err := stub.Recommend(ctx, request)
				cancel()
				if err != nil {
					failed++
					continue
				}
				own = append(own, time.Since(start))
			}
			mu.Lock()
			latencies = append(latencies, own...)
			errors += failed
			mu.Unlock()
		}(c)
	}
	wg.Wait()
	return latencies, errors, time.Since(begin)
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func percentile(sorted []time.Duration, q float64) float64 {
	i := int(q * float64(len(sorted)-1))
	return float64(sorted[i]) / float64(time.Millisecond)
}
