package dev.bertrec.example;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.reflect.TypeToken;
import com.google.protobuf.Timestamp;
import dev.bertrec.v1.EmbedTextRequest;
import dev.bertrec.v1.EmbedTextResponse;
import dev.bertrec.v1.FeedbackEvent;
import dev.bertrec.v1.FeedbackKind;
import dev.bertrec.v1.ModelRef;
import dev.bertrec.v1.RankedItem;
import dev.bertrec.v1.RecommendBatchRequest;
import dev.bertrec.v1.RecommendBatchResponse;
import dev.bertrec.v1.RecordFeedbackRequest;
import dev.bertrec.v1.RecordFeedbackResponse;
import dev.bertrec.v1.RecommendRequest;
import dev.bertrec.v1.RecommendResponse;
import dev.bertrec.v1.RecommenderServiceGrpc;
import dev.bertrec.v1.StreamRecommendationsRequest;
import dev.bertrec.v1.StreamRecommendationsResponse;
import dev.bertrec.v1.UserRecommendations;
import io.grpc.CallCredentials;
import io.grpc.ChannelCredentials;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.SecurityLevel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthCheckResponse;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.netty.NettyChannelBuilder;
import io.netty.handler.ssl.JdkAlpnClientContext;
import java.io.File;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Instant;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.Executor;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;
import java.util.logging.Level;
import java.util.logging.Logger;

/**
 * Example bertrec client: checks health, asks for recommendations for one user and embeds one
 * text, asks for the same user's and an unknown user's top items in one {@code RecommendBatch}
 * call and again over {@code StreamRecommendations} (read to its end; the unknown user comes
 * back found=false), then prints the answers as one JSON document on stdout. With {@code --feedback-user-id F}
 * it also records that F rated the top recommended item ({@code RecordFeedback}, a write, so
 * never done unasked) under the fixed idempotency key {@code bertrec-example:F:ITEM}: running it
 * again stores nothing new and the answer counts a duplicate.
 *
 * <p>Usage: {@code Example --user-id U [--target HOST:PORT] [--text T] [--k K] [--timeout-s S]
 * [--feedback-user-id F] [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]}.
 * With {@code --tls-ca} the channel speaks TLS trusting that CA only; {@code --tls-cert/--tls-key}
 * add a client certificate (mTLS); {@code --token-file} sends its token as {@code authorization:
 * Bearer <token>} with every call, over TLS only.
 * Exit status: 0 on success, 1 when an RPC fails (the status is printed on stderr), 2 on bad
 * arguments.
 *
 * <p>The channel retries RecommenderService calls by the service config every bertrec client
 * shares (clients/service_config.json, copied into the classes folder by build.sh; see
 * clients/README.md).
 */
public final class Example {
  private static final String DEFAULT_TARGET = "127.0.0.1:50051";
  private static final String DEFAULT_TEXT = "a quiet film about family, memory and the sea";
  private static final int DEFAULT_K = 10;
  private static final double DEFAULT_TIMEOUT_S = 10.0;
  private static final long SHUTDOWN_GRACE_MS = 2_000;
  private static final String SERVICE_CONFIG = "service_config.json";
  // The rating --feedback-user-id records; any value in the model's rating range works.
  private static final double EXAMPLE_RATING = 4.0;
  // An id no model knows: the bulk calls answer it with found=false instead of failing the call.
  private static final String UNKNOWN_USER_ID = "bertrec-example-unknown-user";
  // The k of the bulk calls: small, as a bulk job's per-user lists are.
  private static final int BULK_K = 3;

