//! Notify: speaks to people. To customers, on the channel they used: the first reply to every
//! complaint (an acknowledgement, or an invitation to a private channel when a public post
//! carried personal data), status updates, agents' replies, the closure message with a
//! satisfaction survey, and word of a reopening. To staff: assignment and escalation alerts.
//! Messages come from templates and go through signed channel-gateway webhooks.
//!
//! Sending needs NATS alone: who sends each message, and what each customer has been told,
//! are kept in a JetStream key-value bucket ([`claims`]), so a redelivered event sends
//! nothing twice and replies keep going out while PostgreSQL is away. The delivery log in
//! PostgreSQL is written from notify's own outcome events ([`log`]) and catches up when the
//! database is back.
//!
//! A first-response watchdog keeps the reply promise when classify lags: a complaint not
//! acknowledged within `CLOSEDLOOP_FIRST_RESPONSE_SECS` gets a generic acknowledgement, and
//! since both paths share one delivery id, never a second one.

pub mod api;
pub mod claims;
mod courier;
pub mod gateway;
pub mod guard;
mod handlers;
pub mod log;
pub mod recent;
pub mod store;
pub mod templates;

use std::sync::Arc;
use std::time::Duration;

use closedloop_proto::v1::notification_service_server::NotificationServiceServer;
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::batch::Batcher;
use closedloop_runtime::bus::{self, Bus, StreamSettings};
use closedloop_runtime::config::{ArchiveArgs, DatabaseArgs};
use closedloop_runtime::consumer::{self, ConsumerSpec};
use closedloop_runtime::service::Endpoints;
use closedloop_runtime::{Secret, db, grpc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

use crate::claims::Claims;
use crate::courier::Courier;
use crate::gateway::{GatewayTable, GuardSettings, WebhookClient, parse_rate_limits};
use crate::handlers::{ClassifiedHandler, IncidentHandler, WatchdogHandler, WorkOrderHandler};
use crate::log::{LogHandler, LogWriter};
use crate::templates::Templates;

pub const CLASSIFIED_CONSUMER: &str = "notify-classified";
pub const WORK_ORDER_CONSUMER: &str = "notify-workorders";
pub const WATCHDOG_CONSUMER: &str = "notify-watchdog";
pub const INCIDENT_CONSUMER: &str = "notify-incidents";
pub use crate::log::LOG_CONSUMER;
pub const SCHEMA: &str = "notify";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

closedloop_runtime::service_config! {
    /// Closedloop notify: replies to customers on their own channel
    name = "closedloop-notify", listen = ("CLOSEDLOOP_NOTIFY_LISTEN", "0.0.0.0:50054");
    /// Channel-gateway webhooks: `channel=url|secret` entries separated by `;`, with
    /// `default` for channels not named and `staff` for alerts to staff.
    #[arg(long, env = "CLOSEDLOOP_GATEWAYS", default_value = "")]
    pub gateways: Secret<GatewayTable>,
    /// Seconds to wait for a gateway to answer.
    #[arg(long, env = "CLOSEDLOOP_GATEWAY_TIMEOUT_SECS", default_value_t = 5)]
    pub gateway_timeout_secs: u64,
    /// Consecutive failures after which calls to a gateway pause.
    #[arg(long, env = "CLOSEDLOOP_BREAKER_THRESHOLD", default_value_t = 5)]
    pub breaker_threshold: u32,
    /// Seconds a failing gateway is left alone before one trial call.
    #[arg(long, env = "CLOSEDLOOP_BREAKER_COOLDOWN_SECS", default_value_t = 30)]
    pub breaker_cooldown_secs: u64,
    /// Calls per second by channel, e.g. `wechat=50;weibo_post=10` (per replica).
    #[arg(long, env = "CLOSEDLOOP_CHANNEL_RATE_LIMITS", default_value = "")]
    pub channel_rate_limits: String,
    /// JSON file of templates overriding and extending the built-in ones.
    #[arg(long, env = "CLOSEDLOOP_TEMPLATES")]
    pub templates: Option<String>,
    /// Seconds after receipt when a complaint not yet acknowledged gets a generic
    /// acknowledgement (0 turns the watchdog off).
    #[arg(long, env = "CLOSEDLOOP_FIRST_RESPONSE_SECS", default_value_t = 10)]
    pub first_response_secs: u64,
    /// Milliseconds the delivery log's writer waits after an outcome for others to share its
    /// transaction (0: take only what is already waiting). Sending never waits on the log.
    #[arg(long, env = "CLOSEDLOOP_DELIVERY_LOG_LINGER_MS", default_value_t = 0)]
    pub delivery_log_linger_ms: u64,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub archive: ArchiveArgs,
}

/// First replies [`recent::RecentIds`] holds per generation: more than a first-response
/// deadline's worth at thousands of complaints a second, for about 2 MiB.
const FIRST_REPLIES_REMEMBERED: usize = 65_536;

/// A built notify service: connected to NATS, its bucket open, listener bound. PostgreSQL
/// is not needed to start: the delivery log is prepared, and written, once it answers.
pub struct Notify {
    endpoints: Endpoints,
    bus: Bus,
    claims: Claims,
    pool: PgPool,
    webhooks: WebhookClient,
    templates: Templates,
    config: Config,
}

impl Notify {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        if config.gateways.expose().is_empty() {
            tracing::warn!("no channel gateways configured (CLOSEDLOOP_GATEWAYS); every delivery will fail");
        }
        let templates = Templates::load(config.templates.as_deref())?;
        let settings = GuardSettings {
            timeout: Duration::from_secs(config.gateway_timeout_secs.max(1)),
            breaker_threshold: config.breaker_threshold,
            breaker_cooldown: Duration::from_secs(config.breaker_cooldown_secs),
            rate_limits: parse_rate_limits(&config.channel_rate_limits).map_err(anyhow::Error::msg)?,
        };
        let webhooks = WebhookClient::new(config.gateways.expose().clone(), &settings)?;
        let pool = db::pool(&config.database, SCHEMA)?;
        let bus = Bus::connect(&config.service.nats.connect, "notify", cancel).await?;
        let streams = StreamSettings::from(&config.service.nats);
        bus.provision_streams(&streams, &[bus::NOTIFICATIONS_STREAM, bus::DEAD_LETTER_STREAM])
            .await?;
        // A sender that never records an outcome yet stays alive (hung) keeps a delivery
        // this long: longer than a gateway call can take.
        let lease = Duration::from_secs(config.gateway_timeout_secs.max(1) * 2 + 5);
        let claims = Claims::open(bus.jetstream(), bus.client().clone(), &streams, lease).await?;
        // Every delivery claims its key first: while the bucket has no leader (a cluster
        // electing one), events wait for it rather than spend their retries.
        bus.writes_to(&format!("KV_{}", claims::BUCKET));
        let endpoints = Endpoints::bind(config.listen, &config.service).await?;
        Ok(Self {
            endpoints,
            bus,
            claims,
            pool,
            webhooks,
            templates,
            config,
        })
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let nats = &self.config.service.nats;
        let answering = tokio::spawn(self.claims.clone().answer_while_alive(cancel.clone()));
        let courier = Arc::new(Courier {
            claims: self.claims,
            bus: self.bus.clone(),
            webhooks: self.webhooks,
            templates: self.templates,
            retry_base: nats.retry_base(),
            first_replies: recent::RecentIds::new(FIRST_REPLIES_REMEMBERED),
        });
        let spec = |stream, durable, filter: String| ConsumerSpec::new(stream, durable, vec![filter], nats);
        let mut consumers = vec![
            consumer::spawn(
                &self.bus,
                spec(
                    bus::COMPLAINTS_STREAM,
                    CLASSIFIED_CONSUMER,
                    bus::COMPLAINT_CLASSIFIED.all_tenants(),
                ),
                ClassifiedHandler(courier.clone()),
                &cancel,
            ),
            consumer::spawn(
                &self.bus,
                ConsumerSpec::new(
                    bus::WORK_ORDERS_STREAM,
                    WORK_ORDER_CONSUMER,
                    handlers::told_work_order_subjects(),
                    nats,
                ),
                WorkOrderHandler(courier.clone()),
                &cancel,
            ),
            consumer::spawn(
                &self.bus,
                spec(
                    bus::INCIDENTS_STREAM,
                    INCIDENT_CONSUMER,
                    bus::INCIDENT_OPENED.all_tenants(),
                ),
                IncidentHandler(courier.clone()),
                &cancel,
            ),
        ];
        if self.config.first_response_secs > 0 {
            let deadline = Duration::from_secs(self.config.first_response_secs);
            let mut watchdog = spec(
                bus::COMPLAINTS_STREAM,
                WATCHDOG_CONSUMER,
                bus::COMPLAINT_RECEIVED.all_tenants(),
            );
            // The consumer reads complaints `deadline` behind, so each reaches the watchdog
            // once, when due, rather than at once and again after being put back.
            watchdog.hold = deadline;
            consumers.push(consumer::spawn(
                &self.bus,
                watchdog,
                WatchdogHandler {
                    courier: courier.clone(),
                    deadline,
                },
                &cancel,
            ));
        }
        // The delivery log: prepared once PostgreSQL answers, then written from the outcome
        // events. Replies do not wait for it.
        let linger = Duration::from_millis(self.config.delivery_log_linger_ms);
        let logging = tokio::spawn(write_log(
            self.bus.clone(),
            self.pool.clone(),
            ConsumerSpec::new(
                bus::NOTIFICATIONS_STREAM,
                LOG_CONSUMER,
                vec!["closedloop.notification.>".to_owned()],
                nats,
            ),
            linger,
            self.config.archive.clone(),
            cancel.clone(),
        ));
        let server = NotificationServiceServer::new(api::NotificationApi {
            pool: self.pool.clone(),
        })
        .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(
            server,
            Authenticator::new(self.config.service.grpc.auth_tokens.clone()),
        ));
        let exporting = self.endpoints.metrics.spawn(cancel.clone());
        let served = grpc::serve(self.endpoints.grpc, routes, &[api::SERVICE_NAME], cancel.clone()).await;
        cancel.cancel();
        for consuming in consumers {
            consuming.await?;
        }
        logging.await?;
        answering.await?;
        exporting.await??;
        self.pool.close().await;
        served?;
        Ok(())
    }
}

