//! Ingest: the front door. Validates and normalises what channel gateways send, gives each
//! contact a deterministic id, publishes `complaint.received` and answers only after
//! JetStream acknowledged it, so an OK means the complaint is stored. Serves gRPC, an
//! HTTP+JSON form of the same calls, and the WeChat official-account callback, all through
//! one code path ([`intake::Intake`]). Stateless: run as many replicas as traffic needs.

pub mod config;
pub mod http;
pub mod intake;
pub mod nonces;
pub mod service;
pub mod signed;
pub mod validate;
pub mod wechat;
pub mod weibo;

use std::net::SocketAddr;

use closedloop_proto::v1::ingest_service_server::IngestServiceServer;
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::bus::{self, Bus, StreamSettings};
use closedloop_runtime::grpc;
use closedloop_runtime::service::Endpoints;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

pub use config::Config;

/// A built ingest service: connected, streams provisioned, listeners bound.
pub struct Ingest {
    endpoints: Endpoints,
    http_listener: TcpListener,
    intake: intake::Intake,
    nonces: nonces::Nonces,
    config: Config,
}

impl Ingest {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let bus = Bus::connect(&config.service.nats.connect, "ingest", cancel).await?;
        let streams = StreamSettings::from(&config.service.nats);
        bus.provision_streams(&streams, &[bus::COMPLAINTS_STREAM, bus::FEEDBACK_STREAM])
            .await?;
        let nonces = nonces::Nonces::open(bus.jetstream(), &streams).await?;
        let endpoints = Endpoints::bind(config.listen, &config.service).await?;
        let http_listener = grpc::bind(config.http_listen).await?;
        let intake = intake::Intake::new(bus, config.limits());
        Ok(Self {
            endpoints,
            http_listener,
            intake,
            nonces,
            config,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http_listener.local_addr()
    }

    /// Serves until `cancel` fires, then finishes in-flight calls.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let auth = Authenticator::new(self.config.service.grpc.auth_tokens.clone());
        let app = http::router(
            self.intake.clone(),
            auth.clone(),
            http::Callbacks {
                wechat: self.config.wechat_accounts.expose().clone(),
                weibo: self.config.weibo_apps.expose().clone(),
                nonces: self.nonces,
            },
            self.config.service.grpc.max_request_bytes,
        );
        let exporting = self.endpoints.metrics.spawn(cancel.clone());
        let http_cancel = cancel.clone();
        let http = tokio::spawn(async move {
            axum::serve(grpc::http_listener(self.http_listener), app)
                .with_graceful_shutdown(http_cancel.cancelled_owned())
                .await
        });
        let server = IngestServiceServer::new(service::IngestApi { intake: self.intake })
            .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(server, auth));
        let served = grpc::serve(
            self.endpoints.grpc,
            routes,
            &[service::SERVICE_NAME],
            cancel.clone(),
        )
        .await;
        cancel.cancel();
        http.await??;
        exporting.await??;
        served?;
        Ok(())
    }
}

closedloop_runtime::impl_service!(Ingest, Config, "ingest", [("http", http_addr)]);
