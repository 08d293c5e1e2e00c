//! The four services, run in process from their libraries, and [`TestEnv`]: a whole
//! Closedloop on fresh servers for one test.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use closedloop_proto::v1::classify_service_client::ClassifyServiceClient;
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::notification_service_client::NotificationServiceClient;
use closedloop_proto::v1::work_order_service_client::WorkOrderServiceClient;
use closedloop_runtime::auth::hash_token;
use closedloop_runtime::bus;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::servers::{NatsServer, Postgres};
use crate::wait_until;
use crate::webhook::WebhookReceiver;

/// Durable consumers in pipeline order, as (stream, durable).
pub const CONSUMERS: [(&str, &str); 8] = [
    (bus::COMPLAINTS_STREAM, closedloop_classify::CONSUMER),
    (bus::COMPLAINTS_STREAM, closedloop_notify::WATCHDOG_CONSUMER),
    (bus::FEEDBACK_STREAM, closedloop_dispatch::FEEDBACK_CONSUMER),
    (bus::COMPLAINTS_STREAM, closedloop_dispatch::CLASSIFIED_CONSUMER),
    (bus::COMPLAINTS_STREAM, closedloop_notify::CLASSIFIED_CONSUMER),
    (bus::WORK_ORDERS_STREAM, closedloop_notify::WORK_ORDER_CONSUMER),
    (bus::INCIDENTS_STREAM, closedloop_notify::INCIDENT_CONSUMER),
    (bus::NOTIFICATIONS_STREAM, closedloop_notify::LOG_CONSUMER),
];

/// Where the services connect and listen.
#[derive(Debug, Clone)]
pub struct SystemOptions {
    /// Without credentials: see `nats_auth`.
    pub nats_url: String,
    /// Each service connects as its own user of `deploy/nats-auth.conf`, with the password
    /// the harness's nats-server gives it ([`crate::servers::nats_password`]).
    pub nats_auth: bool,
    pub database_url: String,
    /// `CLOSEDLOOP_AUTH_TOKENS` syntax.
    pub auth_tokens: String,
    /// `CLOSEDLOOP_GATEWAYS` syntax.
    pub gateways: String,
    pub host: IpAddr,
    /// Ports for ingest, classify, dispatch, notify; 0 picks free ones.
    pub ports: [u16; 4],
    /// `/metrics` ports for ingest, classify, dispatch, notify; 0 picks free ones.
    pub metrics_ports: [u16; 4],
    /// First redelivery delay after a transient failure.
    pub retry_base_ms: u64,
    /// Port of ingest's HTTP listener (JSON and WeChat); 0 picks a free one.
    pub ingest_http_port: u16,
    /// `CLOSEDLOOP_WECHAT_ACCOUNTS` syntax.
    pub wechat_accounts: String,
    /// `CLOSEDLOOP_WEIBO_APPS` syntax.
    pub weibo_apps: String,
    /// Further flags for every service (e.g. `--stream-max-bytes`).
    pub extra_args: Vec<String>,
    /// Further flags for notify only (e.g. `--first-response-secs`).
    pub notify_args: Vec<String>,
    /// Further flags for classify only (e.g. `--model-file`).
    pub classify_args: Vec<String>,
    /// Leave classify out (start it later with [`System::start_classify`]).
    pub without_classify: bool,
    /// Further flags for dispatch only (e.g. `--policy`).
    pub dispatch_args: Vec<String>,
    /// Leave dispatch out (tests start [`DispatchReplica`]s instead).
    pub without_dispatch: bool,
}

