//! Configuration shared by the services, read from flags and environment variables
//! (12-factor). Each service flattens these groups into its own `Config`.
//!
//! Secrets live in [`Secret`], whose `Debug` never prints the value, so a config can be
//! logged whole at start.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::auth::TokenTable;

/// Declares a service's `Config`: the struct's doc comment is its `--help` summary, then
/// its command name, the gRPC listen address's variable and default, and the service's
/// own settings. The settings every service shares follow under `service`.
#[macro_export]
macro_rules! service_config {
    (
        $(#[$meta:meta])*
        name = $name:literal, listen = ($env:literal, $default:literal);
        $($(#[$field_meta:meta])* pub $field:ident: $ty:ty,)*
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, clap::Parser)]
        #[command(name = $name)]
        pub struct Config {
            /// gRPC listen address.
            #[arg(long, env = $env, default_value = $default)]
            pub listen: ::std::net::SocketAddr,
            $($(#[$field_meta])* pub $field: $ty,)*
            #[command(flatten)]
            pub service: $crate::config::ServiceArgs,
        }
    };
}

/// A value that must never reach a log: `Debug` prints `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }
    /// The secret itself; call only where it is used, never to log.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: FromStr> FromStr for Secret<T> {
    type Err = T::Err;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Secret)
    }
}

/// How long finished records stay in the hot tables the loop writes and the API lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Everything stays hot.
    Forever,
    /// Finished records older than this move to the archive tables.
    After(chrono::Duration),
}

impl FromStr for Retention {
    type Err = crate::time::BadDuration;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().eq_ignore_ascii_case("off") {
            Ok(Retention::Forever)
        } else {
            crate::time::parse_duration(text).map(Retention::After)
        }
    }
}

/// Moving finished records to the archive tables (see `runtime::archive`).
#[derive(Debug, Clone, clap::Args)]
pub struct ArchiveArgs {
    /// Age at which finished records (closed work orders with their history and links,
    /// delivery log entries) move from the hot tables to the archive tables, which the API
    /// still reads: e.g. 90d; `off` keeps everything hot.
    #[arg(long, env = "CLOSEDLOOP_ARCHIVE_AFTER", default_value = "90d")]
    pub archive_after: Retention,
    /// How often to look for records to archive, e.g. 10m.
    #[arg(long, env = "CLOSEDLOOP_ARCHIVE_INTERVAL", default_value = "10m", value_parser = parse_std_duration)]
    pub archive_interval: Duration,
}

fn parse_std_duration(text: &str) -> Result<Duration, crate::time::BadDuration> {
    let parsed = crate::time::parse_duration(text)?;
    parsed
        .to_std()
        .map_err(|_| crate::time::BadDuration(text.to_owned()))
}

/// What every service takes: NATS, its gRPC front, telemetry, its runtime.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Where Prometheus scrapes `/metrics`.
    #[arg(long, env = "CLOSEDLOOP_METRICS_LISTEN", default_value = "0.0.0.0:9464")]
    pub metrics_listen: std::net::SocketAddr,
    /// Threads that run the service's tasks; 0 means one per core. Where the services,
    /// NATS and PostgreSQL share a few cores (docker-compose.yml), 1 each wastes less on
    /// threads waking and stealing work from each other: see BENCHMARKS.md.
    #[arg(long, env = "CLOSEDLOOP_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub grpc: GrpcArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

impl ServiceArgs {
    /// The tokio runtime these settings ask for, for a service's `main` to run on.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if self.worker_threads > 0 {
            builder.worker_threads(self.worker_threads);
        }
        builder.enable_all().build()
    }
}

/// How to reach NATS: where, as whom, over what.
#[derive(Clone, clap::Args)]
pub struct NatsConnectArgs {
    /// NATS server URL(s), comma-separated. Credentials belong in the options below: a
    /// password in the URL is masked when the configuration is logged, but is better kept
    /// out of it.
    #[arg(long, env = "CLOSEDLOOP_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// User name, with `--nats-password`.
    #[arg(long, env = "CLOSEDLOOP_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "CLOSEDLOOP_NATS_PASSWORD")]
    pub nats_password: Option<Secret<String>>,
    /// A NATS credentials file (user JWT and nkey seed), instead of user and password.
    #[arg(long, env = "CLOSEDLOOP_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,
    /// PEM file of the certificate authorities to trust for TLS to NATS.
    #[arg(long, env = "CLOSEDLOOP_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate for TLS to NATS, with `--nats-tls-key`.
    #[arg(long, env = "CLOSEDLOOP_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "CLOSEDLOOP_NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,
    /// Refuse to talk to NATS without TLS.
    #[arg(long, env = "CLOSEDLOOP_NATS_TLS_REQUIRED", default_value_t = false)]
    pub nats_tls_required: bool,
    /// Seconds between pings to the NATS server. A server that stops answering (a node cut
    /// off from the network, whose connection never closes) is left for another of the
    /// `--nats-url` list after three unanswered pings.
    #[arg(long, env = "CLOSEDLOOP_NATS_PING_SECS", default_value_t = 1)]
    pub nats_ping_secs: u64,
}

