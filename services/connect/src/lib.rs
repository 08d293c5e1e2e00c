//! Connect: the channel gateway for platforms Closedloop speaks to directly. Notify sends
//! every customer message as a signed webhook ([`closedloop_runtime::webhook`]); pointed at
//! connect (`wechat=http://connect:8090/deliveries|secret` in `CLOSEDLOOP_GATEWAYS`), the
//! message goes out through the platform's own API, configured per tenant:
//!
//! - WeChat official accounts: the customer-service message inside the 48-hour window the
//!   customer's last message opened, else the tenant's template message; access tokens
//!   cached and refreshed once across replicas ([`tokens`]).
//! - Weibo: a comment on the customer's post, a reply to their comment, or a private
//!   message; and the other way, a listener ([`listen`]) that follows the brand's mentions,
//!   the comments on its posts and a keyword search, and submits what it finds to ingest.
//!
//! A separate service rather than code in notify: notify's promise (a first reply within
//! 20 s, with NATS alone) stays independent of each platform's quirks, a platform outage
//! shows as one gateway's circuit in notify, and the connectors scale and hold their
//! secrets apart. Each delivery is sent at most once ([`store`]): the webhook's
//! Idempotency-Key names it, and retries of it get the first outcome.

pub mod budget;
pub mod deliver;
pub mod listen;
mod metrics;
pub mod sent;
pub mod store;
pub mod tokens;
pub mod wechat;
pub mod weibo;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use closedloop_proto::v1::classify_service_client::ClassifyServiceClient;
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_runtime::Secret;
use closedloop_runtime::bus::{Bus, StreamSettings};
use closedloop_runtime::grpc;
use closedloop_runtime::service::Endpoints;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::listen::{ApiTokens, Listener};
use crate::wechat::WechatApps;
use crate::weibo::{Keywords, WeiboAccounts};

closedloop_runtime::service_config! {
    /// Closedloop connect: sends notify's messages through the platforms' own APIs
    name = "closedloop-connect", listen = ("CLOSEDLOOP_CONNECT_LISTEN", "0.0.0.0:50055");
    /// HTTP listen address: the webhook notify posts to (`POST /deliveries`).
    #[arg(long, env = "CLOSEDLOOP_CONNECT_HTTP_LISTEN", default_value = "0.0.0.0:8090")]
    pub http_listen: SocketAddr,
    /// The secret notify signs its webhooks with: the `|secret` of its gateway entries
    /// that point here.
    #[arg(long, env = "CLOSEDLOOP_CONNECT_WEBHOOK_SECRET", default_value = "")]
    pub webhook_secret: Secret<String>,
    /// WeChat official accounts: `tenant=appid|appsecret[|template_id[|field]]` entries
    /// separated by `;`. The template goes out where the customer-service window is closed.
    #[arg(long, env = "CLOSEDLOOP_CONNECT_WECHAT_APPS", default_value = "")]
    pub wechat_apps: Secret<WechatApps>,
    /// Base URL of the WeChat API.
    #[arg(long, env = "CLOSEDLOOP_WECHAT_API", default_value = "https://api.weixin.qq.com")]
    pub wechat_api: String,
    /// Seconds to wait for one platform API call.
    #[arg(long, env = "CLOSEDLOOP_CONNECT_API_TIMEOUT_SECS", default_value_t = 5)]
    pub api_timeout_secs: u64,
    /// Weibo accounts: `tenant=uid|access_token[|refresh_token|app_key|app_secret]` entries
    /// separated by `;`. Each is listened to and replied through.
    #[arg(long, env = "CLOSEDLOOP_CONNECT_WEIBO_ACCOUNTS", default_value = "")]
    pub weibo_accounts: Secret<WeiboAccounts>,
    /// Keywords searched on Weibo for posts that do not address the brand:
    /// `tenant=keyword,keyword` entries separated by `;`.
    #[arg(long, env = "CLOSEDLOOP_CONNECT_WEIBO_KEYWORDS", default_value = "")]
    pub weibo_keywords: Keywords,
    /// Base URL of the Weibo open API (and OAuth2).
    #[arg(long, env = "CLOSEDLOOP_WEIBO_API", default_value = "https://api.weibo.com")]
    pub weibo_api: String,
    /// Base URL of Weibo's commercial search API.
    #[arg(long, env = "CLOSEDLOOP_WEIBO_SEARCH_API", default_value = "https://c.api.weibo.com")]
    pub weibo_search_api: String,
    /// Base URL of Weibo's fan-service private-message API.
    #[arg(long, env = "CLOSEDLOOP_WEIBO_MESSAGES_API", default_value = "https://m.api.weibo.com")]
    pub weibo_messages_api: String,
    /// Weibo calls each tenant may make per hour (per replica); polling stops at four
    /// fifths, so replies always have room.
    #[arg(long, env = "CLOSEDLOOP_WEIBO_CALLS_PER_HOUR", default_value_t = 1000)]
    pub weibo_calls_per_hour: u32,
    /// Seconds of the first pause after Weibo says a tenant's rate limit is reached; each
    /// one in a row doubles it, up to an hour.
    #[arg(long, env = "CLOSEDLOOP_WEIBO_BACKOFF_SECS", default_value_t = 60)]
    pub weibo_backoff_secs: u64,
    /// Seconds between rounds of the Weibo listener.
    #[arg(long, env = "CLOSEDLOOP_WEIBO_POLL_SECS", default_value_t = 30)]
    pub weibo_poll_secs: u64,
    /// The API token connect submits what it finds with, per tenant (roles gateway and
    /// viewer): `tenant=token` entries separated by `;`.
    #[arg(long, env = "CLOSEDLOOP_CONNECT_API_TOKENS", default_value = "")]
    pub api_tokens: Secret<ApiTokens>,
    /// Ingest's gRPC address, for what the listener finds.
    #[arg(long, env = "CLOSEDLOOP_INGEST_URL", default_value = "http://ingest:50051")]
    pub ingest_url: String,
    /// Classify's gRPC address, for search hits.
    #[arg(long, env = "CLOSEDLOOP_CLASSIFY_URL", default_value = "http://classify:50052")]
    pub classify_url: String,
}

