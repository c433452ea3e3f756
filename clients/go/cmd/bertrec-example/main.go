// Command bertrec-example calls a bertrec server once per RPC and prints the answers as one
// JSON document on stdout:
//
//  1. grpc.health.v1.Health/Check for the whole server (service ""),
//  2. bertrec.v1.RecommenderService/Recommend for --user-id,
//  3. bertrec.v1.RecommenderService/EmbedText for --text,
//  4. bertrec.v1.RecommenderService/RecommendBatch for --user-id and unknownUserID (k=bulkK),
//  5. bertrec.v1.RecommenderService/StreamRecommendations for the same ids, read to the end,
//  6. with --feedback-user-id F only: bertrec.v1.RecommenderService/RecordFeedback, one event
//     saying F rated the top item of step 2 with exampleRating. Its idempotency key is fixed,
//     "bertrec-example:F:ITEM", so running the example again stores nothing new (the answer
//     then counts a duplicate).
//
// Diagnostics go to stderr. Exit status: 0 on success, 1 when an RPC fails (the message names
// the RPC and its gRPC status code), 2 on bad flags.
//
// With --tls-ca the channel speaks TLS and trusts that CA only; --tls-cert/--tls-key add a client
// certificate (a server started with --tls-client-ca); --token-file sends the token in it as
// "authorization: Bearer <token>" with every call, over TLS only (grpc-go refuses to send such
// per-RPC credentials in plaintext, and so does this example).
//
// The channel retries RecommenderService calls by the service config every bertrec client shares
// (clients/service_config.json, embedded at build time; see clients/README.md). grpc-go before
// 1.40 applies a retry policy only when GRPC_GO_RETRY=on is in the environment (run.sh sets it).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	_ "embed" // the service config
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	bertrecv1 "bertrec.dev/clients/go/gen/bertrec/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

const (
	exitRPCError = 1
	exitUsage    = 2
	defaultText  = "a heartwarming story about friendship and adventure"
	// exampleRating is the rating step 4 records; any value in the model's rating range works.
	exampleRating = 4.0
	// unknownUserID is an id no model knows: the bulk calls answer it with found=false
	// instead of failing the call.
	unknownUserID = "bertrec-example-unknown-user"
	// bulkK is the k of the bulk calls: small, as a bulk job's per-user lists are.
	bulkK = 3
)

// Full method names, used in error messages so they match server logs and grpcurl.
const (
	rpcHealthCheck = "grpc.health.v1.Health/Check"
	rpcRecommend   = "bertrec.v1.RecommenderService/Recommend"
	rpcEmbedText   = "bertrec.v1.RecommenderService/EmbedText"
	rpcFeedback    = "bertrec.v1.RecommenderService/RecordFeedback"
	rpcBatch       = "bertrec.v1.RecommenderService/RecommendBatch"
	rpcStream      = "bertrec.v1.RecommenderService/StreamRecommendations"
)

// The output document. Scores and vector values stay float32, as on the wire: encoding/json
// writes a float32 in its shortest form that parses back to the same float32, so nothing is
// lost or invented by widening to float64.
type output struct {
	Health    string          `json:"health"`
	Recommend recommendOutput `json:"recommend"`
	Embed     embedOutput     `json:"embed"`
	Batch     bulkOutput      `json:"batch"`
	Stream    bulkOutput      `json:"stream"`
	Feedback  *feedbackOutput `json:"feedback,omitempty"`
}

type modelOutput struct {
	Name    string `json:"name"`
	Version int64  `json:"version"`
}

type itemOutput struct {
	ItemID          string  `json:"item_id"`
	Score           float32 `json:"score"`
	PredictedRating float32 `json:"predicted_rating"`
	Rank            int32   `json:"rank"`
}

type recommendOutput struct {
	Model modelOutput  `json:"model"`
	Items []itemOutput `json:"items"`
}

// bulkOutput is one bulk call's answer: every requested user's items, in request order.
type bulkOutput struct {
	Model   modelOutput  `json:"model"`
	Results []userOutput `json:"results"`
}

type userOutput struct {
	UserID string       `json:"user_id"`
	Found  bool         `json:"found"`
	Items  []itemOutput `json:"items"`
}

// feedbackOutput is the event step 4 sent and what the server's store did with it.
type feedbackOutput struct {
	UserID         string  `json:"user_id"`
	ItemID         string  `json:"item_id"`
	Rating         float64 `json:"rating"`
	IdempotencyKey string  `json:"idempotency_key"`
	Accepted       int32   `json:"accepted"`
	Duplicates     int32   `json:"duplicates"`
}

type embedOutput struct {
	Model  modelOutput `json:"model"`
	Values []float32   `json:"values"`
}