impl NatsConnectArgs {
    /// Only a URL (which may carry credentials, as tests and tools use it).
    pub fn url(url: impl Into<String>) -> Self {
        Self {
            nats_url: url.into(),
            nats_user: None,
            nats_password: None,
            nats_creds: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
            nats_ping_secs: 1,
        }
    }
}

/// The user and password a URL carries (`nats://user:password@host:4222`), if any: the NATS
/// client takes credentials only from its options, so they are read out of the URL here.
pub fn url_credentials(url: &str) -> Option<(String, String)> {
    let first = url.split(',').next()?;
    let (scheme, at) = (first.find("://")?, first.rfind('@')?);
    let (user, password) = first.get(scheme + 3..at)?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `urls` (comma-separated) with any password in them masked, fit to log.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &url[scheme + 3..at];
                let user = userinfo.split_once(':').map_or("", |(user, _)| user);
                format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Debug for NatsConnectArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConnectArgs")
            .field("nats_url", &redact_urls(&self.nats_url))
            .field("nats_user", &self.nats_user)
            .field("nats_password", &self.nats_password)
            .field("nats_creds", &self.nats_creds)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .field("nats_tls_required", &self.nats_tls_required)
            .finish()
    }
}

/// Where NATS is and how the streams are provisioned.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    #[command(flatten)]
    pub connect: NatsConnectArgs,
    /// How long streams keep events (hours).
    #[arg(long, env = "CLOSEDLOOP_STREAM_MAX_AGE_HOURS", default_value_t = 168)]
    pub stream_max_age_hours: u64,
    /// Bytes each stream may hold (-1: no limit). A full stream refuses new events, and
    /// ingest answers RESOURCE_EXHAUSTED, instead of dropping events not yet handled.
    #[arg(long, env = "CLOSEDLOOP_STREAM_MAX_BYTES", default_value_t = -1, allow_hyphen_values = true)]
    pub stream_max_bytes: i64,
    /// Window in which JetStream drops a re-published event with the same Nats-Msg-Id
    /// (seconds). Beyond it, idempotency is the database's job.
    #[arg(long, env = "CLOSEDLOOP_DUPLICATE_WINDOW_SECS", default_value_t = 600)]
    pub duplicate_window_secs: u64,
    /// Stream replicas: 1 for a single server, 3 for a cluster that survives a node loss.
    #[arg(long, env = "CLOSEDLOOP_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
    /// Deliveries an event may fail on while its dependencies answer before it is parked in
    /// the dead-letter stream. Waiting on a dependency that is down spends none of them.
    #[arg(long, env = "CLOSEDLOOP_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,
    /// Events one replica handles at once.
    #[arg(long, env = "CLOSEDLOOP_CONSUMER_CONCURRENCY", default_value_t = 64)]
    pub consumer_concurrency: usize,
    /// Seconds JetStream waits for an ack before redelivering: how soon a crashed
    /// replica's events come back. Events in hand are reported in progress every third of
    /// it, however long their handling takes.
    #[arg(long, env = "CLOSEDLOOP_ACK_WAIT_SECS", default_value_t = 5)]
    pub ack_wait_secs: u64,
    /// First redelivery delay after a failure the event may be at fault for (milliseconds);
    /// doubles per delivery.
    #[arg(long, env = "CLOSEDLOOP_RETRY_BASE_MS", default_value_t = 500)]
    pub retry_base_ms: u64,
}

impl NatsArgs {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_secs)
    }
    pub fn retry_base(&self) -> Duration {
        Duration::from_millis(self.retry_base_ms)
    }
}

/// The gRPC front of a service (the listen address is per service, in its own config).
#[derive(Debug, Clone, clap::Args)]
pub struct GrpcArgs {
    /// Bearer tokens accepted, as `tenant:role[,role]:sha256-of-token[:name]` entries separated
    /// by `;` or newlines. Only hashes are configured; see the README for making one.
    #[arg(long, env = "CLOSEDLOOP_AUTH_TOKENS", default_value = "")]
    pub auth_tokens: TokenTable,
    /// Largest request accepted, in bytes; larger ones are refused before decoding.
    #[arg(long, env = "CLOSEDLOOP_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Seconds to finish in-flight work after SIGTERM before giving up.
    #[arg(long, env = "CLOSEDLOOP_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
}

