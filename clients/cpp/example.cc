// Example bertrec client: checks health, asks for recommendations and embeds one text, asks
// for the same user's and an unknown user's top items in one RecommendBatch call and again over
// StreamRecommendations (read to its end; the unknown user comes back found=false), then
// prints the answers as one JSON document on stdout. Diagnostics go to stderr. With
// --feedback-user-id F it also records that F rated the top recommended item (RecordFeedback,
// a write, so never done unasked) under the fixed idempotency key "bertrec-example:F:ITEM":
// running it again stores nothing new, and the answer counts a duplicate.
//
//   bertrec-example --user-id U [--target HOST:PORT] [--text T] [--k K] [--timeout-s S]
//                   [--feedback-user-id F]
//                   [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
//
// With --tls-ca the channel speaks TLS trusting that CA only (grpc::SslCredentials);
// --tls-cert/--tls-key add a client certificate (mTLS); --token-file sends its token as
// "authorization: Bearer <token>" with every call (grpc::AccessTokenCredentials, which gRPC
// sends over TLS only).
//
// Exit status: 0 on success, 1 when an RPC fails, 2 on bad usage.
//
// The channel retries RecommenderService calls by the service config every bertrec client
// shares (clients/service_config.json, compiled in by build.sh; see clients/README.md).
#include <grpc/grpc.h>
#include <google/protobuf/util/time_util.h>
#include <grpcpp/grpcpp.h>

#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

#include "bertrec/v1/recommender.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "json_writer.h"

namespace {

namespace health = ::grpc::health::v1;
namespace rec = ::bertrec::v1;
using bertrec_example::JsonWriter;

// clients/service_config.json, made into a string literal by build.sh.
constexpr char kServiceConfig[] =
#include "service_config.inc"
    ;

constexpr int kExitRpcError = 1;
constexpr int kExitUsage = 2;
// The rating --feedback-user-id records; any value in the model's rating range works.
constexpr double kExampleRating = 4.0;
// An id no model knows: the bulk calls answer it with found=false instead of failing the call.
constexpr char kUnknownUserId[] = "bertrec-example-unknown-user";
// The k of the bulk calls: small, as a bulk job's per-user lists are.
constexpr int kBulkK = 3;

constexpr char kUsage[] =
    "usage: bertrec-example --user-id U [--target HOST:PORT] [--text T] [--k K] "
    "[--timeout-s S] [--feedback-user-id F]\n"
    "  --target HOST:PORT  server address (default 127.0.0.1:50051)\n"
    "  --user-id U         user to recommend for (required)\n"
    "  --text T            text to embed (default: a sample sentence)\n"
    "  --k K               number of recommendations (default 10)\n"
    "  --timeout-s S       deadline of each RPC in seconds (default 10)\n"
    "  --feedback-user-id F  if set, record that F rated the top item (a write)\n"
    "  --tls-ca FILE       CA certificate (PEM) to trust; turns TLS on\n"
    "  --tls-cert FILE, --tls-key FILE  client certificate and key (PEM) for mTLS\n"
    "  --token-file FILE   file holding the bearer token (needs --tls-ca)\n";

struct Options {
  std::string target = "127.0.0.1:50051";
  std::string user_id;
  std::string text = "a quiet film about an old friendship and a long road trip";
  std::int32_t k = 10;
  double timeout_s = 10.0;
  std::string feedback_user_id;  // empty: no RecordFeedback
  // TLS and auth: file paths, read when the channel is set up. Empty: not used.
  std::string tls_ca, tls_cert, tls_key, token_file;
};

// Parses a whole string as a number; nullopt if anything is left over or out of range.
template <typename T>
std::optional<T> ParseNumber(std::string_view s) {
  T value{};
  const char* end = s.data() + s.size();
  const auto [ptr, ec] = std::from_chars(s.data(), end, value);
  if (ec != std::errc() || ptr != end) return std::nullopt;
  return value;
}

// Accepts "--flag value" and "--flag=value". Prints the problem and returns nullopt on bad
// usage; exits 0 after printing help for -h/--help.
std::optional<Options> ParseArgs(int argc, char** argv) {
  Options opts;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    }
    std::string_view name = arg;
    std::optional<std::string_view> value;
    if (const auto eq = arg.find('='); arg.rfind("--", 0) == 0 && eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = argv[++i];
    }
    auto fail = [&](std::string_view why) {
      std::cerr << "error: " << name << ": " << why << "\n" << kUsage;
      return std::nullopt;
    };
    if (name != "--target" && name != "--user-id" && name != "--text" && name != "--k" &&
        name != "--timeout-s" && name != "--feedback-user-id" && name != "--tls-ca" &&
        name != "--tls-cert" && name != "--tls-key" && name != "--token-file") {
      return fail("unknown flag");
    }
    if (!value) return fail("needs a value");

