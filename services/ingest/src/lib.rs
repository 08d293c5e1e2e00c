//! Ingest: the front door. Validates and normalises what channel gateways send, gives each
//! contact a deterministic id, publishes `complaint.received` and answers only after
//! JetStream acknowledged it, so an OK means the complaint is stored. Stateless: run as
//! many replicas as the traffic needs.

pub mod config;
pub mod service;
pub mod validate;

use std::net::SocketAddr;

use closedloop_proto::v1::ingest_service_server::IngestServiceServer;
use closedloop_runtime::auth::Authenticator;
use closedloop_runtime::bus::{Bus, StreamSettings};
use closedloop_runtime::grpc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

pub use config::Config;

/// A built ingest service: connected, streams provisioned, listener bound.
pub struct Ingest {
    listener: TcpListener,
    service: service::IngestApi,
    config: Config,
}

impl Ingest {
    pub async fn build(config: Config, cancel: &CancellationToken) -> anyhow::Result<Self> {
        let bus = Bus::connect(&config.service.nats.nats_url, "ingest", cancel).await?;
        bus.provision(&StreamSettings::from(&config.service.nats)).await?;
        let listener = grpc::bind(config.listen).await?;
        let service = service::IngestApi::new(bus, config.limits());
        Ok(Self {
            listener,
            service,
            config,
        })
    }

    /// The bound gRPC address (useful when configured with port 0).
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel` fires, then finishes in-flight calls.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let server = IngestServiceServer::new(self.service)
            .max_decoding_message_size(self.config.service.grpc.max_request_bytes);
        let routes = Routes::new(InterceptedService::new(
            server,
            Authenticator::new(self.config.service.grpc.auth_tokens.clone()),
        ));
        grpc::serve(self.listener, routes, &[service::SERVICE_NAME], cancel).await?;
        Ok(())
    }
}
