//! `closedloop-demo-gateway`: a stand-in channel gateway for trying Closedloop out (used by
//! docker compose). Receives notify's webhooks on `/hook`, checks the signature and prints
//! what the customer would get; `GET /messages` lists what it received, as JSON.

use clap::Parser;
use closedloop_e2e::webhook::WebhookReceiver;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "CLOSEDLOOP_DEMO_GATEWAY_LISTEN", default_value = "0.0.0.0:8088")]
    listen: std::net::SocketAddr,
    /// The secret notify signs with (the `|secret` part of its CLOSEDLOOP_GATEWAYS entry).
    #[arg(
        long,
        env = "CLOSEDLOOP_DEMO_GATEWAY_SECRET",
        default_value = "dev-gateway-secret"
    )]
    secret: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cancel = closedloop_runtime::shutdown::on_signal();
    let gateway = WebhookReceiver::start(args.listen, &args.secret, true, cancel.clone()).await?;
    println!("demo gateway listening on {}", gateway.url());
    cancel.cancelled().await;
    Ok(())
}