/// A built connect service: connected to NATS, its bucket open, listeners bound.
pub struct Connect {
    endpoints: Endpoints,
    http_listener: TcpListener,
    deliverer: Arc<deliver::Deliverer>,
    listener: Option<Listener>,
}

impl Connect {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        if config.webhook_secret.expose().is_empty() {
            anyhow::bail!(
                "CLOSEDLOOP_CONNECT_WEBHOOK_SECRET is required: it is how notify's webhooks are told from forgeries"
            );
        }
        if config.wechat_apps.expose().is_empty() {
            tracing::warn!(
                "no WeChat apps configured (CLOSEDLOOP_CONNECT_WECHAT_APPS); WeChat deliveries will be refused"
            );
        }
        let bus = Bus::connect(&config.service.nats.connect, "connect", cancel).await?;
        let streams = StreamSettings::from(&config.service.nats);
        let store = store::Store::open(bus.jetstream(), &streams).await?;
        // Every delivery writes its record first: while the bucket has no leader, calls
        // wait rather than fail.
        bus.writes_to(&format!("KV_{}", store::BUCKET));
        let api_timeout = Duration::from_secs(config.api_timeout_secs.max(1));
        let http = reqwest::Client::builder()
            .timeout(api_timeout)
            .connect_timeout(api_timeout)
            .user_agent("closedloop-connect")
            .build()?;
        let weibo = weibo::Client::new(
            http.clone(),
            weibo::Endpoints {
                api: config.weibo_api.trim_end_matches('/').to_owned(),
                search: config.weibo_search_api.trim_end_matches('/').to_owned(),
                messages: config.weibo_messages_api.trim_end_matches('/').to_owned(),
            },
            config.weibo_accounts.expose().clone(),
            store.clone(),
            config.weibo_calls_per_hour,
            Duration::from_secs(config.weibo_backoff_secs),
        );
        let listener = if config.weibo_accounts.expose().is_empty() {
            None
        } else {
            let channel = |url: &str| {
                tonic::transport::Endpoint::from_shared(url.to_owned())
                    .map(|endpoint| endpoint.connect_timeout(api_timeout).connect_lazy())
            };
            Some(Listener {
                weibo: weibo.clone(),
                keywords: config.weibo_keywords.clone(),
                store: store.clone(),
                ingest: IngestServiceClient::new(channel(&config.ingest_url)?),
                classify: ClassifyServiceClient::new(channel(&config.classify_url)?),
                tokens: config.api_tokens.expose().clone(),
                every: Duration::from_secs(config.weibo_poll_secs.max(1)),
                instance: uuid::Uuid::new_v4().simple().to_string(),
            })
        };
        let deliverer = Arc::new(deliver::Deliverer {
            secret: config.webhook_secret.expose().as_bytes().to_vec(),
            store: store.clone(),
            wechat: wechat::Client {
                http,
                api: config.wechat_api.trim_end_matches('/').to_owned(),
                apps: config.wechat_apps.expose().clone(),
                store,
            },
            weibo,
            api_timeout,
        });
        let endpoints = Endpoints::bind(config.listen, &config.service).await?;
        let http_listener = grpc::bind(config.http_listen).await?;
        Ok(Self {
            endpoints,
            http_listener,
            deliverer,
            listener,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http_listener.local_addr()
    }

    /// Serves until `cancel` fires, then finishes in-flight calls.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let app = deliver::router(self.deliverer);
        let exporting = self.endpoints.metrics.spawn(cancel.clone());
        let listening = self
            .listener
            .map(|listener| tokio::spawn(listener.run(cancel.clone())));
        let http_cancel = cancel.clone();
        let http = tokio::spawn(async move {
            axum::serve(grpc::http_listener(self.http_listener), app)
                .with_graceful_shutdown(http_cancel.cancelled_owned())
                .await
        });
        // gRPC serves health (and reflection) only: connect's API is its webhook.
        let served = grpc::serve(self.endpoints.grpc, Routes::default(), &[], cancel.clone()).await;
        cancel.cancel();
        http.await??;
        if let Some(listening) = listening {
            listening.await?;
        }
        exporting.await??;
        served?;
        Ok(())
    }
}

closedloop_runtime::impl_service!(Connect, Config, "connect", [("http", http_addr)]);
