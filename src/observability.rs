//! What the layers report, in one place.
//!
//! # Tracing
//!
//! Every layer emits [`tracing`](https://docs.rs/tracing) events under its module path (filter
//! with e.g. `RUST_LOG=tower_redis_cluster=info`). Fields carry command *names*, error kinds,
//! generations and node addresses — never keys, arguments, passwords or tokens.
//!
//! | target | level | event | fields |
//! |---|---|---|---|
//! | `retry` | DEBUG span `redis` | one per call through the retry layer, and per `Client` call with retries off too, with OpenTelemetry's database client fields | `otel.name` and `db.operation.name` (the command's name, `PIPELINE` or `MULTI`), `otel.kind = client`, `db.system.name = redis`, `db.operation.batch.size` (pipelines), `server.address`/`server.port` (when the node is known: a blocking command's own connection), `error.type` (the [`ErrorKind`](crate::ErrorKind)) and `otel.status_code = ERROR` on failure, `attempts`, `redirects`, `generation` (of the inner client that served or failed it) |
//! | `retry` | DEBUG | `retrying` | `kind`, `sent`, `idempotency`, `generation`, `attempt`, `redirects`, `follow`, `delay_ms` |
//! | `retry` | DEBUG | no retry: the deadline would pass | `kind`, `attempt`, `delay`, `remaining` |
//! | `retry` | WARN (at most once a second) / DEBUG | retry budget exhausted | `kind`, `attempt` |
//! | `rebuild` | INFO | rebuilding the inner client | `from_generation`, `reason`, `action` |
//! | `rebuild` | WARN | connecting a new inner client failed | `error`, `attempt`, `retry_in_ms` |
//! | `rebuild` | INFO | inner client rebuilt | `generation`, `attempts`, `elapsed_ms` |
//! | `rebuild` | DEBUG | rebuild policy asked for a new client | `error`, `generation`, `action` |
//! | `topology` | INFO | cluster topology changed | `change` (master changed, node added/removed, slots moved) |
//! | `topology` | INFO | none of the nodes the inner client was made with remain; rebuilding | `generation` |
//! | `topology` | WARN | topology refresh failed | `error` |
//! | `topology` | DEBUG | publishing topology snapshot | `sequence`, `shards`, `agreed_by`, `answered` |
//! | `connect` | DEBUG | resolved seed name | `host`, `port`, `addrs` |
//! | `read` | WARN | shard down: its calls fail fast until a probe succeeds | `slot`, `why` |
//! | `read` | INFO | shard serves again: fail-fast ended | `slot`, `down_ms` |
//! | `read` | DEBUG | read served off the inner client's route (a replica; the master last) | `node`, `reason` (`primary failed` / `primary slow` / `primary known down` / `shard failing fast` / `replica preferred`) |
//! | `read` | DEBUG | replica read failed / no replica served the read either | `node`, `error` |
//! | `pubsub` | WARN | subscriptions lost; re-establishing them | `kind`, `subscriptions` (a count; channel names are not logged), `cause` |
//! | `pubsub` | INFO | subscriptions re-established | `kind`, `subscriptions`, `node`, `gap_ms` |
//! | `pubsub` | WARN | subscriber buffer full: dropping messages until the consumer catches up | `capacity` |
//! | `pubsub` | DEBUG | subscription connection open / failed / lost, subscribe refused, topology read failed | `node`, `error` |
//!
//! The span follows OpenTelemetry's database conventions, so `tracing-opentelemetry` exports it
//! as a client span named for the command; it is at DEBUG, so enable
//! `tower_redis_cluster=debug` for the layer that exports it (a per-layer filter keeps the
//! rest of the output at its own level).
//!
//! The `redis` crate logs through the `log` facade; its messages appear next to ours when a
//! `tracing-log` bridge (as `tracing-subscriber`'s default) is installed.
//!
//! # Metrics
//!
//! With the `metrics` feature, counters and gauges go through the
//! [`metrics`](https://docs.rs/metrics) facade to whatever recorder the application installs
//! (Prometheus exporter, StatsD, ...). The names and labels are listed in [`crate::metrics`].
//!
//! # Watching the cluster
//!
//! [`TopologyHandle::subscribe`](crate::topology::TopologyHandle::subscribe) yields every new
//! [`TopologySnapshot`](crate::topology::TopologySnapshot);
//! [`RebuildHandle::subscribe`](crate::rebuild::RebuildHandle::subscribe) every
//! [`RebuildStatus`](crate::rebuild::RebuildStatus) — handy to log a failover or expose the
//! current generation.
//!
//! # Secrets
//!
//! Passwords live in [`Secret`](crate::connect::Secret), whose `Debug` prints `<redacted>`;
//! `Credentials`, `ClusterConnector`, `ClientBuilder` and `Client` print through it, URL seeds
//! are shown with `user:password@` replaced, and TLS keys are never printed. A test captures
//! all tracing output at TRACE level plus every `Debug` and error text of a session with an
//! ACL user and asserts the password appears nowhere.
