/**
 * bertrec example client (TypeScript, Node): checks the server's health, asks for one user's
 * recommendations and embeds one text, asks for the same user's and an unknown user's top items
 * in one RecommendBatch call and again over StreamRecommendations (read to the end; the unknown
 * user comes back found=false), then prints a single JSON document on stdout. With
 * --feedback-user-id F it also records that F rated the top recommended item (RecordFeedback, a
 * write, so never done unasked) under the fixed idempotency key "bertrec-example:F:ITEM": running
 * it again stores nothing new, and the answer counts a duplicate.
 *
 *   node dist/example.js --user-id U [--target HOST:PORT] [--text T] [--k K] [--timeout-s S]
 *                        [--feedback-user-id F]
 *                        [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--token-file FILE]]
 *
 * With --tls-ca the channel speaks TLS trusting that CA only; --tls-cert/--tls-key add a client
 * certificate (mTLS); --token-file sends its token as "authorization: Bearer <token>" with every
 * call (call credentials, which grpc-js combines with TLS credentials only).
 *
 * Exit status: 0 on success, 1 when an RPC fails (`error: <RPC> failed: <CODE>: <message>` on
 * stderr), 2 on bad flags. Nothing but the JSON document is written to stdout.
 *
 * The channel retries RecommenderService calls by the service config every bertrec client shares
 * (clients/service_config.json, copied next to the compiled example by build.sh; see
 * clients/README.md).
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";

import {
  type CallOptions,
  type ChannelCredentials,
  type ClientUnaryCall,
  credentials,
  Metadata,
  type ServiceError,
  status,
} from "@grpc/grpc-js";

import {
  EmbedTextRequest,
  FeedbackKind,
  type ModelRef,
  RecommendRequest,
  RecommenderServiceClient,
  RecordFeedbackRequest,
  type RecommendResponse,
  RecommendBatchRequest,
  type RankedItem,
  StreamRecommendationsRequest,
  type UserRecommendations,
} from "./gen/bertrec/v1/recommender.js";
import {
  HealthCheckRequest,
  healthCheckResponse_ServingStatusToJSON,
  HealthClient,
} from "./gen/grpc/health/v1/health.js";

const DEFAULT_TARGET = "127.0.0.1:50051";
const DEFAULT_TEXT = "a heartfelt drama about a family reunited after many years";
const DEFAULT_K = 10;
const DEFAULT_TIMEOUT_S = 10;
const MAX_INT32 = 2 ** 31 - 1;
// The rating --feedback-user-id records; any value in the model's rating range works.
const EXAMPLE_RATING = 4.0;
// An id no model knows: the bulk calls answer it with found=false instead of failing the call.
const UNKNOWN_USER_ID = "bertrec-example-unknown-user";
// The k of the bulk calls: small, as a bulk job's per-user lists are.
const BULK_K = 3;

const USAGE = `usage: example --user-id U [--target HOST:PORT] [--text T] [--k K] [--timeout-s S]
               [--feedback-user-id F]

  --target HOST:PORT  server address (default ${DEFAULT_TARGET})
  --user-id U         user to recommend for (required)
  --text T            text to embed (default: a sample sentence)
  --k K               number of recommendations (default ${DEFAULT_K})
  --timeout-s S       deadline of each RPC in seconds (default ${DEFAULT_TIMEOUT_S})
  --feedback-user-id F  if set, record that F rated the top item (a write)
  --tls-ca FILE       CA certificate (PEM) to trust; turns TLS on
  --tls-cert FILE, --tls-key FILE  client certificate and key (PEM) for mTLS
  --token-file FILE   file holding the bearer token (needs --tls-ca)`;

interface Options {
  target: string;
  userId: string;
  text: string;
  k: number;
  timeoutS: number;
  /** Empty: no RecordFeedback. */
  feedbackUserId: string;
  /** TLS and auth: file paths, read when the channel is set up. Empty: not used. */
  tlsCa: string;
  tlsCert: string;
  tlsKey: string;
  tokenFile: string;
}