/// The four services running in this process.
pub struct System {
    pub ingest: SocketAddr,
    /// Ingest's HTTP listener.
    pub ingest_http: SocketAddr,
    /// `/metrics` of each service, by name.
    pub metrics: Vec<(&'static str, SocketAddr)>,
    pub classify: SocketAddr,
    pub dispatch: SocketAddr,
    pub notify: SocketAddr,
    cancel: CancellationToken,
    tasks: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
    options: SystemOptions,
}

impl SystemOptions {
    /// The four services as separate processes, as docker-compose.yml runs them (one worker
    /// thread each, each logging in to NATS as its own user), on free loopback ports, with
    /// `auth_tokens` and every message sent to `gateways`.
    pub fn processes(
        nats_url: String,
        database_url: String,
        auth_tokens: String,
        gateways: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            nats_url,
            nats_auth: true,
            database_url,
            auth_tokens,
            gateways,
            host: "127.0.0.1".parse()?,
            ports: [
                crate::free_port()?,
                crate::free_port()?,
                crate::free_port()?,
                crate::free_port()?,
            ],
            metrics_ports: [
                crate::free_port()?,
                crate::free_port()?,
                crate::free_port()?,
                crate::free_port()?,
            ],
            retry_base_ms: 500,
            ingest_http_port: crate::free_port()?,
            wechat_accounts: String::new(),
            weibo_apps: String::new(),
            extra_args: vec!["--worker-threads".into(), "1".into()],
            notify_args: Vec::new(),
            without_classify: false,
            dispatch_args: Vec::new(),
            classify_args: Vec::new(),
            without_dispatch: false,
        })
    }
}

/// One of the four services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingest,
    Classify,
    Dispatch,
    Notify,
}

impl Service {
    pub const ALL: [Service; 4] = [Self::Ingest, Self::Classify, Self::Dispatch, Self::Notify];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Classify => "classify",
            Self::Dispatch => "dispatch",
            Self::Notify => "notify",
        }
    }

    /// Its command line under `options`, program name first: what [`System::start`] parses
    /// in process, and what a benchmark passes to the service's own binary.
    pub fn command_line(self, options: &SystemOptions) -> Vec<String> {
        match self {
            Self::Ingest => {
                let mut args = args(options, 0, false);
                args.extend([
                    "--http-listen".to_owned(),
                    SocketAddr::new(options.host, options.ingest_http_port).to_string(),
                    "--wechat-accounts".to_owned(),
                    options.wechat_accounts.clone(),
                    "--weibo-apps".to_owned(),
                    options.weibo_apps.clone(),
                ]);
                args
            }
            Self::Classify => {
                let mut args = args(options, 1, false);
                args.extend(options.classify_args.iter().cloned());
                args
            }
            Self::Dispatch => {
                let mut args = args(options, 2, true);
                args.extend(options.dispatch_args.iter().cloned());
                args
            }
            Self::Notify => {
                let mut args = args(options, 3, true);
                args.extend(["--gateways".to_owned(), options.gateways.clone()]);
                args.extend(options.notify_args.iter().cloned());
                args
            }
        }
    }
}

fn args(options: &SystemOptions, service: usize, with_database: bool) -> Vec<String> {
    let port = options.ports[service];
    let user = Service::ALL[service].name();
    let mut args = vec![
        "closedloop".to_owned(),
        "--metrics-listen".to_owned(),
        SocketAddr::new(options.host, options.metrics_ports[service]).to_string(),
        "--listen".to_owned(),
        SocketAddr::new(options.host, port).to_string(),
        "--nats-url".to_owned(),
        options.nats_url.clone(),
        "--auth-tokens".to_owned(),
        options.auth_tokens.clone(),
        "--retry-base-ms".to_owned(),
        options.retry_base_ms.to_string(),
    ];
    if options.nats_auth {
        args.extend([
            "--nats-user".to_owned(),
            user.to_owned(),
            "--nats-password".to_owned(),
            crate::servers::nats_password(user),
        ]);
    }
    if with_database {
        args.extend(["--database-url".to_owned(), options.database_url.clone()]);
    }
    args.extend(options.extra_args.iter().cloned());
    args
}

