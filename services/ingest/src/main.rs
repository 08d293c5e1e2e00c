//! `closedloop-ingest`: flags and environment in, the service out.

use clap::Parser;
use closedloop_ingest::{Config, Ingest};
use closedloop_runtime::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = telemetry::init("ingest", &config.telemetry)?;
    tracing::info!(?config, "starting ingest");
    let cancel = shutdown::on_signal();
    let ingest = Ingest::build(config, &cancel).await?;
    tracing::info!(grpc = %ingest.grpc_addr()?, "ingest listening");
    ingest.run(cancel).await
}