/** Bad command-line flags: reported with the usage text, exit status 2. */
class UsageError extends Error {}

/** A failed RPC, named by its full gRPC method name. */
class RpcError extends Error {
  constructor(
    readonly rpc: string,
    readonly code: status,
    readonly details: string,
  ) {
    // status[code] is the canonical name (e.g. "NOT_FOUND"); keep the number if it is unknown.
    super(`${rpc} failed: ${status[code] ?? String(code)}: ${details}`);
  }
}

function parseOptions(argv: readonly string[]): Options | "help" {
  let values;
  try {
    ({ values } = parseArgs({
      args: [...argv],
      strict: true,
      allowPositionals: false,
      options: {
        target: { type: "string", default: DEFAULT_TARGET },
        "user-id": { type: "string" },
        text: { type: "string", default: DEFAULT_TEXT },
        k: { type: "string", default: String(DEFAULT_K) },
        "timeout-s": { type: "string", default: String(DEFAULT_TIMEOUT_S) },
        "feedback-user-id": { type: "string", default: "" },
        "tls-ca": { type: "string", default: "" },
        "tls-cert": { type: "string", default: "" },
        "tls-key": { type: "string", default: "" },
        "token-file": { type: "string", default: "" },
        help: { type: "boolean", short: "h", default: false },
      },
    }));
  } catch (error) {
    // parseArgs throws TypeErrors (unknown flag, missing value): a usage problem, not a bug.
    throw new UsageError(error instanceof Error ? error.message : String(error));
  }
  if (values.help) {
    return "help";
  }
  const userId = values["user-id"];
  if (userId === undefined || userId === "") {
    throw new UsageError("--user-id is required");
  }
  // k is an int32 on the wire; the server checks it against its own max_k.
  const k = Number(values.k);
  if (!/^\d+$/.test(values.k) || k < 1 || k > MAX_INT32) {
    throw new UsageError(`--k must be a positive integer, got ${JSON.stringify(values.k)}`);
  }
  const timeoutS = Number(values["timeout-s"]);
  if (values["timeout-s"].trim() === "" || !Number.isFinite(timeoutS) || timeoutS <= 0) {
    throw new UsageError(`--timeout-s must be a positive number, got ${JSON.stringify(values["timeout-s"])}`);
  }
  const [tlsCa, tlsCert, tlsKey, tokenFile] = [
    values["tls-ca"], values["tls-cert"], values["tls-key"], values["token-file"],
  ];
  if ((tlsCert === "") !== (tlsKey === "")) {
    throw new UsageError("--tls-cert and --tls-key go together");
  }
  if (tlsCa === "" && (tlsCert !== "" || tokenFile !== "")) {
    throw new UsageError(
      "--tls-cert and --token-file need --tls-ca: a token or a client certificate goes over TLS only",
    );
  }
  return {
    target: values.target,
    userId,
    text: values.text,
    k,
    timeoutS,
    feedbackUserId: values["feedback-user-id"],
    tlsCa,
    tlsCert,
    tlsKey,
    tokenFile,
  };
}

/** A file's bytes; a problem is a UsageError naming the flag and the path (never the content). */
function readFlagFile(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (error) {
    const why = error instanceof Error ? error.message : String(error);
    throw new UsageError(`${flag} ${path}: ${why}`);
  }
}

/**
 * Plaintext, or TLS trusting --tls-ca, with a client certificate and the token when given. The
 * token travels in call credentials, which grpc-js sends only on a TLS channel.
 */
function channelCredentials(options: Options): ChannelCredentials {
  if (options.tlsCa === "") {
    return credentials.createInsecure();
  }
  const ca = readFlagFile("--tls-ca", options.tlsCa);
  const [key, cert] =
    options.tlsCert === ""
      ? [null, null]
      : [readFlagFile("--tls-key", options.tlsKey), readFlagFile("--tls-cert", options.tlsCert)];
  const tls = credentials.createSsl(ca, key, cert);
  if (options.tokenFile === "") {
    return tls;
  }
  const token = readFlagFile("--token-file", options.tokenFile).toString("ascii").trim();
  if (token === "" || /[\r\n]/.test(token)) {
    throw new UsageError(`--token-file ${options.tokenFile}: want one non-empty line`);
  }
  const bearer = credentials.createFromMetadataGenerator((_params, callback) => {
    const metadata = new Metadata();
    metadata.set("authorization", `Bearer ${token}`);
    callback(null, metadata);
  });
  return credentials.combineChannelCredentials(tls, bearer);
}