  private static final String USAGE =
      "usage: Example --user-id U [--target HOST:PORT] [--text T] [--k K] [--timeout-s S]"
          + " [--feedback-user-id F]\n"
          + "  --target     server address (default " + DEFAULT_TARGET + ")\n"
          + "  --user-id    user to recommend for (required)\n"
          + "  --text       text to embed (default: a sample sentence)\n"
          + "  --k          number of recommendations (default " + DEFAULT_K + ")\n"
          + "  --timeout-s  deadline of each call in seconds (default " + DEFAULT_TIMEOUT_S + ")\n"
          + "  --feedback-user-id  if set, record that this user rated the top item (a write)\n"
          + "  --tls-ca     CA certificate (PEM) to trust; turns TLS on\n"
          + "  --tls-cert, --tls-key  client certificate and key (PEM) for mTLS\n"
          + "  --token-file file holding the bearer token (needs --tls-ca)";

  // System.out/err encode with the platform charset, which is ASCII under LANG=C; JSON is UTF-8.
  private static final PrintStream OUT =
      new PrintStream(new FileOutputStream(FileDescriptor.out), false, StandardCharsets.UTF_8);
  private static final PrintStream ERR =
      new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8);

  // Compact output; no HTML escaping, so ids such as "a<b" print as written.
  private static final Gson GSON = new GsonBuilder().disableHtmlEscaping().create();

  // Every failed call is reported once, on one stderr line, by this program. grpc-java would also
  // log some failures (e.g. an unresolvable host) as WARNINGs carrying a stack trace, so its
  // logging is limited to SEVERE unless a java.util.logging config is given (see README.md).
  // The field keeps the logger alive: java.util.logging holds loggers only weakly.
  private static final Logger GRPC_LOGGER = Logger.getLogger("io.grpc");

  private Example() {}

  /** Command-line settings, validated. */
  record Options(
      String target, String userId, String text, int k, long timeoutMs, String feedbackUserId,
      String tlsCa, String tlsCert, String tlsKey, String tokenFile) {
    private static final Set<String> FLAGS =
        Set.of("--target", "--user-id", "--text", "--k", "--timeout-s", "--feedback-user-id",
            "--tls-ca", "--tls-cert", "--tls-key", "--token-file");

    static Options parse(String[] args) throws UsageException {
      String target = DEFAULT_TARGET;
      String userId = null;
      String text = DEFAULT_TEXT;
      int k = DEFAULT_K;
      double timeoutS = DEFAULT_TIMEOUT_S;
      String feedbackUserId = "";
      String tlsCa = "";
      String tlsCert = "";
      String tlsKey = "";
      String tokenFile = "";
      for (int i = 0; i < args.length; i++) {
        String arg = args[i];
        if (arg.equals("-h") || arg.equals("--help")) {
          throw new UsageException(null);
        }
        // Both "--flag value" and "--flag=value".
        int eq = arg.startsWith("--") ? arg.indexOf('=') : -1;
        String flag = eq > 0 ? arg.substring(0, eq) : arg;
        if (!FLAGS.contains(flag)) {
          throw new UsageException("unknown argument " + arg);
        }
        String value;
        if (eq > 0) {
          value = arg.substring(eq + 1);
        } else if (i + 1 < args.length) {
          value = args[++i];
        } else {
          throw new UsageException("missing value for " + flag);
        }
        switch (flag) {
          case "--target" -> target = value;
          case "--user-id" -> userId = value;
          case "--text" -> text = value;
          case "--k" -> k = parseInt(flag, value);
          case "--timeout-s" -> timeoutS = parseDouble(flag, value);
          case "--feedback-user-id" -> feedbackUserId = value;
          case "--tls-ca" -> tlsCa = value;
          case "--tls-cert" -> tlsCert = value;
          case "--tls-key" -> tlsKey = value;
          case "--token-file" -> tokenFile = value;
          default -> throw new AssertionError(flag); // FLAGS and this switch list the same flags
        }
      }
      if (userId == null || userId.isEmpty()) {
        throw new UsageException("--user-id is required");
      }
      if (target.isEmpty()) {
        throw new UsageException("--target must not be empty");
      }
      if (k <= 0) {
        throw new UsageException("--k must be positive, got " + k);
      }
      if (!(timeoutS > 0) || Double.isInfinite(timeoutS)) {
        throw new UsageException("--timeout-s must be a positive number of seconds");
      }
      if (tlsCert.isEmpty() != tlsKey.isEmpty()) {
        throw new UsageException("--tls-cert and --tls-key go together");
      }
      if (tlsCa.isEmpty() && !(tlsCert.isEmpty() && tokenFile.isEmpty())) {
        throw new UsageException("--tls-cert and --token-file need --tls-ca: a token or a client"
            + " certificate goes over TLS only");
      }
      return new Options(target, userId, text, k, Math.max(1, Math.round(timeoutS * 1000)),
          feedbackUserId, tlsCa, tlsCert, tlsKey, tokenFile);
    }

    private static int parseInt(String flag, String value) throws UsageException {
      try {
        return Integer.parseInt(value);
      } catch (NumberFormatException e) {
        throw new UsageException(flag + " wants an integer, got '" + value + "'");
      }
    }

    private static double parseDouble(String flag, String value) throws UsageException {
      try {
        return Double.parseDouble(value);
      } catch (NumberFormatException e) {
        throw new UsageException(flag + " wants a number, got '" + value + "'");
      }
    }
  }

  /**
   * Sends {@code authorization: Bearer <token>} with every call, and only over a connection with
   * privacy and integrity (TLS): on plaintext the call fails UNAUTHENTICATED without sending it.
   */
  static final class BearerToken extends CallCredentials {
    private static final Metadata.Key<String> AUTHORIZATION =
        Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
    private final String header;

    BearerToken(String token) {
      this.header = "Bearer " + token;
    }

    /** The token in a file (one line; surrounding whitespace dropped); errors name the file. */
    static BearerToken read(String path) throws IOException {
      String token = Files.readString(Path.of(path), StandardCharsets.US_ASCII).strip();
      if (token.isEmpty() || token.contains("\n") || token.contains("\r")) {
        throw new IOException("--token-file " + path + ": want one non-empty line");
      }
      return new BearerToken(token);
    }

    @Override
    public void applyRequestMetadata(
        RequestInfo info, Executor executor, MetadataApplier applier) {
      if (info.getSecurityLevel() != SecurityLevel.PRIVACY_AND_INTEGRITY) {
        applier.fail(Status.UNAUTHENTICATED.withDescription("no bearer token over plaintext"));
        return;
      }
      Metadata headers = new Metadata();
      headers.put(AUTHORIZATION, header);
      applier.apply(headers);
    }

    @Override
    public void thisUsesUnstableApi() {}

    @Override
    public String toString() {
      return "BearerToken(<hidden>)";
    }
  }

  /** Plaintext, or TLS trusting --tls-ca (with the client certificate when given). */
  static ChannelCredentials credentials(Options options) throws IOException {
    if (options.tlsCa().isEmpty()) {
      return InsecureChannelCredentials.create();
    }
    TlsChannelCredentials.Builder tls =
        TlsChannelCredentials.newBuilder().trustManager(new File(options.tlsCa()));
    if (!options.tlsCert().isEmpty()) {
      tls.keyManager(new File(options.tlsCert()), new File(options.tlsKey()));
    }
    return tls.build();
  }

  /**
   * A channel builder for the target: grpc-java's own TLS, or, where Netty lacks ALPN (Debian's
   * libnetty-java, see {@link JdkAlpnClientContext}), the same certificates through the JDK's ALPN.
   */
  static ManagedChannelBuilder<?> channelBuilder(Options options) throws IOException {
    ChannelCredentials credentials = credentials(options);
    try {
      return Grpc.newChannelBuilder(options.target(), credentials);
    } catch (UnsupportedOperationException noAlpn) {
      File cert = options.tlsCert().isEmpty() ? null : new File(options.tlsCert());
      File key = options.tlsKey().isEmpty() ? null : new File(options.tlsKey());
      return NettyChannelBuilder.forTarget(options.target())
          .sslContext(JdkAlpnClientContext.forClient(new File(options.tlsCa()), cert, key));
    }
  }

  /** Bad command line; a null message means help was asked for. */
  static final class UsageException extends Exception {
    private static final long serialVersionUID = 1L;

    UsageException(String message) {
      super(message, null, false, false);
    }
  }

  /** A failed RPC, named by its full gRPC method name (e.g. "grpc.health.v1.Health/Check"). */
  static final class RpcFailure extends Exception {
    private static final long serialVersionUID = 1L;

    RpcFailure(String method, Status status) {
      super(method + " failed: " + status.getCode().name() + ": " + describe(status), null, false,
          false);
    }

    private static String describe(Status status) {
      String description = status.getDescription() == null ? "" : status.getDescription().strip();
      // Transport failures say only "io exception"; the cause says what went wrong
      // (e.g. "Connection refused: /127.0.0.1:50051").
      Throwable cause = status.getCause();
      if (cause != null && cause.getMessage() != null) {
        description = description.isEmpty()
            ? cause.getMessage()
            : description + " (" + cause.getMessage() + ")";
      }
      return description;
    }
  }

  public static void main(String[] args) {
    if (System.getProperty("java.util.logging.config.file") == null) {
      GRPC_LOGGER.setLevel(Level.SEVERE);
    }
    int code = run(args);
    OUT.flush();
    ERR.flush();
    System.exit(code);
  }

  static int run(String[] args) {
    Options options;
    try {
      options = Options.parse(args);
    } catch (UsageException e) {
      if (e.getMessage() == null) {
        OUT.println(USAGE);
        return 0;
      }
      ERR.println("error: " + e.getMessage());
      ERR.println(USAGE);
      return 2;
    }

    Map<String, Object> serviceConfig;
    try {
      serviceConfig = serviceConfig();
    } catch (IOException | JsonParseException e) {
      ERR.println("error: cannot read the service config: " + e.getMessage());
      return 1;
    }
    // The default service config applies unless the name resolver supplies one (DNS TXT
    // records, off by default); enableRetry() is a no-op where retries are already the default.
    ManagedChannelBuilder<?> builder;
    BearerToken token;
    try {
      builder = channelBuilder(options);
      token = options.tokenFile().isEmpty() ? null : BearerToken.read(options.tokenFile());
    } catch (IOException | IllegalArgumentException e) {
      ERR.println("error: cannot read the TLS or token files: " + e.getMessage());
      return 2;
    }
    ManagedChannel channel =
        builder
            .defaultServiceConfig(serviceConfig)
            .enableRetry()
            .build();
    try {
      JsonObject document = callAll(channel, options, token);
      String json;
      try {
        json = GSON.toJson(document);
      } catch (IllegalArgumentException e) { // NaN or infinity: strict JSON has no spelling
        ERR.println("error: answer is not representable as JSON: " + e.getMessage());
        return 1;
      }
      OUT.println(json);
      return 0;
    } catch (RpcFailure e) {
      ERR.println("error: " + e.getMessage());
      return 1;
    } finally {
      // shutdownNow: every call has finished (or failed), so there is nothing to drain.
      channel.shutdownNow();
      try {
        channel.awaitTermination(SHUTDOWN_GRACE_MS, TimeUnit.MILLISECONDS);
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
      }
    }
  }

  /**
   * The shared service config as the nested maps grpc-java wants: Gson reads JSON numbers as
   * Double, arrays as List and objects as Map, the only types defaultServiceConfig accepts.
   */
  private static Map<String, Object> serviceConfig() throws IOException {
    try (InputStream in = Example.class.getResourceAsStream(SERVICE_CONFIG)) {
      if (in == null) {
        throw new IOException(SERVICE_CONFIG + " is not on the class path (build.sh copies it)");
      }
      Reader reader = new InputStreamReader(in, StandardCharsets.UTF_8);
      Map<String, Object> config =
          GSON.fromJson(reader, new TypeToken<Map<String, Object>>() {}.getType());
      if (config == null) {
        throw new IOException(SERVICE_CONFIG + " is empty");
      }
      return config;
    }
  }

  private static JsonObject callAll(
      ManagedChannel channel, Options options, CallCredentials token) throws RpcFailure {
    // The token (if any) rides on every call of both stubs; null means none.
    HealthGrpc.HealthBlockingStub health =
        HealthGrpc.newBlockingStub(channel).withCallCredentials(token);
    RecommenderServiceGrpc.RecommenderServiceBlockingStub recommender =
        RecommenderServiceGrpc.newBlockingStub(channel).withCallCredentials(token);
    long timeoutMs = options.timeoutMs();

    // withDeadlineAfter is applied right before each call so every RPC gets the full budget.
    HealthCheckResponse status =
        call(HealthGrpc.getCheckMethod(),
            () -> health.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
                .check(HealthCheckRequest.newBuilder().setService("").build()));

    // exclude_rated is left unset: the server's default (true) applies.
    RecommendResponse recommended =
        call(RecommenderServiceGrpc.getRecommendMethod(),
            () -> recommender.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
                .recommend(RecommendRequest.newBuilder()
                    .setUserId(options.userId())
                    .setK(options.k())
                    .build()));

    EmbedTextResponse embedded =
        call(RecommenderServiceGrpc.getEmbedTextMethod(),
            () -> recommender.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
                .embedText(EmbedTextRequest.newBuilder().addTexts(options.text()).build()));
    if (embedded.getEmbeddingsCount() != 1) {
      throw new RpcFailure(RecommenderServiceGrpc.getEmbedTextMethod().getFullMethodName(),
          Status.INTERNAL.withDescription(
              "expected 1 embedding, got " + embedded.getEmbeddingsCount()));
    }

    List<String> userIds = List.of(options.userId(), UNKNOWN_USER_ID);
    RecommendBatchResponse batch =
        call(RecommenderServiceGrpc.getRecommendBatchMethod(),
            () -> recommender.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
                .recommendBatch(RecommendBatchRequest.newBuilder()
                    .addAllUserIds(userIds)
                    .setK(BULK_K)
                    .build()));
    // The deadline bounds the whole stream; a failure mid-way surfaces from the iterator.
    JsonObject stream =
        call(RecommenderServiceGrpc.getStreamRecommendationsMethod(),
            () -> readStream(recommender.withDeadlineAfter(timeoutMs, TimeUnit.MILLISECONDS)
                .streamRecommendations(StreamRecommendationsRequest.newBuilder()
                    .addAllUserIds(userIds)
                    .setK(BULK_K)
                    .build())));

    JsonObject document = new JsonObject();
    document.addProperty("health", status.getStatus().name());
    document.add("recommend", toJson(recommended));
    document.add("embed", toJson(embedded));
    document.add("batch", bulkJson(batch.getModel(), batch.getResultsList()));
    document.add("stream", stream);
    if (!options.feedbackUserId().isEmpty()) {
      document.add("feedback", recordFeedback(recommender, options, recommended));
    }
    return document;
  }

  /** Reads every message of a StreamRecommendations call, in order, as one bulk answer. */
  private static JsonObject readStream(Iterator<StreamRecommendationsResponse> messages) {
    ModelRef model = ModelRef.getDefaultInstance();
    List<UserRecommendations> results = new ArrayList<>();
    while (messages.hasNext()) {
      StreamRecommendationsResponse message = messages.next();
      model = message.getModel(); // the same in every message of a stream
      results.addAll(message.getResultsList());
    }
    return bulkJson(model, results);
  }

  private static JsonObject bulkJson(ModelRef model, List<UserRecommendations> results) {
    JsonArray users = new JsonArray();
    for (UserRecommendations result : results) {
      JsonObject json = new JsonObject();
      json.addProperty("user_id", result.getUserId());
      json.addProperty("found", result.getFound());
      json.add("items", itemsJson(result.getItemsList()));
      users.add(json);
    }
    JsonObject json = new JsonObject();
    json.add("model", toJson(model));
    json.add("results", users);
    return json;
  }

  /** One rating of the top recommended item by --feedback-user-id, and the store's answer. */
  private static JsonObject recordFeedback(
      RecommenderServiceGrpc.RecommenderServiceBlockingStub recommender,
      Options options,
      RecommendResponse recommended)
      throws RpcFailure {
    MethodDescriptor<?, ?> method = RecommenderServiceGrpc.getRecordFeedbackMethod();
    if (recommended.getItemsCount() == 0) {
      throw new RpcFailure(method.getFullMethodName(),
          Status.FAILED_PRECONDITION.withDescription("no recommended item to rate"));
    }
    String itemId = recommended.getItems(0).getItemId();
    String key = "bertrec-example:" + options.feedbackUserId() + ":" + itemId;
    Instant now = Instant.now();
    FeedbackEvent event = FeedbackEvent.newBuilder()
        .setUserId(options.feedbackUserId())
        .setItemId(itemId)
        .setKind(FeedbackKind.FEEDBACK_KIND_RATING)
        .setRating(EXAMPLE_RATING)
        .setOccurredAt(Timestamp.newBuilder()
            .setSeconds(now.getEpochSecond())
            .setNanos(now.getNano()))
        .setIdempotencyKey(key)
        .build();
    // Retried on UNAVAILABLE by the service config: the fixed key makes a second attempt of an
    // event the server did store a duplicate, never a second copy.
    RecordFeedbackResponse response =
        call(method,
            () -> recommender.withDeadlineAfter(options.timeoutMs(), TimeUnit.MILLISECONDS)
                .recordFeedback(RecordFeedbackRequest.newBuilder().addEvents(event).build()));
    JsonObject json = new JsonObject();
    json.addProperty("user_id", event.getUserId());
    json.addProperty("item_id", itemId);
    json.addProperty("rating", event.getRating());
    json.addProperty("idempotency_key", key);
    json.addProperty("accepted", response.getAccepted());
    json.addProperty("duplicates", response.getDuplicates());
    return json;
  }

  /** Runs one blocking call, turning its failure status into an RpcFailure naming the method. */
  private static <T> T call(MethodDescriptor<?, ?> method, Supplier<T> rpc) throws RpcFailure {
    try {
      return rpc.get();
    } catch (StatusRuntimeException e) {
      throw new RpcFailure(method.getFullMethodName(), e.getStatus());
    }
  }

  private static JsonObject toJson(ModelRef model) {
    JsonObject json = new JsonObject();
    json.addProperty("name", model.getName());
    json.addProperty("version", model.getVersion());
    return json;
  }

  // Floats stay boxed as Float: Gson prints them with Float.toString, the shortest decimal that
  // reads back as the same float32 (widening to double first would print float noise digits).
  private static JsonArray itemsJson(List<RankedItem> ranked) {
    JsonArray items = new JsonArray();
    for (RankedItem item : ranked) {
      JsonObject json = new JsonObject();
      json.addProperty("item_id", item.getItemId());
      json.addProperty("score", item.getScore());
      json.addProperty("predicted_rating", item.getPredictedRating());
      json.addProperty("rank", item.getRank());
      items.add(json);
    }
    return items;
  }

  private static JsonObject toJson(RecommendResponse response) {
    JsonObject json = new JsonObject();
    json.add("model", toJson(response.getModel()));
    json.add("items", itemsJson(response.getItemsList()));
    return json;
  }

  private static JsonObject toJson(EmbedTextResponse response) {
    JsonArray values = new JsonArray();
    for (Float value : response.getEmbeddings(0).getValuesList()) {
      values.add(value);
    }
    JsonObject json = new JsonObject();
    json.add("model", toJson(response.getModel()));
    json.add("values", values);
    return json;
  }
}
