//! Dispatch: the system of record for work orders. Consumes `complaint.classified`, creates
//! exactly one work order per complaint (redelivery finds the existing one), routes it to a
//! team, sets its due times, and serves the `WorkOrderService` API. Every change is a
//! versioned `workorder.*` event, committed in the history row of the change and published
//! from there by the relay.

pub mod api;
pub mod archive;
pub mod assignment;
pub mod census;
pub mod directory;
pub mod feedback;
pub mod lifecycle;
pub mod placement;
pub mod relay;
pub mod routing;
pub mod settings;
pub mod store;
pub mod watch;
pub mod watcher;
pub mod work_order;

use std::path::PathBuf;
use std::sync::Arc;

use async_nats::jetstream;
use chrono::Utc;
use closedloop_proto::v1::FeedbackReceived;
use closedloop_proto::v1::directory_service_server::DirectoryServiceServer;
use closedloop_proto::v1::work_order_service_server::WorkOrderServiceServer;
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::bus::{self, Bus, StreamSettings};
use closedloop_runtime::config::{ArchiveArgs, DatabaseArgs};
use closedloop_runtime::consumer::{self, ConsumerSpec, HandleError, MessageHandler};
use closedloop_runtime::service::Endpoints;
use closedloop_runtime::{db, grpc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

use crate::assignment::SpikeRule;
use crate::placement::{Batcher, Draft, Placement, Placer};
use crate::routing::{RouteFacts, Router, SlaPolicy};
use crate::settings::{SettingsError, SettingsFile, TenantDirectory};
use crate::store::Db;

/// Durable consumer of classified complaints, shared by all dispatch replicas.
pub const CLASSIFIED_CONSUMER: &str = "dispatch-classified";
/// Durable consumer of customer feedback.
pub const FEEDBACK_CONSUMER: &str = "dispatch-feedback";
/// Database schema dispatch owns.
pub const SCHEMA: &str = "dispatch";
/// Events a tenant's watch feed keeps for its streams: a stream that falls this far behind
/// the feed is closed as a slow reader is. Streams only move events into their own buffers
/// (`CLOSEDLOOP_WATCH_BUFFER`), so this covers a busy core, not a slow desk; the feed
/// holds the last this many events in memory per watched tenant.
const WATCH_FEED_CAPACITY: usize = 1024;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

closedloop_runtime::service_config! {
    /// Closedloop dispatch: work orders, routing, assignment, deadlines and incidents
    name = "closedloop-dispatch", listen = ("CLOSEDLOOP_DISPATCH_LISTEN", "0.0.0.0:50053");
    /// Policy file (JSON): routing rules, SLA targets and business hours, incident detection,
    /// feedback and the directory seed. Built-in defaults when unset (see
    /// services/dispatch/default_dispatch.json).
    #[arg(long, env = "CLOSEDLOOP_DISPATCH_POLICY")]
    pub policy: Option<PathBuf>,
    /// Milliseconds placement waits after a classified complaint for others to share its
    /// transaction (0: take only what is already waiting). It delays assignment by about
    /// as much, not the customer's acknowledgement, and saves dispatch about a sixth of its
    /// CPU at 1,000/s (and PostgreSQL some), since each transaction's statements are
    /// planned once for more complaints (BENCHMARKS.md).
    #[arg(long, env = "CLOSEDLOOP_PLACEMENT_LINGER_MS", default_value_t = 5)]
    pub placement_linger_ms: u64,
    /// WatchWorkOrders streams one caller (a token's name) may hold open.
    #[arg(long, env = "CLOSEDLOOP_WATCH_MAX_PER_CALLER", default_value_t = 8)]
    pub watch_max_per_caller: usize,
    /// WatchWorkOrders streams one tenant may hold open (per replica).
    #[arg(long, env = "CLOSEDLOOP_WATCH_MAX_PER_TENANT", default_value_t = 256)]
    pub watch_max_per_tenant: usize,
    /// Events a watch stream holds for a slow reader; one that falls further behind is
    /// closed with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CLOSEDLOOP_WATCH_BUFFER", default_value_t = 256)]
    pub watch_buffer: usize,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub archive: ArchiveArgs,
}

/// The validated policy file.
#[derive(Debug, Clone)]
pub struct Policy {
    pub router: Router,
    pub sla: SlaPolicy,
    pub spikes: SpikeRule,
    pub incident_window: chrono::Duration,
    pub close_unanswered_after: chrono::Duration,
    pub directory: Vec<TenantDirectory>,
}

impl Policy {
    pub fn from_file(file: &SettingsFile) -> Result<Self, SettingsError> {
        let incidents = &file.incidents;
        if incidents.min_count < 1
            || incidents.factor.is_nan()
            || incidents.factor < 1.0
            || incidents.baseline_windows == 0
        {
            return Err(SettingsError::Invalid(
                "incidents need min_count >= 1, factor >= 1 and baseline_windows >= 1".into(),
            ));
        }
        Ok(Self {
            router: Router::from_file(&file.routing)?,
            sla: SlaPolicy::from_file(&file.sla)?,
            spikes: SpikeRule {
                min_count: incidents.min_count,
                factor: incidents.factor,
                baseline_windows: incidents.baseline_windows,
            },
            incident_window: settings::parse_duration(&incidents.window)?,
            close_unanswered_after: settings::parse_duration(&file.feedback.close_unanswered_after)?,
            directory: file.directory.clone(),
        })
    }

    pub fn load(path: Option<&std::path::Path>) -> Result<Self, SettingsError> {
        Self::from_file(&SettingsFile::load(path)?)
    }

    /// The work order a classified complaint would open (pure); an error if the complaint's
    /// id is not a UUID.
    pub fn draft(
        &self,
        complaint: &closedloop_proto::v1::Complaint,
        classification: &closedloop_proto::v1::Classification,
        now: chrono::DateTime<Utc>,
    ) -> Result<Draft, uuid::Error> {
        let route = self.router.route(&RouteFacts {
            intent: classification.intent(),
            category: &classification.category,
            province: &classification.province,
            channel: complaint.channel(),
            priority: classification.priority(),
            tier: classification.influence_tier(),
        });
        let deadlines = self
            .sla
            .deadlines(&classification.category, classification.priority(), now);
        Ok(Draft {
            complaint: uuid::Uuid::parse_str(&complaint.complaint_id)?,
            new: store::new_work_order(complaint, classification, &route, &deadlines, now),
            account_managed: route.account_managed,
            route_reason: format!("routed to {} by {}", route.team, route.reason),
            trace: closedloop_runtime::telemetry::current_trace_headers(),
        })
    }
}

/// Turns classified complaints into work orders, through the batcher.
struct ClassifiedHandler {
    policy: Arc<Policy>,
    batcher: Batcher,
    /// Asked whether PostgreSQL answers when a placement fails.
    pool: PgPool,
}

impl MessageHandler for ClassifiedHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let (complaint, classification) = closedloop_runtime::events::classified(message)?;
        if !store::needs_work_order(classification.intent()) {
            tracing::info!(complaint_id = %complaint.complaint_id, intent = ?classification.intent(), "no work order needed");
            return Ok(());
        }
        let draft = self
            .policy
            .draft(&complaint, &classification, Utc::now())
            .map_err(|_| HandleError::reject("complaint id is not a UUID"))?;
        let placed = self.batcher.submit(draft).await.map_err(|error| {
            if error.is_data() {
                HandleError::reject(format!("PostgreSQL refused this complaint: {error}"))
            } else {
                HandleError::retry(error)
            }
        })?;
        match placed {
            Placement::Created(created) => {
                tracing::info!(work_order_id = %created.work_order_id, team = %created.team, assignee = %created.assignee, "work order created");
            }
            Placement::Attached(open) => {
                tracing::info!(
                    work_order_id = %open.work_order_id,
                    complaint_id = %complaint.complaint_id,
                    "complaint attached to an open work order"
                );
            }
            Placement::AlreadyHandled => {
                tracing::info!(complaint_id = %complaint.complaint_id, "already placed; redelivery ignored");
            }
        }
        Ok(())
    }

    async fn dependencies_ready(&self) -> anyhow::Result<()> {
        Ok(db::ping(&self.pool).await?)
    }
}