/** The last (fullest) overload of a generated unary client method. */
type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** Calls a unary RPC with a deadline and turns its callback into a promise. */
function callUnary<Req, Res>(
  rpc: string,
  method: UnaryMethod<Req, Res>,
  request: Req,
  timeoutS: number,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    // A deadline rather than a timeout: it bounds connecting and queueing too, and grpc-js
    // propagates it to the server, which drops work whose caller has already given up.
    const deadline = new Date(Date.now() + timeoutS * 1000);
    method(request, new Metadata(), { deadline }, (error, response) => {
      if (error) {
        reject(new RpcError(rpc, error.code, error.details));
      } else {
        resolve(response);
      }
    });
  });
}

interface ModelJson {
  name: string;
  version: number;
}

/** An unset message field decodes as undefined; proto3 reads it as the default (empty) value. */
function modelJson(model: ModelRef | undefined): ModelJson {
  return { name: model?.name ?? "", version: model?.version ?? 0 };
}

function itemsJson(items: readonly RankedItem[]): unknown[] {
  return items.map((item) => ({
    item_id: item.itemId,
    score: item.score,
    predicted_rating: item.predictedRating,
    rank: item.rank,
  }));
}

function usersJson(results: readonly UserRecommendations[]): unknown[] {
  return results.map((r) => ({ user_id: r.userId, found: r.found, items: itemsJson(r.items) }));
}

/** Reads a StreamRecommendations call to its end; the deadline bounds the whole stream. */
async function streamRecommendations(
  recommender: RecommenderServiceClient,
  userIds: string[],
  timeoutS: number,
): Promise<unknown> {
  const rpc = "bertrec.v1.RecommenderService/StreamRecommendations";
  const deadline = new Date(Date.now() + timeoutS * 1000);
  const request = StreamRecommendationsRequest.fromPartial({ userIds, k: BULK_K });
  const call = recommender.streamRecommendations(request, new Metadata(), { deadline });
  let model: ModelRef | undefined;
  const results: UserRecommendations[] = [];
  try {
    for await (const message of call) {
      const chunk = message as { model?: ModelRef; results: UserRecommendations[] };
      model = chunk.model; // the same in every message of a stream
      results.push(...chunk.results);
    }
  } catch (error) {
    const failure = error as ServiceError;
    throw new RpcError(rpc, failure.code, failure.details);
  }
  return { model: modelJson(model), results: usersJson(results) };
}

/** One rating of the top recommended item by --feedback-user-id, and the store's answer. */
async function recordFeedback(
  recommender: RecommenderServiceClient,
  options: Options,
  recommendation: RecommendResponse,
): Promise<unknown> {
  const rpc = "bertrec.v1.RecommenderService/RecordFeedback";
  const itemId = recommendation.items[0]?.itemId;
  if (itemId === undefined) {
    throw new Error(`${rpc} failed: no recommended item to rate`);
  }
  const event = {
    userId: options.feedbackUserId,
    itemId,
    kind: FeedbackKind.FEEDBACK_KIND_RATING,
    rating: EXAMPLE_RATING,
    occurredAt: new Date(), // sent as a google.protobuf.Timestamp
    idempotencyKey: `bertrec-example:${options.feedbackUserId}:${itemId}`,
  };
  // Retried on UNAVAILABLE by the service config: the fixed key makes a second attempt of an
  // event the server did store a duplicate, never a second copy.
  const answer = await callUnary(
    rpc,
    recommender.recordFeedback.bind(recommender),
    RecordFeedbackRequest.fromPartial({ events: [event] }),
    options.timeoutS,
  );
  return {
    user_id: event.userId,
    item_id: event.itemId,
    rating: event.rating,
    idempotency_key: event.idempotencyKey,
    accepted: answer.accepted,
    duplicates: answer.duplicates,
  };
}