// serviceConfig is clients/service_config.json, copied next to this file by build.sh.
//
//go:embed service_config.json
var serviceConfig string

// errFlagsReported means the flag package has already printed the problem and the usage.
var errFlagsReported = errors.New("invalid flags")

type options struct {
	target string
	userID string
	text   string
	// feedbackUserID, if set, turns on step 4 (a write, so never done unasked).
	feedbackUserID string
	k              int32
	timeout        time.Duration
	// TLS and auth: file paths, read when the channel is set up.
	tlsCA, tlsCert, tlsKey, tokenFile string
}

// rpcError is a failed call, reported as "<rpc> failed: <CODE>: <message>".
type rpcError struct {
	rpc string
	st  *status.Status
}

func (e *rpcError) Error() string {
	return fmt.Sprintf("%s failed: %s: %s", e.rpc, codeName(e.st.Code()), e.st.Message())
}

func wrapRPC(rpc string, err error) error {
	return &rpcError{rpc: rpc, st: status.Convert(err)}
}

// canonicalCodes are the status code names of the gRPC specification (codes.Code.String()
// gives Go-style names such as "DeadlineExceeded", which other languages do not print).
var canonicalCodes = [...]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

func codeName(c codes.Code) string {
	if int(c) < len(canonicalCodes) {
		return canonicalCodes[c]
	}
	return fmt.Sprintf("CODE(%d)", uint32(c))
}

func main() {
	os.Exit(run())
}

// run does the work and returns the exit status, so deferred cleanup runs before os.Exit.
func run() int {
	opts, err := parseFlags(os.Args[1:])
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errFlagsReported):
		return exitUsage
	case err != nil:
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return exitUsage
	}

	// Ctrl-C or SIGTERM cancels the call in flight; it then fails with CANCELLED and the
	// program exits through the usual error path, closing the connection.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if retryNeedsEnv(grpc.Version) && !strings.EqualFold(os.Getenv("GRPC_GO_RETRY"), "on") {
		fmt.Fprintf(os.Stderr, "warning: grpc-go %s retries only with GRPC_GO_RETRY=on\n", grpc.Version)
	}
	// Dial does not block: connection problems surface as UNAVAILABLE on the first call.
	// The default service config applies unless the name resolver supplies one (DNS TXT
	// records, off by default); an invalid one fails here.
	security, err := securityOptions(opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return exitUsage
	}
	dialOpts := append(security, grpc.WithDefaultServiceConfig(serviceConfig))
	conn, err := grpc.Dial(opts.target, dialOpts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: cannot open a channel to %s: %v\n", opts.target, err)
		return exitRPCError
	}
	defer conn.Close()

	doc, err := callAll(ctx, conn, opts)
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		return exitRPCError
	}

	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false) // ids and names are data, not HTML
	if err := enc.Encode(doc); err != nil {
		// Only non-finite floats (NaN, ±Inf) can fail here; JSON has no spelling for them.
		fmt.Fprintf(os.Stderr, "error: cannot write the answer as JSON: %v\n", err)
		return exitRPCError
	}
	return 0
}

// retryNeedsEnv reports whether grpc-go `version` (e.g. "1.33.3") predates 1.40, where retries
// became the default; before it they need GRPC_GO_RETRY=on.
func retryNeedsEnv(version string) bool {
	parts := strings.SplitN(version, ".", 3)
	if len(parts) < 2 || parts[0] != "1" {
		return false
	}
	minor, err := strconv.Atoi(parts[1])
	return err == nil && minor < 40
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bertrec-example", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	target := fs.String("target", "127.0.0.1:50051", "server address, HOST:PORT")
	userID := fs.String("user-id", "", "user to recommend for (required)")
	feedbackUserID := fs.String("feedback-user-id", "",
		"if set, record that this user rated the top recommended item (a write)")
	text := fs.String("text", defaultText, "text to embed")
	k := fs.Int("k", 10, "number of items to recommend")
	timeoutS := fs.Float64("timeout-s", 10, "deadline of each call, in seconds")
	tlsCA := fs.String("tls-ca", "", "CA certificate (PEM) to trust; turns TLS on")
	tlsCert := fs.String("tls-cert", "", "client certificate (PEM) for mTLS; needs --tls-key and --tls-ca")
	tlsKey := fs.String("tls-key", "", "private key (PEM) of --tls-cert")
	tokenFile := fs.String("token-file", "", "file holding the bearer token; needs --tls-ca")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return options{}, err
		}
		return options{}, errFlagsReported
	}

	switch {
	case fs.NArg() > 0:
		return options{}, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case *userID == "":
		return options{}, errors.New("--user-id is required")
	case *k < 1 || *k > math.MaxInt32:
		return options{}, fmt.Errorf("--k must be between 1 and %d, got %d", math.MaxInt32, *k)
	// The upper bound keeps the Duration conversion from overflowing (about 292 years).
	case !(*timeoutS > 0) || *timeoutS > math.MaxInt64/float64(time.Second):
		return options{}, fmt.Errorf("--timeout-s must be a positive number of seconds, got %v", *timeoutS)
	case (*tlsCert == "") != (*tlsKey == ""):
		return options{}, errors.New("--tls-cert and --tls-key go together")
	case *tlsCA == "" && (*tlsCert != "" || *tokenFile != ""):
		return options{}, errors.New("--tls-cert and --token-file need --tls-ca: a token or a client certificate goes over TLS only")
	}
	return options{
		target:         *target,
		userID:         *userID,
		text:           *text,
		feedbackUserID: *feedbackUserID,
		k:              int32(*k),
		timeout:        time.Duration(*timeoutS * float64(time.Second)),
		tlsCA:          *tlsCA,
		tlsCert:        *tlsCert,
		tlsKey:         *tlsKey,
		tokenFile:      *tokenFile,
	}, nil
}