/// Applies customer feedback to work orders.
struct FeedbackHandler {
    db: Db,
    policy: Arc<Policy>,
}

impl MessageHandler for FeedbackHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: FeedbackReceived = consumer::decode(message)?;
        consumer::check_tenant(message, &event.tenant)?;
        let outcome = feedback::apply(&self.db, &self.policy, &event)
            .await
            .map_err(|e| match e {
                store::StoreError::Database(db) => HandleError::retry(db),
                other => HandleError::reject(other.to_string()),
            })?;
        tracing::info!(feedback_id = %event.feedback_id, ?outcome, "feedback applied");
        Ok(())
    }

    async fn dependencies_ready(&self) -> anyhow::Result<()> {
        Ok(db::ping(&self.db.pool).await?)
    }
}

/// Connects to dispatch's schema and brings it up to date, as the service does at start.
pub async fn connect_database(
    args: &DatabaseArgs,
    cancel: &CancellationToken,
) -> Result<PgPool, db::DbError> {
    db::connect(args, SCHEMA, &MIGRATOR, cancel).await
}

/// A built dispatch service: connected, migrated, directory seeded, listener bound.
pub struct Dispatch {
    endpoints: Endpoints,
    bus: Bus,
    db: Db,
    policy: Arc<Policy>,
    config: Config,
}

