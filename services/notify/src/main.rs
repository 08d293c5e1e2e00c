//! `closedloop-notify`: flags and environment in, the service out.

use clap::Parser;
use closedloop_notify::{Config, Notify};
use closedloop_runtime::{shutdown, telemetry};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.service.runtime()?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _telemetry = telemetry::init("notify", &config.service.telemetry)?;
    tracing::info!(?config, "starting notify");
    let grace = std::time::Duration::from_secs(config.service.grpc.shutdown_grace_secs);
    let cancel = shutdown::on_signal();
    let notify = Notify::build(config, &cancel).await?;
    tracing::info!(grpc = %notify.grpc_addr()?, "notify listening");
    shutdown::run_with_grace(notify.run(cancel.clone()), cancel, grace).await
}