// securityOptions are the dial options for the transport (plaintext, TLS or mTLS) and the token.
func securityOptions(opts options) ([]grpc.DialOption, error) {
	if opts.tlsCA == "" {
		// grpc-go 1.33 has no credentials/insecure package; WithInsecure is its plaintext option.
		return []grpc.DialOption{grpc.WithInsecure()}, nil
	}
	caPEM, err := os.ReadFile(opts.tlsCA)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", opts.tlsCA)
	}
	config := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if opts.tlsCert != "" {
		pair, err := tls.LoadX509KeyPair(opts.tlsCert, opts.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %v", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	dial := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(config))}
	if opts.tokenFile != "" {
		token, err := readToken(opts.tokenFile)
		if err != nil {
			return nil, err
		}
		dial = append(dial, grpc.WithPerRPCCredentials(token))
	}
	return dial, nil
}

// readToken reads a token file (one line; surrounding whitespace dropped). Errors name the
// file, never its content.
func readToken(path string) (bearerToken, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("--token-file: %v", err)
	}
	token := strings.TrimSpace(string(data))
	if token == "" || strings.ContainsAny(token, "\r\n") {
		return "", fmt.Errorf("--token-file %s: want one non-empty line", path)
	}
	return bearerToken(token), nil
}

// bearerToken is a credentials.PerRPCCredentials sending "authorization: Bearer <token>".
type bearerToken string

func (t bearerToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(t)}, nil
}

// RequireTransportSecurity keeps the token off plaintext connections.
func (bearerToken) RequireTransportSecurity() bool { return true }

// String hides the token from %v and %s, should it ever be printed.
func (bearerToken) String() string { return "bearerToken(<hidden>)" }

// callAll makes the calls in order, each under its own deadline so a slow call cannot
// eat into the next one's time, and stops at the first failure.
func callAll(ctx context.Context, conn *grpc.ClientConn, opts options) (*output, error) {
	health := healthpb.NewHealthClient(conn)
	recommender := bertrecv1.NewRecommenderServiceClient(conn)

	healthStatus, err := checkHealth(ctx, health, opts.timeout)
	if err != nil {
		return nil, err
	}
	rec, err := recommend(ctx, recommender, opts)
	if err != nil {
		return nil, err
	}
	emb, err := embed(ctx, recommender, opts)
	if err != nil {
		return nil, err
	}
	ids := []string{opts.userID, unknownUserID}
	batch, err := recommendBatch(ctx, recommender, opts, ids)
	if err != nil {
		return nil, err
	}
	stream, err := streamRecommendations(ctx, recommender, opts, ids)
	if err != nil {
		return nil, err
	}
	doc := &output{Health: healthStatus, Recommend: rec, Embed: emb, Batch: batch, Stream: stream}
	if opts.feedbackUserID == "" {
		return doc, nil
	}
	if len(rec.Items) == 0 {
		return nil, fmt.Errorf("%s: no recommended item to rate", rpcFeedback)
	}
	fb, err := recordFeedback(ctx, recommender, opts, rec.Items[0].ItemID)
	if err != nil {
		return nil, err
	}
	doc.Feedback = &fb
	return doc, nil
}

func checkHealth(ctx context.Context, client healthpb.HealthClient, timeout time.Duration) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	// Service "" asks about the server as a whole.
	resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		return "", wrapRPC(rpcHealthCheck, err)
	}
	return resp.GetStatus().String(), nil
}

