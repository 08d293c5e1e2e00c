//! `closedloop-ingest`: flags and environment in, the service out.

use clap::Parser;
use closedloop_ingest::{Config, Ingest};
use closedloop_runtime::{shutdown, telemetry};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.service.runtime()?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("ingest", &config.service.telemetry)?;
    tracing::info!(?config, "starting ingest");
    let grace = std::time::Duration::from_secs(config.service.grpc.shutdown_grace_secs);
    let cancel = shutdown::on_signal();
    let ingest = Ingest::build(config, &cancel).await?;
    tracing::info!(grpc = %ingest.grpc_addr()?, http = %ingest.http_addr()?, "ingest listening");
    shutdown::run_with_grace(ingest.run(cancel.clone()), cancel, grace).await
}
