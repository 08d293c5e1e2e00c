//! `closedloop-dispatch`: flags and environment in, the service out.

use clap::Parser;
use closedloop_dispatch::{Config, Dispatch};
use closedloop_runtime::{shutdown, telemetry};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.service.runtime()?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("dispatch", &config.service.telemetry)?;
    tracing::info!(?config, "starting dispatch");
    let grace = std::time::Duration::from_secs(config.service.grpc.shutdown_grace_secs);
    let cancel = shutdown::on_signal();
    let dispatch = Dispatch::build(config, &cancel).await?;
    tracing::info!(grpc = %dispatch.grpc_addr()?, "dispatch listening");
    shutdown::run_with_grace(dispatch.run(cancel.clone()), cancel, grace).await
}