/// Waits until these durable consumers exist: the services that own them have started.
pub async fn wait_for_consumers(nats_url: &str, consumers: &[(&str, &str)]) -> anyhow::Result<()> {
    let client = crate::nats(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    wait_until("durable consumers to exist", Duration::from_secs(30), || {
        let js = js.clone();
        async move {
            for (stream, durable) in consumers {
                let Ok(stream) = js.get_stream(*stream).await else {
                    return false;
                };
                if stream.consumer_info(*durable).await.is_err() {
                    return false;
                }
            }
            true
        }
    })
    .await
}

impl System {
    /// Builds all four services (connect, migrate, bind) and runs them.
    pub async fn start(options: &SystemOptions) -> anyhow::Result<Self> {
        let cancel = CancellationToken::new();

        let ingest_config = closedloop_ingest::Config::try_parse_from(Service::Ingest.command_line(options))?;
        let notify_config = closedloop_notify::Config::try_parse_from(Service::Notify.command_line(options))?;

        let ingest = closedloop_ingest::Ingest::build(ingest_config, &cancel)
            .await
            .context("ingest")?;
        let dispatch = if options.without_dispatch {
            None
        } else {
            let config =
                closedloop_dispatch::Config::try_parse_from(Service::Dispatch.command_line(options))?;
            Some(
                closedloop_dispatch::Dispatch::build(config, &cancel)
                    .await
                    .context("dispatch")?,
            )
        };
        let notify = closedloop_notify::Notify::build(notify_config, &cancel)
            .await
            .context("notify")?;

        let mut system = Self {
            ingest: ingest.grpc_addr()?,
            ingest_http: ingest.http_addr()?,
            classify: SocketAddr::new(options.host, options.ports[1]),
            dispatch: SocketAddr::new(options.host, options.ports[2]),
            notify: notify.grpc_addr()?,
            metrics: vec![
                ("ingest", ingest.metrics_addr()?),
                ("notify", notify.metrics_addr()?),
            ],
            tasks: vec![
                ("ingest", tokio::spawn(ingest.run(cancel.clone()))),
                ("notify", tokio::spawn(notify.run(cancel.clone()))),
            ],
            cancel,
            options: options.clone(),
        };
        if let Some(dispatch) = dispatch {
            system.dispatch = dispatch.grpc_addr()?;
            system.metrics.push(("dispatch", dispatch.metrics_addr()?));
            system
                .tasks
                .push(("dispatch", tokio::spawn(dispatch.run(system.cancel.clone()))));
        }
        if !options.without_classify {
            system.start_classify().await?;
        }
        Ok(system)
    }

    /// Starts classify (when the system was started without it).
    pub async fn start_classify(&mut self) -> anyhow::Result<()> {
        let config =
            closedloop_classify::Config::try_parse_from(Service::Classify.command_line(&self.options))?;
        let classify = closedloop_classify::Classify::build(config, &self.cancel)
            .await
            .context("classify")?;
        self.classify = classify.grpc_addr()?;
        self.metrics.push(("classify", classify.metrics_addr()?));
        self.tasks
            .push(("classify", tokio::spawn(classify.run(self.cancel.clone()))));
        Ok(())
    }

    /// The services whose task has ended before being told to stop.
    pub fn exited(&self) -> Vec<&'static str> {
        self.tasks
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(name, _)| *name)
            .collect()
    }

    /// The options it was started with (for further replicas).
    pub fn options(&self) -> &SystemOptions {
        &self.options
    }

    /// The durable consumers of the services that run.
    pub fn consumers(&self) -> Vec<(&'static str, &'static str)> {
        let classify_runs = self.tasks.iter().any(|(name, _)| *name == "classify");
        CONSUMERS
            .into_iter()
            .filter(|(_, durable)| classify_runs || *durable != closedloop_classify::CONSUMER)
            .collect()
    }

    /// Waits until every service's durable consumers exist, so the pipeline is complete.
    pub async fn wait_ready(&self, nats_url: &str) -> anyhow::Result<()> {
        // Dispatch replicas a test starts itself create theirs when they start.
        let dispatch_consumers = [
            closedloop_dispatch::CLASSIFIED_CONSUMER,
            closedloop_dispatch::FEEDBACK_CONSUMER,
        ];
        let consumers: Vec<_> = self
            .consumers()
            .into_iter()
            .filter(|(_, durable)| !(self.options.without_dispatch && dispatch_consumers.contains(durable)))
            .collect();
        wait_for_consumers(nats_url, &consumers).await
    }

    /// Stops all services gracefully and reports the first failure.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let mut first_error = None;
        for (name, task) in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    first_error.get_or_insert(error.context(name));
                }
                Err(join) => {
                    first_error.get_or_insert(anyhow::anyhow!("{name} panicked: {join}"));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// A dispatch replica on a runtime of its own, so a test can run several and stop one
/// abruptly: [`DispatchReplica::kill`] drops all its tasks at once, as a crash would (no
/// drain; open transactions roll back; unacked messages are redelivered).
pub struct DispatchReplica {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    cancel: CancellationToken,
    done: tokio::sync::oneshot::Receiver<anyhow::Result<()>>,
}

impl DispatchReplica {
    pub async fn start(options: &SystemOptions) -> anyhow::Result<Self> {
        let mut options = options.clone();
        options.ports[2] = 0;
        options.metrics_ports[2] = 0;
        let config = closedloop_dispatch::Config::try_parse_from(Service::Dispatch.command_line(&options))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let cancel = CancellationToken::new();
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let stop = cancel.clone();
        runtime.spawn(async move {
            let result = async {
                let dispatch = closedloop_dispatch::Dispatch::build(config, &stop).await?;
                let _ = addr_tx.send(dispatch.grpc_addr()?);
                dispatch.run(stop).await
            }
            .await;
            let _ = done_tx.send(result);
        });
        let mut replica = Self {
            addr: SocketAddr::new(options.host, 0),
            runtime: Some(runtime),
            cancel,
            done,
        };
        match addr_rx.await {
            Ok(addr) => replica.addr = addr,
            Err(_) => {
                let reason = (&mut replica.done).await;
                anyhow::bail!("dispatch replica did not start: {reason:?}");
            }
        }
        Ok(replica)
    }

    pub async fn client(&self) -> anyhow::Result<WorkOrderServiceClient<Channel>> {
        Ok(WorkOrderServiceClient::new(TestEnv::channel(self.addr).await?))
    }

    /// Stops it as a crash would.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Stops it gracefully and reports how its run ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let result = (&mut self.done).await?;
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        result
    }
}