    if (name == "--tls-ca") {
      opts.tls_ca = *value;
    } else if (name == "--tls-cert") {
      opts.tls_cert = *value;
    } else if (name == "--tls-key") {
      opts.tls_key = *value;
    } else if (name == "--token-file") {
      opts.token_file = *value;
    } else if (name == "--target") {
      opts.target = *value;
    } else if (name == "--user-id") {
      opts.user_id = *value;
    } else if (name == "--feedback-user-id") {
      opts.feedback_user_id = *value;
    } else if (name == "--text") {
      opts.text = *value;
    } else if (name == "--k") {
      const auto k = ParseNumber<std::int32_t>(*value);
      if (!k || *k <= 0) return fail("must be a positive integer");
      opts.k = *k;
    } else {  // --timeout-s
      const auto t = ParseNumber<double>(*value);
      // The upper bound keeps the conversion to a clock duration far from overflow.
      if (!t || !std::isfinite(*t) || *t <= 0 || *t > 1e6) {
        return fail("must be a number of seconds in (0, 1e6]");
      }
      opts.timeout_s = *t;
    }
  }
  if (opts.user_id.empty()) {
    std::cerr << "error: --user-id is required\n" << kUsage;
    return std::nullopt;
  }
  if (opts.tls_cert.empty() != opts.tls_key.empty()) {
    std::cerr << "error: --tls-cert and --tls-key go together\n" << kUsage;
    return std::nullopt;
  }
  if (opts.tls_ca.empty() && !(opts.tls_cert.empty() && opts.token_file.empty())) {
    std::cerr << "error: --tls-cert and --token-file need --tls-ca: a token or a client "
                 "certificate goes over TLS only\n"
              << kUsage;
    return std::nullopt;
  }
  return opts;
}

// The whole content of a file, or nullopt (the caller names the flag and the path).
std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return std::nullopt;
  return content;
}

// Plaintext, or TLS trusting --tls-ca (with a client certificate, and the token from
// --token-file, when given). Prints the problem and returns nullptr when a file is unusable;
// never prints the token.
std::shared_ptr<grpc::ChannelCredentials> Credentials(const Options& opts) {
  if (opts.tls_ca.empty()) return grpc::InsecureChannelCredentials();
  auto read = [](const char* flag, const std::string& path) {
    auto content = ReadFile(path);
    if (!content) std::cerr << "error: " << flag << " " << path << ": cannot read it\n";
    return content;
  };
  grpc::SslCredentialsOptions ssl;
  const auto ca = read("--tls-ca", opts.tls_ca);
  if (!ca) return nullptr;
  ssl.pem_root_certs = *ca;
  if (!opts.tls_cert.empty()) {
    const auto cert = read("--tls-cert", opts.tls_cert);
    const auto key = read("--tls-key", opts.tls_key);
    if (!cert || !key) return nullptr;
    ssl.pem_cert_chain = *cert;
    ssl.pem_private_key = *key;
  }
  auto credentials = grpc::SslCredentials(ssl);
  if (opts.token_file.empty()) return credentials;
  auto token = read("--token-file", opts.token_file);
  if (!token) return nullptr;
  const auto first = token->find_first_not_of(" \t\r\n");
  const auto last = token->find_last_not_of(" \t\r\n");
  if (first == std::string::npos ||
      token->substr(first, last - first + 1).find_first_of("\r\n") != std::string::npos) {
    std::cerr << "error: --token-file " << opts.token_file << ": want one non-empty line\n";
    return nullptr;
  }
  return grpc::CompositeChannelCredentials(
      credentials, grpc::AccessTokenCredentials(token->substr(first, last - first + 1)));
}