/** clients/service_config.json, which build.sh copies next to this file (dist/). */
function serviceConfig(): string {
  return readFileSync(join(__dirname, "service_config.json"), "utf8");
}

async function run(options: Options, channelCreds: ChannelCredentials): Promise<unknown> {
  // The default service config applies unless the name resolver supplies one (DNS TXT records,
  // off by default); grpc-js checks it here and throws if it is invalid.
  const recommender = new RecommenderServiceClient(options.target, channelCreds, {
    "grpc.service_config": serviceConfig(),
    "grpc.enable_retries": 1,
  });
  // The health client borrows the recommender's channel: one connection serves every call.
  const health = new HealthClient(options.target, channelCreds, {
    channelOverride: recommender.getChannel(),
  });
  try {
    const healthResponse = await callUnary(
      "grpc.health.v1.Health/Check",
      health.check.bind(health),
      HealthCheckRequest.fromPartial({ service: "" }),
      options.timeoutS,
    );

    // exclude_rated stays unset, so the server applies its default (true).
    const recommendation = await callUnary(
      "bertrec.v1.RecommenderService/Recommend",
      recommender.recommend.bind(recommender),
      RecommendRequest.fromPartial({ userId: options.userId, k: options.k }),
      options.timeoutS,
    );

    const embedRpc = "bertrec.v1.RecommenderService/EmbedText";
    const embedding = await callUnary(
      embedRpc,
      recommender.embedText.bind(recommender),
      EmbedTextRequest.fromPartial({ texts: [options.text] }),
      options.timeoutS,
    );
    const vector = embedding.embeddings[0];
    if (embedding.embeddings.length !== 1 || vector === undefined) {
      throw new Error(`${embedRpc} returned ${embedding.embeddings.length} vectors for 1 text`);
    }

    const userIds = [options.userId, UNKNOWN_USER_ID];
    const batch = await callUnary(
      "bertrec.v1.RecommenderService/RecommendBatch",
      recommender.recommendBatch.bind(recommender),
      RecommendBatchRequest.fromPartial({ userIds, k: BULK_K }),
      options.timeoutS,
    );
    const stream = await streamRecommendations(recommender, userIds, options.timeoutS);

    const feedback =
      options.feedbackUserId === ""
        ? undefined // left out of the document
        : await recordFeedback(recommender, options, recommendation);

    // float32 fields arrive as JS numbers holding the exact float32 value; JSON.stringify
    // prints the shortest decimal that reads back to that value.
    return {
      health: healthCheckResponse_ServingStatusToJSON(healthResponse.status),
      recommend: {
        model: modelJson(recommendation.model),
        items: itemsJson(recommendation.items),
      },
      embed: { model: modelJson(embedding.model), values: vector.values },
      batch: { model: modelJson(batch.model), results: usersJson(batch.results) },
      stream,
      feedback,
    };
  } finally {
    // Closes the shared channel, so the process can exit once the event loop drains.
    recommender.close();
  }
}

async function main(argv: readonly string[]): Promise<number> {
  let options: Options | "help";
  let channelCreds: ChannelCredentials;
  try {
    options = parseOptions(argv);
    if (options === "help") {
      process.stdout.write(`${USAGE}\n`);
      return 0;
    }
    channelCreds = channelCredentials(options);
  } catch (error) {
    if (error instanceof UsageError) {
      process.stderr.write(`error: ${error.message}\n${USAGE}\n`);
      return 2;
    }
    throw error;
  }
  const document = await run(options, channelCreds);
  process.stdout.write(`${JSON.stringify(document)}\n`);
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    // One line, no stack trace: RPC failures carry their method, status code and message.
    process.stderr.write(`error: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 1;
  },
);