/// Prepares the delivery log's schema once PostgreSQL answers, then writes outcomes into it,
/// and archives its old entries, until `cancel` fires.
async fn write_log(
    bus: Bus,
    pool: PgPool,
    spec: ConsumerSpec,
    linger: Duration,
    archive: ArchiveArgs,
    cancel: CancellationToken,
) {
    let mut delay = Duration::from_millis(500);
    loop {
        match db::prepare(&pool, SCHEMA, &MIGRATOR, &cancel).await {
            Ok(()) => break,
            Err(error) if cancel.is_cancelled() => {
                tracing::info!(%error, "stopped before the delivery log was prepared");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot prepare the delivery log yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    let archive_pool = pool.clone();
    let archiving = tokio::spawn(closedloop_runtime::archive::run(
        "deliveries",
        archive,
        move |cutoff, limit| store::move_old(archive_pool.clone(), cutoff, limit),
        cancel.clone(),
    ));
    let (batcher, writing) = Batcher::spawn(LogWriter { pool: pool.clone() }, log::MAX_BATCH, linger);
    consumer::run(bus, spec, Arc::new(LogHandler { batcher, pool }), cancel).await;
    // The handler and its batcher handle are gone: the writer finishes what it holds.
    if let Err(error) = writing.await {
        tracing::error!(%error, "the delivery log's writer failed");
    }
    if let Err(error) = archiving.await {
        tracing::error!(%error, "the delivery log's archiver failed");
    }
}

closedloop_runtime::impl_service!(Notify, Config, "notify");