// The canonical name of a status code, as every gRPC implementation spells it.
const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

// Runs one unary RPC under its own deadline. `call` receives a fresh ClientContext (one per
// call, as gRPC requires) and returns the call's Status. On failure prints the error line and
// returns false.
template <typename Call>
bool Invoke(std::string_view rpc, double timeout_s, Call&& call) {
  grpc::ClientContext context;
  const auto timeout = std::chrono::duration_cast<std::chrono::system_clock::duration>(
      std::chrono::duration<double>(timeout_s));
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  const grpc::Status status = call(&context);
  if (!status.ok()) {
    std::cerr << "error: " << rpc << " failed: " << CodeName(status.error_code()) << ": "
              << status.error_message() << "\n";
    return false;
  }
  return true;
}

void WriteModel(JsonWriter& json, const rec::ModelRef& model) {
  json.Key("model").BeginObject();
  json.Key("name").String(model.name());
  json.Key("version").Int(model.version());
  json.EndObject();
}

void WriteItems(JsonWriter& json,
                const google::protobuf::RepeatedPtrField<rec::RankedItem>& items) {
  json.Key("items").BeginArray();
  for (const rec::RankedItem& item : items) {
    json.BeginObject();
    json.Key("item_id").String(item.item_id());
    json.Key("score").Float(item.score());
    json.Key("predicted_rating").Float(item.predicted_rating());
    json.Key("rank").Int(item.rank());
    json.EndObject();
  }
  json.EndArray();
}

// One bulk call's answer (a stream's messages gathered into one RecommendBatchResponse).
void WriteBulk(JsonWriter& json, std::string_view key, const rec::RecommendBatchResponse& bulk) {
  json.Key(key).BeginObject();
  WriteModel(json, bulk.model());
  json.Key("results").BeginArray();
  for (const rec::UserRecommendations& user : bulk.results()) {
    json.BeginObject();
    json.Key("user_id").String(user.user_id());
    json.Key("found").Bool(user.found());
    WriteItems(json, user.items());
    json.EndObject();
  }
  json.EndArray();
  json.EndObject();
}

// RecommendBatch, then StreamRecommendations read to its end (its deadline bounds the whole
// stream), for the same users. On failure prints the error line and returns false.
bool CallBulk(rec::RecommenderService::Stub& recommender, const Options& opts,
              rec::RecommendBatchResponse* batch, rec::RecommendBatchResponse* stream) {
  rec::RecommendBatchRequest batch_request;
  batch_request.add_user_ids(opts.user_id);
  batch_request.add_user_ids(kUnknownUserId);
  batch_request.set_k(kBulkK);
  if (!Invoke("RecommendBatch", opts.timeout_s, [&](grpc::ClientContext* ctx) {
        return recommender.RecommendBatch(ctx, batch_request, batch);
      })) {
    return false;
  }
  rec::StreamRecommendationsRequest stream_request;
  *stream_request.mutable_user_ids() = batch_request.user_ids();
  stream_request.set_k(kBulkK);
  return Invoke("StreamRecommendations", opts.timeout_s, [&](grpc::ClientContext* ctx) {
    const auto reader = recommender.StreamRecommendations(ctx, stream_request);
    rec::StreamRecommendationsResponse message;
    while (reader->Read(&message)) {
      *stream->mutable_model() = message.model();  // the same in every message of a stream
      for (const rec::UserRecommendations& user : message.results()) *stream->add_results() = user;
    }
    return reader->Finish();
  });
}