impl Dispatch {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let policy = Arc::new(Policy::load(config.policy.as_deref())?);
        let db = Db::new(connect_database(&config.database, cancel).await?);
        directory::seed(&db, &policy.directory, policy.router.account_manager_team()).await?;
        let bus = Bus::connect(&config.service.nats.connect, "dispatch", cancel).await?;
        bus.provision_streams(
            &StreamSettings::from(&config.service.nats),
            &[
                bus::WORK_ORDERS_STREAM,
                bus::INCIDENTS_STREAM,
                bus::DEAD_LETTER_STREAM,
            ],
        )
        .await?;
        let endpoints = Endpoints::bind(config.listen, &config.service).await?;
        Ok(Self {
            endpoints,
            bus,
            db,
            policy,
            config,
        })
    }

    /// Consumes, watches, relays and serves until `cancel` fires; then drains in-flight
    /// work and publishes what was committed.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let nats = &self.config.service.nats;
        let linger = std::time::Duration::from_millis(self.config.placement_linger_ms);
        let placer = Placer {
            db: self.db.clone(),
            policy: self.policy.clone(),
        };
        let (batcher, batching) = Batcher::spawn(placer, placement::MAX_BATCH, linger);
        let classified = consumer::spawn(
            &self.bus,
            ConsumerSpec::new(
                bus::COMPLAINTS_STREAM,
                CLASSIFIED_CONSUMER,
                vec![bus::COMPLAINT_CLASSIFIED.all_tenants()],
                nats,
            ),
            ClassifiedHandler {
                policy: self.policy.clone(),
                batcher,
                pool: self.db.pool.clone(),
            },
            &cancel,
        );
        let feedback = consumer::spawn(
            &self.bus,
            ConsumerSpec::new(
                bus::FEEDBACK_STREAM,
                FEEDBACK_CONSUMER,
                vec![bus::FEEDBACK_RECEIVED.all_tenants()],
                nats,
            ),
            FeedbackHandler {
                db: self.db.clone(),
                policy: self.policy.clone(),
            },
            &cancel,
        );
        let watching = tokio::spawn(watcher::run(self.db.clone(), self.policy.clone(), cancel.clone()));
        let counting = tokio::spawn(census::run(self.db.clone(), cancel.clone()));
        let archive = &self.config.archive;
        let (pool, feedback_pool) = (self.db.pool.clone(), self.db.pool.clone());
        let archiving = [
            tokio::spawn(closedloop_runtime::archive::run(
                "work_orders",
                archive.clone(),
                move |cutoff, limit| archive::move_closed(pool.clone(), cutoff, limit),
                cancel.clone(),
            )),
            tokio::spawn(closedloop_runtime::archive::run(
                "feedback_seen",
                archive.clone(),
                move |cutoff, limit| archive::forget_feedback(feedback_pool.clone(), cutoff, limit),
                cancel.clone(),
            )),
        ];
        let exporting = self.endpoints.metrics.spawn(cancel.clone());
        // The relay outlives the consumers and the API so their last commits get published.
        let relay_stop = CancellationToken::new();
        let relaying = tokio::spawn(relay::run(
            self.db.pool.clone(),
            self.bus.clone(),
            self.db.relay_wake(),
            relay_stop.clone(),
        ));

        let authenticator = Authenticator::new(self.config.service.grpc.auth_tokens.clone());
        let max_request = self.config.service.grpc.max_request_bytes;
        let work_orders = WorkOrderServiceServer::new(api::WorkOrderApi {
            db: self.db.clone(),
            policy: self.policy.clone(),
            feeds: watch::Feeds::new(self.bus.client().clone(), WATCH_FEED_CAPACITY),
            shutdown: cancel.clone(),
            watchers: watch::Watchers::new(watch::WatchLimits {
                per_caller: self.config.watch_max_per_caller.max(1),
                per_tenant: self.config.watch_max_per_tenant.max(1),
                buffer: self.config.watch_buffer.max(1),
            }),
        })
        .max_decoding_message_size(max_request);
        let directory = DirectoryServiceServer::new(directory::DirectoryApi {
            db: self.db.clone(),
            account_manager_team: self.policy.router.account_manager_team().map(str::to_owned),
        })
        .max_decoding_message_size(max_request);
        let routes = Routes::new(InterceptedService::new(work_orders, authenticator.clone()))
            .add_service(InterceptedService::new(directory, authenticator));
        let served = grpc::serve(
            self.endpoints.grpc,
            routes,
            &[api::SERVICE_NAME, directory::SERVICE_NAME],
            cancel.clone(),
        )
        .await;
        cancel.cancel();
        classified.await?;
        feedback.await?;
        // The handlers (and their batcher handles) are gone: the batcher drains and ends.
        batching.await?;
        watching.await?;
        counting.await?;
        for task in archiving {
            task.await?;
        }
        relay_stop.cancel();
        relaying.await?;
        exporting.await??;
        self.db.pool.close().await;
        served?;
        Ok(())
    }
}

closedloop_runtime::impl_service!(Dispatch, Config, "dispatch");