/// PostgreSQL, for the services that keep records.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:password@host:5432/closedloop.
    #[arg(long, env = "CLOSEDLOOP_DATABASE_URL")]
    pub database_url: Secret<String>,
    /// Connections in the pool.
    #[arg(long, env = "CLOSEDLOOP_DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
}

/// Logs and traces.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// `json` for machines, `pretty` for a terminal.
    #[arg(long, env = "CLOSEDLOOP_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
    /// Log filter in `RUST_LOG` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint; traces are exported only when set.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Service {
        #[command(flatten)]
        service: ServiceArgs,
    }

    mod declared {
        crate::service_config! {
            /// A service declared as the services declare theirs.
            name = "closedloop-example", listen = ("CLOSEDLOOP_EXAMPLE_LISTEN", "0.0.0.0:50099");
            /// A setting of its own.
            #[arg(long, default_value_t = 3)]
            pub retries: u32,
        }
    }

    #[test]
    fn a_declared_config_has_its_listen_default_its_own_settings_and_the_shared_ones() {
        let config =
            declared::Config::try_parse_from(["closedloop-example", "--retries", "4"]).expect("parses");
        assert_eq!(config.listen, "0.0.0.0:50099".parse().expect("address"));
        assert_eq!(config.retries, 4);
        assert_eq!(config.service.worker_threads, 0);
        let help = declared::Config::command().render_help().to_string();
        assert!(
            help.starts_with("A service declared as the services declare theirs"),
            "{help}"
        );
        assert!(help.contains("CLOSEDLOOP_EXAMPLE_LISTEN"), "{help}");
    }

    fn workers(args: &[&str]) -> usize {
        let parsed = Service::try_parse_from(std::iter::once("service").chain(args.iter().copied()))
            .expect("valid flags");
        let runtime = parsed.service.runtime().expect("a runtime");
        runtime.metrics().num_workers()
    }

    #[test]
    fn passwords_in_urls_are_masked_for_the_log() {
        assert_eq!(
            redact_urls("nats://ingest:s3cret@nats:4222,nats://nats2:4222"),
            "nats://ingest:[redacted]@nats:4222,nats://nats2:4222"
        );
        assert_eq!(
            redact_urls("nats://token@nats:4222"),
            "nats://:[redacted]@nats:4222"
        );
        assert_eq!(
            url_credentials("nats://admin:pw@h:4222,nats://h2:4222"),
            Some(("admin".to_owned(), "pw".to_owned()))
        );
        assert_eq!(url_credentials("nats://h:4222"), None);
        let args = NatsConnectArgs {
            nats_password: Some(Secret::new("hunter2".into())),
            ..NatsConnectArgs::url("nats://u:pw@h:4222")
        };
        let logged = format!("{args:?}");
        assert!(
            !logged.contains("hunter2") && !logged.contains(":pw@"),
            "{logged}"
        );
    }

    #[derive(Parser)]
    struct Archiving {
        #[command(flatten)]
        archive: ArchiveArgs,
    }

    fn archiving(args: &[&str]) -> Result<ArchiveArgs, clap::Error> {
        Archiving::try_parse_from(std::iter::once("service").chain(args.iter().copied()))
            .map(|parsed| parsed.archive)
    }

    #[test]
    fn archiving_defaults_to_ninety_days_and_can_be_turned_off() {
        let defaults = archiving(&[]).expect("defaults parse");
        assert!(matches!(defaults.archive_after, Retention::After(age) if age == chrono::Duration::days(90)));
        assert_eq!(defaults.archive_interval, Duration::from_secs(600));
        let off = archiving(&["--archive-after", "OFF"]).expect("off parses");
        assert!(matches!(off.archive_after, Retention::Forever));
        for bad in ["0d", "-3d", "forever", "90"] {
            assert!(archiving(&["--archive-after", bad]).is_err(), "{bad}");
        }
        assert!(archiving(&["--archive-interval", "off"]).is_err());
    }

    #[test]
    fn worker_threads_sets_the_runtime_size() {
        assert_eq!(workers(&["--worker-threads", "1"]), 1);
        assert_eq!(workers(&["--worker-threads", "3"]), 3);
    }

    #[test]
    fn zero_worker_threads_leaves_tokio_its_default() {
        let default = tokio::runtime::Builder::new_multi_thread()
            .build()
            .expect("a runtime")
            .metrics()
            .num_workers();
        assert_eq!(workers(&["--worker-threads", "0"]), default);
    }
}