func recommend(ctx context.Context, client bertrecv1.RecommenderServiceClient, opts options) (recommendOutput, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	// ExcludeRated stays nil (unset), so the server applies its default (true).
	resp, err := client.Recommend(ctx, &bertrecv1.RecommendRequest{UserId: opts.userID, K: opts.k})
	if err != nil {
		return recommendOutput{}, wrapRPC(rpcRecommend, err)
	}
	return recommendOutput{Model: model(resp.GetModel()), Items: items(resp.GetItems())}, nil
}

func items(ranked []*bertrecv1.RankedItem) []itemOutput {
	out := make([]itemOutput, 0, len(ranked))
	for _, it := range ranked {
		out = append(out, itemOutput{
			ItemID:          it.GetItemId(),
			Score:           it.GetScore(),
			PredictedRating: it.GetPredictedRating(),
			Rank:            it.GetRank(),
		})
	}
	return out
}

func users(results []*bertrecv1.UserRecommendations) []userOutput {
	out := make([]userOutput, 0, len(results))
	for _, r := range results {
		out = append(out, userOutput{UserID: r.GetUserId(), Found: r.GetFound(), Items: items(r.GetItems())})
	}
	return out
}

func recommendBatch(ctx context.Context, client bertrecv1.RecommenderServiceClient, opts options, ids []string) (bulkOutput, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	resp, err := client.RecommendBatch(ctx, &bertrecv1.RecommendBatchRequest{UserIds: ids, K: bulkK})
	if err != nil {
		return bulkOutput{}, wrapRPC(rpcBatch, err)
	}
	return bulkOutput{Model: model(resp.GetModel()), Results: users(resp.GetResults())}, nil
}

// streamRecommendations reads the stream to its end; the deadline bounds the whole stream.
func streamRecommendations(ctx context.Context, client bertrecv1.RecommenderServiceClient, opts options, ids []string) (bulkOutput, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	stream, err := client.StreamRecommendations(ctx, &bertrecv1.StreamRecommendationsRequest{UserIds: ids, K: bulkK})
	if err != nil {
		return bulkOutput{}, wrapRPC(rpcStream, err)
	}
	out := bulkOutput{Results: []userOutput{}}
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return bulkOutput{}, wrapRPC(rpcStream, err)
		}
		out.Model = model(msg.GetModel()) // the same in every message of a stream
		out.Results = append(out.Results, users(msg.GetResults())...)
	}
}

func embed(ctx context.Context, client bertrecv1.RecommenderServiceClient, opts options) (embedOutput, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	resp, err := client.EmbedText(ctx, &bertrecv1.EmbedTextRequest{Texts: []string{opts.text}})
	if err != nil {
		return embedOutput{}, wrapRPC(rpcEmbedText, err)
	}
	if n := len(resp.GetEmbeddings()); n != 1 {
		return embedOutput{}, fmt.Errorf("%s: expected 1 embedding for 1 text, got %d", rpcEmbedText, n)
	}
	values := resp.GetEmbeddings()[0].GetValues()
	if values == nil {
		values = []float32{} // print [] rather than null
	}
	return embedOutput{Model: model(resp.GetModel()), Values: values}, nil
}

func recordFeedback(ctx context.Context, client bertrecv1.RecommenderServiceClient, opts options, itemID string) (feedbackOutput, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	out := feedbackOutput{
		UserID:         opts.feedbackUserID,
		ItemID:         itemID,
		Rating:         exampleRating,
		IdempotencyKey: fmt.Sprintf("bertrec-example:%s:%s", opts.feedbackUserID, itemID),
	}
	event := &bertrecv1.FeedbackEvent{
		UserId:         out.UserID,
		ItemId:         out.ItemID,
		Kind:           bertrecv1.FeedbackKind_FEEDBACK_KIND_RATING,
		Rating:         out.Rating,
		OccurredAt:     timestamppb.Now(),
		IdempotencyKey: out.IdempotencyKey,
	}
	// Retried on UNAVAILABLE by the service config: the fixed key makes a second attempt of
	// an event the server did store a duplicate, never a second copy.
	resp, err := client.RecordFeedback(ctx, &bertrecv1.RecordFeedbackRequest{Events: []*bertrecv1.FeedbackEvent{event}})
	if err != nil {
		return feedbackOutput{}, wrapRPC(rpcFeedback, err)
	}
	out.Accepted, out.Duplicates = resp.GetAccepted(), resp.GetDuplicates()
	return out, nil
}

func model(m *bertrecv1.ModelRef) modelOutput {
	return modelOutput{Name: m.GetName(), Version: m.GetVersion()}
}
