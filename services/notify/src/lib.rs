//! Notify: speaks to customers. Acknowledges every classified complaint on the channel it
//! came from (or invites the customer to a private channel when the post carried personal
//! data), and sends the closure message when a work order is resolved — through signed
//! channel-gateway webhooks, recording every delivery so a redelivered event sends nothing
//! twice. Serves the delivery log as `ListDeliveries`.

pub mod api;
pub mod gateway;
pub mod store;
pub mod templates;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use closedloop_proto::v1::notification_service_server::NotificationServiceServer;
use closedloop_proto::v1::{
    Channel, ComplaintClassified, Delivery, DeliveryState, NotificationDelivered, NotificationFailed,
    NotificationKind, WorkOrderEvent, WorkOrderEventKind,
};
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::bus::{self, Bus, OutgoingEvent, StreamSettings};
use closedloop_runtime::config::{DatabaseArgs, ServiceArgs};
use closedloop_runtime::consumer::{self, ConsumerSpec, HandleError, MessageHandler};
use closedloop_runtime::{Secret, db, grpc, ids};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

use crate::gateway::{GatewayTable, WebhookClient, WebhookMessage, channel_key};
use crate::templates::MessageContext;

pub const CLASSIFIED_CONSUMER: &str = "notify-classified";
pub const WORK_ORDER_CONSUMER: &str = "notify-workorders";
pub const SCHEMA: &str = "notify";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "closedloop-notify",
    about = "Closedloop notify: replies to customers on their own channel"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "CLOSEDLOOP_NOTIFY_LISTEN", default_value = "0.0.0.0:50054")]
    pub listen: SocketAddr,
    /// Channel-gateway webhooks: `channel=url|secret` entries separated by `;`, with
    /// `default` for channels not named, e.g. `default=https://gw.example/hook|s3cret`.
    #[arg(long, env = "CLOSEDLOOP_GATEWAYS", default_value = "")]
    pub gateways: Secret<GatewayTable>,
    /// Seconds to wait for a gateway to answer.
    #[arg(long, env = "CLOSEDLOOP_GATEWAY_TIMEOUT_SECS", default_value_t = 5)]
    pub gateway_timeout_secs: u64,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// Delivers messages and keeps the log. Shared by both consumers.
struct Courier {
    pool: PgPool,
    bus: Bus,
    webhooks: WebhookClient,
    max_deliver: i64,
}

/// What a message is about, beyond its text.
struct Addressing<'a> {
    channel: Channel,
    reply_to_message_id: &'a str,
    thread_id: &'a str,
}

impl Courier {
    /// Sends `delivery` unless the log says it was already sent (or given up on).
    async fn deliver(
        &self,
        delivery: Delivery,
        addressing: Addressing<'_>,
        message: &jetstream::Message,
    ) -> Result<(), HandleError> {
        let db_error = |e: store::StoreError| HandleError::retry(e);
        match store::register(&self.pool, &delivery).await.map_err(db_error)? {
            DeliveryState::Delivered | DeliveryState::Failed => {
                tracing::info!(delivery_id = %delivery.delivery_id, "already handled; nothing sent");
                return Ok(());
            }
            DeliveryState::Pending | DeliveryState::Unspecified => {}
        }
        let kind = delivery
            .kind()
            .as_str_name()
            .trim_start_matches("NOTIFICATION_KIND_")
            .to_ascii_lowercase();
        let channel = channel_key(addressing.channel);
        let webhook = WebhookMessage {
            delivery_id: &delivery.delivery_id,
            tenant: &delivery.tenant,
            kind: &kind,
            channel: &channel,
            recipient: &delivery.recipient,
            reply_to_message_id: addressing.reply_to_message_id,
            thread_id: addressing.thread_id,
            complaint_id: &delivery.complaint_id,
            work_order_id: &delivery.work_order_id,
            text: &delivery.body,
        };
        match self.webhooks.send(addressing.channel, &webhook).await {
            Ok(()) => {
                let logged =
                    store::record_attempt(&self.pool, &delivery.delivery_id, DeliveryState::Delivered, "")
                        .await
                        .map_err(db_error)?;
                tracing::info!(delivery_id = %delivery.delivery_id, %kind, "delivered");
                let event = OutgoingEvent::new(
                    bus::NOTIFICATION_DELIVERED,
                    &delivery.tenant,
                    format!("delivered:{}", delivery.delivery_id),
                    &NotificationDelivered {
                        delivery: Some(logged),
                    },
                );
                self.bus.publish(event).await.map_err(HandleError::retry)?;
                Ok(())
            }
            Err(error) => {
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
                let last_try = delivered >= self.max_deliver;
                let state = if last_try {
                    DeliveryState::Failed
                } else {
                    DeliveryState::Pending
                };
                let reason = error.to_string();
                let logged = store::record_attempt(&self.pool, &delivery.delivery_id, state, &reason)
                    .await
                    .map_err(db_error)?;
                if !last_try {
                    return Err(HandleError::retry(error));
                }
                let event = OutgoingEvent::new(
                    bus::NOTIFICATION_FAILED,
                    &delivery.tenant,
                    format!("failed:{}", delivery.delivery_id),
                    &NotificationFailed {
                        delivery: Some(logged),
                        reason: reason.clone(),
                    },
                );
                self.bus.publish(event).await.map_err(HandleError::retry)?;
                Err(HandleError::reject(format!(
                    "delivery {} gave up: {reason}",
                    delivery.delivery_id
                )))
            }
        }
    }
}

fn reference(complaint_id: &str) -> &str {
    complaint_id.get(..8).unwrap_or(complaint_id)
}

/// Acknowledges each classified complaint.
struct ClassifiedHandler(Arc<Courier>);