impl Drop for DispatchReplica {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which async tests must not do.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The WeChat callback token of tenant `acme` in the test environment (plain mode).
pub const WECHAT_TOKEN: &str = "wechat-callback-token";
/// Tenant `beta`'s official account, in safe mode: callback token, AppID and
/// EncodingAESKey.
pub const WECHAT_SAFE_TOKEN: &str = "wechat-safe-token";
pub const WECHAT_APP_ID: &str = "wx0b1c2d3e4f5a6b7c";
pub const WECHAT_AES_KEY: &str = "kWxPd2tyvBJ7uEzQ3hY8gRfNmC5aLs0T9jX4eV6bU1G";
/// The app secret tenant acme's Weibo pushes are signed with, in [`TestEnv`].
pub const WEIBO_PUSH_SECRET: &str = "weibo-app-secret-acme";

/// Tokens the test environment configures.
pub struct TestTokens {
    /// Tenant `acme`, a channel gateway.
    pub gateway: String,
    /// Tenant `acme`, an agent named `agent-7`.
    pub agent: String,
    /// Tenant `beta`, gateway and agent.
    pub other_tenant: String,
    /// Tenant `acme`, a supervisor named `sup-1`.
    pub supervisor: String,
}

/// A whole Closedloop on fresh servers: its own nats-server, its own database.
pub struct TestEnv {
    pub nats: NatsServer,
    pub database_url: String,
    pub webhook: WebhookReceiver,
    pub system: System,
    pub tokens: TestTokens,
    receiver_stop: CancellationToken,
}

impl TestEnv {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestEnv::start`], with the options adjusted by `adjust` first.
    pub async fn start_with(adjust: impl FnOnce(&mut SystemOptions)) -> anyhow::Result<Self> {
        install_telemetry();
        let nats = NatsServer::start()?;
        // Every stream exists from the start, as an operator would have them: a test may
        // leave out the service that provisions some (dispatch, say), whose consumers would
        // otherwise wait for it.
        let provisioning = CancellationToken::new();
        closedloop_runtime::bus::Bus::connect(
            &closedloop_runtime::config::NatsConnectArgs::url(nats.url()),
            "harness",
            &provisioning,
        )
        .await?
        .provision(&crate::servers::harness_streams())
        .await?;
        let database_url = Postgres::shared()?.create_database().await?;
        let receiver_stop = CancellationToken::new();
        let webhook = WebhookReceiver::start(
            "127.0.0.1:0".parse()?,
            "test-gateway-secret",
            false,
            receiver_stop.clone(),
        )
        .await?;
        let tokens = TestTokens {
            gateway: format!("gw-{}", uuid::Uuid::new_v4()),
            agent: format!("agent-{}", uuid::Uuid::new_v4()),
            other_tenant: format!("beta-{}", uuid::Uuid::new_v4()),
            supervisor: format!("sup-{}", uuid::Uuid::new_v4()),
        };
        let mut options = SystemOptions {
            nats_url: nats.service_url(),
            nats_auth: true,
            database_url: database_url.clone(),
            auth_tokens: format!(
                "acme:gateway:{}:gateway-1;acme:agent:{}:agent-7;beta:gateway,agent:{}:beta-desk;\
                 acme:supervisor:{}:sup-1",
                hash_token(&tokens.gateway),
                hash_token(&tokens.agent),
                hash_token(&tokens.other_tenant),
                hash_token(&tokens.supervisor)
            ),
            gateways: format!(
                "default={url}|{secret};staff={url}|{secret}",
                url = webhook.url(),
                secret = webhook.secret
            ),
            host: "127.0.0.1".parse()?,
            ports: [0; 4],
            metrics_ports: [0; 4],
            retry_base_ms: 100,
            ingest_http_port: 0,
            wechat_accounts: format!(
                "acme={WECHAT_TOKEN};beta={WECHAT_SAFE_TOKEN}|{WECHAT_APP_ID}|{WECHAT_AES_KEY}"
            ),
            weibo_apps: format!("acme={WEIBO_PUSH_SECRET}"),
            extra_args: Vec::new(),
            // The watchdog runs in every test (shortened), so every test also shows it never
            // sends a second first reply.
            notify_args: vec!["--first-response-secs".into(), "1".into()],
            without_classify: false,
            dispatch_args: Vec::new(),
            classify_args: Vec::new(),
            without_dispatch: false,
        };
        adjust(&mut options);
        let system = System::start(&options).await?;
        system.wait_ready(&nats.url()).await?;
        Ok(Self {
            nats,
            database_url,
            webhook,
            system,
            tokens,
            receiver_stop,
        })
    }

    pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{addr}"))?.connect().await?)
    }

    pub async fn ingest(&self) -> anyhow::Result<IngestServiceClient<Channel>> {
        Ok(IngestServiceClient::new(Self::channel(self.system.ingest).await?))
    }
    pub async fn classify(&self) -> anyhow::Result<ClassifyServiceClient<Channel>> {
        Ok(ClassifyServiceClient::new(
            Self::channel(self.system.classify).await?,
        ))
    }
    pub async fn work_orders(&self) -> anyhow::Result<WorkOrderServiceClient<Channel>> {
        Ok(WorkOrderServiceClient::new(
            Self::channel(self.system.dispatch).await?,
        ))
    }
    /// Every work order `token` may list, following page tokens `page_size` at a time.
    pub async fn list_work_orders(
        &self,
        token: &str,
        page_size: i32,
        include_archived: bool,
    ) -> anyhow::Result<Vec<closedloop_proto::v1::WorkOrder>> {
        list_work_orders(&mut self.work_orders().await?, token, page_size, include_archived).await
    }

    pub async fn notifications(&self) -> anyhow::Result<NotificationServiceClient<Channel>> {
        Ok(NotificationServiceClient::new(
            Self::channel(self.system.notify).await?,
        ))
    }

    /// Waits until nothing is in flight: every consumer has nothing pending or unacked and
    /// dispatch has published every event it committed. Checked in pipeline order, twice, so
    /// work cannot slip past the check.
    pub async fn wait_idle(&self) -> anyhow::Result<()> {
        let client = crate::nats(&self.nats.url()).await?;
        let js = async_nats::jetstream::new(client);
        let pool = sqlx::PgPool::connect(&self.database_url).await?;
        let idle_once = || async {
            for (stream, durable) in self.system.consumers() {
                let Ok(stream) = js.get_stream(stream).await else {
                    return false;
                };
                match stream.consumer_info(durable).await {
                    Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
                    _ => return false,
                }
                if durable == closedloop_dispatch::CLASSIFIED_CONSUMER {
                    let unpublished: Result<i64, _> =
                        sqlx::query_scalar("SELECT events FROM dispatch.unpublished_events")
                            .fetch_one(&pool)
                            .await;
                    if unpublished.map_or(true, |n| n > 0) {
                        return false;
                    }
                }
            }
            true
        };
        wait_until("the pipeline to be idle", Duration::from_secs(30), || async {
            idle_once().await && idle_once().await
        })
        .await
    }

    /// Submits a complaint as tenant `acme`'s gateway.
    pub async fn submit(
        &self,
        submission: closedloop_proto::v1::ComplaintSubmission,
    ) -> Result<closedloop_proto::v1::SubmitComplaintResponse, tonic::Status> {
        let mut ingest = self
            .ingest()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let request = closedloop_proto::v1::SubmitComplaintRequest {
            complaint: Some(submission),
        };
        Ok(ingest
            .submit_complaint(authed(&self.tokens.gateway, request))
            .await?
            .into_inner())
    }

    /// The work order handling a complaint, waiting until dispatch has one.
    pub async fn work_order_for(
        &self,
        complaint_id: &str,
    ) -> anyhow::Result<closedloop_proto::v1::WorkOrder> {
        let work_orders = self.work_orders().await?;
        crate::wait_for("the work order to exist", Duration::from_secs(30), || {
            let mut client = work_orders.clone();
            let request = authed(
                &self.tokens.agent,
                closedloop_proto::v1::GetComplaintStatusRequest {
                    complaint_id: complaint_id.into(),
                },
            );
            async move {
                client
                    .get_complaint_status(request)
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().work_order)
            }
        })
        .await
    }

    /// Resolves `work_order` as tenant `acme`'s agent, with `note`; returns it resolved.
    pub async fn resolve(
        &self,
        work_order: &closedloop_proto::v1::WorkOrder,
        note: &str,
    ) -> anyhow::Result<closedloop_proto::v1::WorkOrder> {
        let request = closedloop_proto::v1::ResolveWorkOrderRequest {
            work_order_id: work_order.work_order_id.clone(),
            resolution_note: note.into(),
            expected_version: work_order.version,
            ..Default::default()
        };
        self.work_orders()
            .await?
            .resolve_work_order(authed(&self.tokens.agent, request))
            .await?
            .into_inner()
            .work_order
            .ok_or_else(|| anyhow::anyhow!("no work order in the answer"))
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        let stopped = self.system.stop().await;
        self.receiver_stop.cancel();
        stopped
    }
}

/// The services' telemetry, once per test process: spans carry trace context (so tests can
/// check `traceparent` crosses NATS); logs are off unless `CLOSEDLOOP_TEST_LOG` gives a
/// filter, e.g. `CLOSEDLOOP_TEST_LOG=info`.
fn install_telemetry() {
    use closedloop_runtime::config::{LogFormat, TelemetryArgs};
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let args = TelemetryArgs {
            log_format: LogFormat::Pretty,
            log_filter: std::env::var("CLOSEDLOOP_TEST_LOG").unwrap_or_else(|_| "off".into()),
            otlp_endpoint: None,
        };
        match closedloop_runtime::telemetry::init("tests", &args) {
            // No exporter: nothing to flush, so the guard may live for the whole process.
            Ok(guard) => std::mem::forget(guard),
            Err(error) => eprintln!("telemetry not installed: {error}"),
        }
    });
}

/// Every work order `token` may list through `client`, following page tokens `page_size` at
/// a time.
pub async fn list_work_orders(
    client: &mut WorkOrderServiceClient<Channel>,
    token: &str,
    page_size: i32,
    include_archived: bool,
) -> anyhow::Result<Vec<closedloop_proto::v1::WorkOrder>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = closedloop_proto::v1::ListWorkOrdersRequest {
            page_size,
            page_token,
            include_archived,
            ..Default::default()
        };
        let page = client
            .list_work_orders(authed(token, request))
            .await?
            .into_inner();
        all.extend(page.work_orders);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

/// A contact as a gateway submits it: `text` on `channel`, from a poster with `followers`.
pub fn contact(
    channel: closedloop_proto::v1::Channel,
    message_id: &str,
    poster_id: &str,
    followers: i64,
    text: &str,
) -> closedloop_proto::v1::ComplaintSubmission {
    closedloop_proto::v1::ComplaintSubmission {
        channel: channel as i32,
        channel_message_id: message_id.to_owned(),
        poster: Some(closedloop_proto::v1::Poster {
            poster_id: poster_id.to_owned(),
            followers,
            ..Default::default()
        }),
        text: text.to_owned(),
        ..Default::default()
    }
}

pub use closedloop_runtime::auth::authed;

/// The status of a call that must fail with `code`; `why` names the refusal in the error
/// when the call succeeds or fails otherwise.
pub fn refused<T>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    why: &str,
) -> anyhow::Result<tonic::Status> {
    match result {
        Ok(_) => anyhow::bail!("{why}: the call succeeded where {code:?} was expected"),
        Err(status) if status.code() == code => Ok(status),
        Err(status) => anyhow::bail!("{why}: expected {code:?}, got {status:?}"),
    }
}

/// One work order as `token` reads it through `client`.
pub async fn get_work_order(
    client: &mut WorkOrderServiceClient<Channel>,
    token: &str,
    id: &str,
) -> anyhow::Result<closedloop_proto::v1::WorkOrder> {
    let request = closedloop_proto::v1::GetWorkOrderRequest {
        work_order_id: id.to_owned(),
    };
    client
        .get_work_order(authed(token, request))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order in the answer"))
}

/// Polls a work order for up to a minute until `done` holds for it, and returns it.
pub async fn wait_work_order(
    client: &WorkOrderServiceClient<Channel>,
    token: &str,
    id: &str,
    what: &str,
    done: fn(&closedloop_proto::v1::WorkOrder) -> bool,
) -> anyhow::Result<closedloop_proto::v1::WorkOrder> {
    crate::wait_for(what, Duration::from_secs(60), || {
        let mut client = client.clone();
        let (token, id) = (token.to_owned(), id.to_owned());
        async move { get_work_order(&mut client, &token, &id).await.ok().filter(done) }
    })
    .await
}
