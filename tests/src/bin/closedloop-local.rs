//! `closedloop-local`: the whole system on a machine without a container engine. Starts
//! `nats-server` and PostgreSQL (data kept under `--data-dir`), a demo channel gateway that
//! prints what customers would receive, and the four services, then prints where each
//! listens. Ctrl-C stops everything.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use closedloop_e2e::servers::{NatsServer, Postgres};
use closedloop_e2e::system::{System, SystemOptions};
use closedloop_e2e::webhook::WebhookReceiver;
use closedloop_runtime::auth::hash_token;
use closedloop_runtime::config::{LogFormat, TelemetryArgs};
use closedloop_runtime::{shutdown, telemetry};

#[derive(Debug, Parser)]
#[command(about = "Run NATS, PostgreSQL and all four Closedloop services locally")]
struct Args {
    /// Where NATS and PostgreSQL keep their data between runs.
    #[arg(long, default_value = ".closedloop-local")]
    data_dir: PathBuf,
    /// Address the services listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Ingest listens here; classify, dispatch and notify on the next three ports.
    #[arg(long, default_value_t = 50051)]
    base_port: u16,
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    #[arg(long, default_value_t = 55432)]
    postgres_port: u16,
    /// `/metrics` of ingest; classify, dispatch and notify on the next three ports.
    #[arg(long, default_value_t = 9464)]
    metrics_port: u16,
    /// Port of ingest's HTTP listener (JSON submissions, WeChat callback).
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Callback token of the tenant's WeChat account (`/wechat/<tenant>`).
    #[arg(long, env = "CLOSEDLOOP_DEV_WECHAT_TOKEN", default_value = "dev-wechat-token")]
    wechat_token: String,
    /// Port of the demo gateway that receives notify's webhooks.
    #[arg(long, default_value_t = 8088)]
    gateway_port: u16,
    /// Use this NATS instead of starting one.
    #[arg(long, env = "CLOSEDLOOP_NATS_URL")]
    nats_url: Option<String>,
    /// Use this PostgreSQL database instead of starting one.
    #[arg(long, env = "CLOSEDLOOP_DATABASE_URL")]
    database_url: Option<String>,
    /// Tenant of the development tokens.
    #[arg(long, default_value = "demo")]
    tenant: String,
    /// Bearer token for gateways (SubmitComplaint).
    #[arg(
        long,
        env = "CLOSEDLOOP_DEV_GATEWAY_TOKEN",
        default_value = "dev-gateway-token"
    )]
    gateway_token: String,
    /// Bearer token for agents (WorkOrderService, ListDeliveries, Classify).
    #[arg(long, env = "CLOSEDLOOP_DEV_AGENT_TOKEN", default_value = "dev-agent-token")]
    agent_token: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = telemetry::init(
        "closedloop-local",
        &TelemetryArgs {
            log_format: LogFormat::Pretty,
            log_filter: "info,sqlx=warn".into(),
            otlp_endpoint: None,
        },
    )?;
    let cancel = shutdown::on_signal();
    std::fs::create_dir_all(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;

    let mut _nats = None;
    // (where services connect, where this launcher looks, whether services log in)
    let (nats_url, admin_url, nats_auth) = match &args.nats_url {
        Some(url) => (url.clone(), url.clone(), false),
        None => {
            let server = NatsServer::start_in(&data_dir.join("nats"), args.nats_port)?;
            let urls = (server.service_url(), server.url(), true);
            _nats = Some(server);
            urls
        }
    };
    let mut _postgres = None;
    let database_url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            let server = Postgres::start_in(&data_dir.join("postgres"), args.postgres_port, false)?;
            let url = server.ensure_database("closedloop").await?;
            _postgres = Some(server);
            url
        }
    };
    let gateway = WebhookReceiver::start(
        SocketAddr::new(args.host, args.gateway_port),
        "dev-gateway-secret",
        true,
        cancel.clone(),
    )
    .await?;
    let options = SystemOptions {
        nats_url: nats_url.clone(),
        nats_auth,
        database_url,
        auth_tokens: format!(
            "{t}:gateway:{}:dev-gateway;{t}:agent,supervisor:{}:dev-agent",
            hash_token(&args.gateway_token),
            hash_token(&args.agent_token),
            t = args.tenant
        ),
        gateways: format!(
            "default={url}|{secret};staff={url}|{secret}",
            url = gateway.url(),
            secret = gateway.secret
        ),
        host: args.host,
        ports: [0, 1, 2, 3].map(|i| args.base_port + i),
        metrics_ports: [0, 1, 2, 3].map(|i| args.metrics_port + i),
        retry_base_ms: 500,
        ingest_http_port: args.http_port,
        wechat_accounts: format!("{}={}", args.tenant, args.wechat_token),
        weibo_apps: String::new(),
        extra_args: Vec::new(),
        notify_args: Vec::new(),
        without_classify: false,
        dispatch_args: Vec::new(),
        classify_args: Vec::new(),
        without_dispatch: false,
    };
    let system = System::start(&options).await?;
    system.wait_ready(&admin_url).await?;

    println!();
    println!(
        "Closedloop is running (Ctrl-C stops it). Tenant {:?}.",
        args.tenant
    );
    println!(
        "  ingest    grpc://{}   closedloop.v1.IngestService",
        system.ingest
    );
    println!(
        "  classify  grpc://{}   closedloop.v1.ClassifyService",
        system.classify
    );
    println!(
        "  dispatch  grpc://{}   closedloop.v1.WorkOrderService",
        system.dispatch
    );
    println!(
        "  notify    grpc://{}   closedloop.v1.NotificationService",
        system.notify
    );
    for (name, addr) in &system.metrics {
        println!("  metrics   http://{addr}/metrics   {name}");
    }
    if nats_auth {
        println!(
            "  nats      {nats_url}   (bus locked: user admin, password {}; closedloop-admin takes them)",
            closedloop_e2e::servers::nats_password("admin")
        );
    } else {
        println!("  nats      {nats_url}");
    }
    println!(
        "  gateway   {} (demo: prints every message a customer would get)",
        gateway.url()
    );
    println!(
        "  tokens    gateway: {}   agent: {}",
        args.gateway_token, args.agent_token
    );
    println!();

    cancel.cancelled().await;
    system.stop().await?;
    Ok(())
}
