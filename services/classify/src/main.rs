//! `closedloop-classify`: flags and environment in, the service out.

use clap::Parser;
use closedloop_classify::{Classify, Config};
use closedloop_runtime::{shutdown, telemetry};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.service.runtime()?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("classify", &config.service.telemetry)?;
    tracing::info!(?config, "starting classify");
    let grace = std::time::Duration::from_secs(config.service.grpc.shutdown_grace_secs);
    let cancel = shutdown::on_signal();
    let classify = Classify::build(config, &cancel).await?;
    tracing::info!(grpc = %classify.grpc_addr()?, "classify listening");
    shutdown::run_with_grace(classify.run(cancel.clone()), cancel, grace).await
}
