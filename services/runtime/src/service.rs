//! What every service binary's `main` does: read flags and environment, start telemetry, log
//! the configuration (secrets redacted), build the service, serve until SIGTERM or SIGINT,
//! then give in-flight work its grace. Each service implements [`Service`]; its `main.rs`
//! calls [`main`].

use std::future::Future;
use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::config::ServiceArgs;
use crate::{shutdown, telemetry};

/// A Closedloop service as its binary runs it.
/// Where a service is reached: its gRPC listener and its `/metrics` exporter. Both are
/// bound while the service builds, so an address in use fails start-up.
pub struct Endpoints {
    pub grpc: tokio::net::TcpListener,
    pub metrics: crate::metrics::Exporter,
}

impl Endpoints {
    pub async fn bind(grpc: SocketAddr, args: &ServiceArgs) -> Result<Self, crate::grpc::GrpcError> {
        Ok(Self {
            grpc: crate::grpc::bind(grpc).await?,
            metrics: crate::metrics::Exporter::bind(args.metrics_listen).await?,
        })
    }
}

pub trait Service: Sized {
    /// Its flags and environment.
    type Config: clap::Parser + std::fmt::Debug;
    /// Its name in logs and traces.
    const NAME: &'static str;

    /// What every service takes, within `config`.
    fn args(config: &Self::Config) -> &ServiceArgs;

    /// Connects, provisions and binds.
    fn build(config: Self::Config, cancel: &CancellationToken) -> impl Future<Output = anyhow::Result<Self>>;

    /// What it listens on, for the log: (protocol, address).
    fn listening(&self) -> std::io::Result<Vec<(&'static str, SocketAddr)>>;

    /// Serves until `cancel` fires, then finishes in-flight work.
    fn run(self, cancel: CancellationToken) -> impl Future<Output = anyhow::Result<()>>;
}

/// The whole of a service binary's `main`.
pub fn main<S: Service>() -> anyhow::Result<()> {
    let config = <S::Config as clap::Parser>::parse();
    S::args(&config).runtime()?.block_on(serve::<S>(config))
}

async fn serve<S: Service>(config: S::Config) -> anyhow::Result<()> {
    let args = S::args(&config);
    let _telemetry = telemetry::init(S::NAME, &args.telemetry)?;
    let grace = std::time::Duration::from_secs(args.grpc.shutdown_grace_secs);
    tracing::info!(service = S::NAME, ?config, "starting");
    let cancel = shutdown::on_signal();
    let service = S::build(config, &cancel).await?;
    for (protocol, addr) in service.listening()? {
        tracing::info!(service = S::NAME, protocol, %addr, "listening");
    }
    shutdown::run_with_grace(service.run(cancel.clone()), cancel, grace).await
}

/// Implements [`Service`] for a service type over its inherent `build(config, &cancel)` and
/// `run(self, cancel)`, for a `Config` with a `service: ServiceArgs` field and a service with
/// `listener` (gRPC) and `metrics` fields, and gives it `grpc_addr` and `metrics_addr`.
/// Other addresses it listens on follow as `(protocol, method)` pairs:
/// `closedloop_runtime::impl_service!(Ingest, Config, "ingest", [("http", http_addr)]);`
#[macro_export]
macro_rules! impl_service {
    ($service:ty, $config:ty, $name:literal $(, [$(($protocol:literal, $addr:ident)),+ $(,)?])?) => {
        impl $service {
            /// The bound gRPC address (useful when configured with port 0).
            pub fn grpc_addr(&self) -> ::std::io::Result<::std::net::SocketAddr> {
                self.endpoints.grpc.local_addr()
            }

            /// Where `/metrics` is served.
            pub fn metrics_addr(&self) -> ::std::io::Result<::std::net::SocketAddr> {
                self.endpoints.metrics.addr()
            }
        }

        impl $crate::service::Service for $service {
            type Config = $config;
            const NAME: &'static str = $name;

            fn args(config: &$config) -> &$crate::config::ServiceArgs {
                &config.service
            }

            async fn build(
                config: $config,
                cancel: &::tokio_util::sync::CancellationToken,
            ) -> ::anyhow::Result<Self> {
                <$service>::build(config, cancel).await
            }

            fn listening(&self) -> ::std::io::Result<::std::vec::Vec<(&'static str, ::std::net::SocketAddr)>> {
                Ok(vec![("grpc", self.grpc_addr()?) $($(, ($protocol, self.$addr()?))+)?])
            }

            async fn run(self, cancel: ::tokio_util::sync::CancellationToken) -> ::anyhow::Result<()> {
                <$service>::run(self, cancel).await
            }
        }
    };
}
