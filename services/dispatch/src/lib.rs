//! Dispatch: the system of record for work orders. Consumes `complaint.classified`, creates
//! exactly one work order per complaint (redelivery finds the existing one), routes it to a
//! team, sets its due times, and serves the `WorkOrderService` API. Every change is a
//! versioned `workorder.*` event written through a transactional outbox.

pub mod api;
pub mod lifecycle;
pub mod relay;
pub mod routing;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::jetstream;
use chrono::Utc;
use closedloop_proto::v1::ComplaintClassified;
use closedloop_proto::v1::work_order_service_server::WorkOrderServiceServer;
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::bus::{self, Bus, StreamSettings};
use closedloop_runtime::config::{DatabaseArgs, ServiceArgs};
use closedloop_runtime::consumer::{self, ConsumerSpec, HandleError, MessageHandler};
use closedloop_runtime::{db, grpc, metrics};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

use crate::routing::{RoutingTable, SlaPolicy};

/// Durable consumer of classified complaints, shared by all dispatch replicas.
pub const CLASSIFIED_CONSUMER: &str = "dispatch-classified";
/// Database schema dispatch owns.
pub const SCHEMA: &str = "dispatch";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "closedloop-dispatch",
    about = "Closedloop dispatch: work orders, routing and deadlines"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "CLOSEDLOOP_DISPATCH_LISTEN", default_value = "0.0.0.0:50053")]
    pub listen: SocketAddr,
    /// `category=team` pairs, comma-separated.
    #[arg(
        long,
        env = "CLOSEDLOOP_ROUTES",
        default_value = "billing=billing,payment=billing,refund=billing,outage=network-ops,network_quality=network-ops,service_request=field-service,plan_change=sales,staff_attitude=quality,delivery=logistics,fraud=security"
    )]
    pub routes: String,
    /// Team for categories without a route.
    #[arg(long, env = "CLOSEDLOOP_DEFAULT_TEAM", default_value = "front-desk")]
    pub default_team: String,
    /// SLA targets overriding the defaults, e.g. `P1=15m/4h,P2=30m/24h`.
    #[arg(long, env = "CLOSEDLOOP_SLA", default_value = "")]
    pub sla: String,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// Turns classified complaints into work orders.
struct ClassifiedHandler {
    pool: PgPool,
    routing: RoutingTable,
    sla: SlaPolicy,
    relay_wake: Arc<Notify>,
}

impl MessageHandler for ClassifiedHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: ComplaintClassified = consumer::decode(message)?;
        let (Some(complaint), Some(classification)) = (event.complaint, event.classification) else {
            return Err(HandleError::reject(
                "complaint.classified without complaint or classification",
            ));
        };
        if !store::needs_work_order(classification.intent()) {
            tracing::info!(complaint_id = %complaint.complaint_id, intent = ?classification.intent(), "no work order needed");
            return Ok(());
        }
        let now = Utc::now();
        let team = self.routing.team_for(&classification.category);
        let due = self.sla.due_times(classification.priority(), now);
        let work_order = store::new_work_order(&complaint, &classification, team, due, now);
        let placement = store::place(&self.pool, &work_order).await.map_err(|e| match e {
            store::StoreError::Database(db) => HandleError::retry(db),
            other => HandleError::reject(other.to_string()),
        })?;
        match placement {
            store::Placement::Created(created) => {
                self.relay_wake.notify_one();
                tracing::info!(work_order_id = %created.work_order_id, %team, "work order created");
            }
            store::Placement::Attached(open) => {
                self.relay_wake.notify_one();
                tracing::info!(
                    work_order_id = %open.work_order_id,
                    complaint_id = %complaint.complaint_id,
                    "follow-up attached to the thread's open work order"
                );
            }
            store::Placement::AlreadyHandled => {
                tracing::info!(complaint_id = %complaint.complaint_id, "already placed; redelivery ignored");
            }
        }
        Ok(())
    }
}

/// A built dispatch service: connected, migrated, listener bound.
pub struct Dispatch {
    listener: TcpListener,
    metrics: metrics::Exporter,
    bus: Bus,
    pool: PgPool,
    routing: RoutingTable,
    sla: SlaPolicy,
    config: Config,
}

impl Dispatch {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let routing = RoutingTable::parse(&config.routes, &config.default_team)?;
        let sla: SlaPolicy = config.sla.parse()?;
        let pool = db::connect(&config.database, SCHEMA, &MIGRATOR, cancel).await?;
        let bus = Bus::connect(&config.service.nats.nats_url, "dispatch", cancel).await?;
        bus.provision(&StreamSettings::from(&config.service.nats)).await?;
        let listener = grpc::bind(config.listen).await?;
        let metrics = metrics::Exporter::bind(config.service.metrics_listen).await?;
        Ok(Self {
            listener,
            metrics,
            bus,
            pool,
            routing,
            sla,
            config,
        })
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics.addr()
    }

    /// Consumes, relays and serves until `cancel` fires; then drains in-flight work and
    /// publishes what was committed.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let relay_wake = Arc::new(Notify::new());
        let spec = ConsumerSpec::new(
            bus::COMPLAINTS_STREAM,
            CLASSIFIED_CONSUMER,
            vec![bus::COMPLAINT_CLASSIFIED.all_tenants()],
            &self.config.service.nats,
        );
        let handler = ClassifiedHandler {
            pool: self.pool.clone(),
            routing: self.routing,
            sla: self.sla,
            relay_wake: relay_wake.clone(),
        };
        let consuming = consumer::spawn(&self.bus, spec, handler, &cancel);
        let exporting = self.metrics.spawn(cancel.clone());
        // The relay outlives the consumer and the API so their last commits get published.
        let relay_stop = CancellationToken::new();
        let relaying = tokio::spawn(relay::run(
            self.pool.clone(),
            self.bus.clone(),
            relay_wake.clone(),
            relay_stop.clone(),
        ));

        let api = api::WorkOrderApi {
            pool: self.pool.clone(),
            relay_wake,
        };
        let server = WorkOrderServiceServer::new(api)
            .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(
            server,
            Authenticator::new(self.config.service.grpc.auth_tokens.clone()),
        ));
        let served = grpc::serve(self.listener, routes, &[api::SERVICE_NAME], cancel.clone()).await;
        cancel.cancel();
        consuming.await?;
        relay_stop.cancel();
        relaying.await?;
        exporting.await??;
        self.pool.close().await;
        served?;
        Ok(())
    }
}