int Run(const Options& opts) {
  // One channel carries all three calls; stubs are cheap views onto it. The default service
  // config applies unless the name resolver supplies one (DNS TXT records, off by default).
  grpc::ChannelArguments args;
  args.SetServiceConfigJSON(kServiceConfig);
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 1);  // the default since gRPC 1.40; explicit for older
  const auto credentials = Credentials(opts);
  if (!credentials) return kExitUsage;
  const auto channel = grpc::CreateCustomChannel(opts.target, credentials, args);
  const auto health_stub = health::Health::NewStub(channel);
  const auto recommender = rec::RecommenderService::NewStub(channel);

  health::HealthCheckRequest health_request;
  health_request.set_service("");  // "" = the server as a whole
  health::HealthCheckResponse health_response;
  if (!Invoke("Health/Check", opts.timeout_s, [&](grpc::ClientContext* ctx) {
        return health_stub->Check(ctx, health_request, &health_response);
      })) {
    return kExitRpcError;
  }

  rec::RecommendRequest recommend_request;
  recommend_request.set_user_id(opts.user_id);
  recommend_request.set_k(opts.k);
  // exclude_rated stays unset so the server applies its default (true).
  rec::RecommendResponse recommend_response;
  if (!Invoke("Recommend", opts.timeout_s, [&](grpc::ClientContext* ctx) {
        return recommender->Recommend(ctx, recommend_request, &recommend_response);
      })) {
    return kExitRpcError;
  }

  rec::EmbedTextRequest embed_request;
  embed_request.add_texts(opts.text);
  rec::EmbedTextResponse embed_response;
  if (!Invoke("EmbedText", opts.timeout_s, [&](grpc::ClientContext* ctx) {
        return recommender->EmbedText(ctx, embed_request, &embed_response);
      })) {
    return kExitRpcError;
  }
  if (embed_response.embeddings_size() != 1) {
    std::cerr << "error: EmbedText failed: returned " << embed_response.embeddings_size()
              << " embeddings for 1 text\n";
    return kExitRpcError;
  }

  rec::RecommendBatchResponse batch_response;
  rec::RecommendBatchResponse stream_response;
  if (!CallBulk(*recommender, opts, &batch_response, &stream_response)) return kExitRpcError;

  // One rating of the top recommended item by --feedback-user-id. Retried on UNAVAILABLE by the
  // service config: the fixed key makes a second attempt of an event the server did store a
  // duplicate, never a second copy.
  rec::RecordFeedbackRequest feedback_request;
  rec::RecordFeedbackResponse feedback_response;
  if (!opts.feedback_user_id.empty()) {
    if (recommend_response.items_size() == 0) {
      std::cerr << "error: RecordFeedback failed: no recommended item to rate\n";
      return kExitRpcError;
    }
    const std::string& item_id = recommend_response.items(0).item_id();
    rec::FeedbackEvent* event = feedback_request.add_events();
    event->set_user_id(opts.feedback_user_id);
    event->set_item_id(item_id);
    event->set_kind(rec::FEEDBACK_KIND_RATING);
    event->set_rating(kExampleRating);
    *event->mutable_occurred_at() = google::protobuf::util::TimeUtil::GetCurrentTime();
    event->set_idempotency_key("bertrec-example:" + opts.feedback_user_id + ":" + item_id);
    if (!Invoke("RecordFeedback", opts.timeout_s, [&](grpc::ClientContext* ctx) {
          return recommender->RecordFeedback(ctx, feedback_request, &feedback_response);
        })) {
      return kExitRpcError;
    }
  }

  // Open enums can carry values this build does not know; show those by number.
  std::string status_name = health::HealthCheckResponse::ServingStatus_Name(
      health_response.status());
  if (status_name.empty()) status_name = std::to_string(health_response.status());

  JsonWriter json;
  json.BeginObject();
  json.Key("health").String(status_name);

  json.Key("recommend").BeginObject();
  WriteModel(json, recommend_response.model());
  WriteItems(json, recommend_response.items());
  json.EndObject();

  json.Key("embed").BeginObject();
  WriteModel(json, embed_response.model());
  json.Key("values").BeginArray();
  for (const float v : embed_response.embeddings(0).values()) json.Float(v);
  json.EndArray();
  json.EndObject();

  WriteBulk(json, "batch", batch_response);
  WriteBulk(json, "stream", stream_response);

  if (feedback_request.events_size() == 1) {
    const rec::FeedbackEvent& event = feedback_request.events(0);
    json.Key("feedback").BeginObject();
    json.Key("user_id").String(event.user_id());
    json.Key("item_id").String(event.item_id());
    json.Key("rating").Double(event.rating());
    json.Key("idempotency_key").String(event.idempotency_key());
    json.Key("accepted").Int(feedback_response.accepted());
    json.Key("duplicates").Int(feedback_response.duplicates());
    json.EndObject();
  }

  json.EndObject();
  std::cout << json.str() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::optional<Options> opts = ParseArgs(argc, argv);
  if (!opts) return kExitUsage;
  return Run(*opts);
}