impl MessageHandler for ClassifiedHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: ComplaintClassified = consumer::decode(message)?;
        let (Some(complaint), Some(classification)) = (event.complaint, event.classification) else {
            return Err(HandleError::reject(
                "complaint.classified without complaint or classification",
            ));
        };
        let kind = if classification.needs_private_channel {
            NotificationKind::PrivateChannelInvitation
        } else {
            NotificationKind::Acknowledgement
        };
        let context = MessageContext {
            reference: reference(&complaint.complaint_id),
            locale: &complaint.locale,
            resolution_note: "",
            private_channel: false,
        };
        let delivery = Delivery {
            // One first reply per complaint, whichever kind it is.
            delivery_id: ids::derive(
                "delivery",
                &["first-reply", &complaint.tenant, &complaint.complaint_id],
            )
            .to_string(),
            tenant: complaint.tenant.clone(),
            kind: kind as i32,
            channel: complaint.channel,
            recipient: complaint
                .poster
                .as_ref()
                .map(|p| p.poster_id.clone())
                .unwrap_or_default(),
            complaint_id: complaint.complaint_id.clone(),
            body: templates::render(kind, &context),
            ..Default::default()
        };
        let addressing = Addressing {
            channel: complaint.channel(),
            reply_to_message_id: &complaint.channel_message_id,
            thread_id: &complaint.thread_id,
        };
        self.0.deliver(delivery, addressing, message).await
    }
}

/// Sends the closure message when a work order is resolved.
struct WorkOrderHandler(Arc<Courier>);

impl MessageHandler for WorkOrderHandler {
    async fn handle(&self, message: &jetstream::Message) -> Result<(), HandleError> {
        let event: WorkOrderEvent = consumer::decode(message)?;
        if event.kind() != WorkOrderEventKind::Resolved {
            return Ok(());
        }
        let work_order = event
            .work_order
            .ok_or_else(|| HandleError::reject("workorder event without a work order"))?;
        let private_channel = matches!(
            work_order.channel(),
            Channel::WeiboDirectMessage | Channel::Wechat | Channel::Hotline | Channel::Email | Channel::App
        );
        let context = MessageContext {
            reference: reference(&work_order.complaint_id),
            locale: &work_order.locale,
            resolution_note: &work_order.resolution_note,
            private_channel,
        };
        let delivery = Delivery {
            // Per version: a work order reopened and resolved again earns a new closure.
            delivery_id: ids::derive(
                "delivery",
                &[
                    "closure",
                    &work_order.work_order_id,
                    &work_order.version.to_string(),
                ],
            )
            .to_string(),
            tenant: work_order.tenant.clone(),
            kind: NotificationKind::Closure as i32,
            channel: work_order.channel,
            recipient: work_order
                .poster
                .as_ref()
                .map(|p| p.poster_id.clone())
                .unwrap_or_default(),
            complaint_id: work_order.complaint_id.clone(),
            work_order_id: work_order.work_order_id.clone(),
            body: templates::render(NotificationKind::Closure, &context),
            ..Default::default()
        };
        let addressing = Addressing {
            channel: work_order.channel(),
            reply_to_message_id: &work_order.channel_message_id,
            thread_id: &work_order.thread_id,
        };
        self.0.deliver(delivery, addressing, message).await
    }
}

/// A built notify service: connected, migrated, listener bound.
pub struct Notify {
    listener: TcpListener,
    bus: Bus,
    pool: PgPool,
    webhooks: WebhookClient,
    config: Config,
}

impl Notify {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        if config.gateways.expose().is_empty() {
            tracing::warn!("no channel gateways configured (CLOSEDLOOP_GATEWAYS); every delivery will fail");
        }
        let webhooks = WebhookClient::new(
            config.gateways.expose().clone(),
            Duration::from_secs(config.gateway_timeout_secs.max(1)),
        )?;
        let pool = db::connect(&config.database, SCHEMA, &MIGRATOR, cancel).await?;
        let bus = Bus::connect(&config.service.nats.nats_url, "notify", cancel).await?;
        bus.provision(&StreamSettings::from(&config.service.nats)).await?;
        let listener = grpc::bind(config.listen).await?;
        Ok(Self {
            listener,
            bus,
            pool,
            webhooks,
            config,
        })
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let courier = Arc::new(Courier {
            pool: self.pool.clone(),
            bus: self.bus.clone(),
            webhooks: self.webhooks,
            max_deliver: self.config.service.nats.max_deliver.max(1),
        });
        let classified = ConsumerSpec::new(
            bus::COMPLAINTS_STREAM,
            CLASSIFIED_CONSUMER,
            vec![bus::COMPLAINT_CLASSIFIED.all_tenants()],
            &self.config.service.nats,
        );
        let work_orders = ConsumerSpec::new(
            bus::WORK_ORDERS_STREAM,
            WORK_ORDER_CONSUMER,
            vec![bus::work_order_topic("resolved").all_tenants()],
            &self.config.service.nats,
        );
        let consumers = [
            tokio::spawn(consumer::run(
                self.bus.clone(),
                classified,
                Arc::new(ClassifiedHandler(courier.clone())),
                cancel.clone(),
            )),
            tokio::spawn(consumer::run(
                self.bus.clone(),
                work_orders,
                Arc::new(WorkOrderHandler(courier)),
                cancel.clone(),
            )),
        ];
        let server = NotificationServiceServer::new(api::NotificationApi {
            pool: self.pool.clone(),
        })
        .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(
            server,
            Authenticator::new(self.config.service.grpc.auth_tokens.clone()),
        ));
        let served = grpc::serve(self.listener, routes, &[api::SERVICE_NAME], cancel.clone()).await;
        cancel.cancel();
        for consuming in consumers {
            consuming.await?;
        }
        self.pool.close().await;
        served?;
        Ok(())
    }
}
