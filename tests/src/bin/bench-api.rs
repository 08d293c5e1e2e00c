//! `bench-api`: the agent-facing API at a million work orders, beside the same queries run
//! directly on PostgreSQL in the same run.
//!
//! The four services run as their own processes (release builds) with nats-server and a
//! durable PostgreSQL on this machine, as `bench-loop` runs them. Steps:
//! 1. the loop's maximum completed rate on an empty database (`--max-complaints` flat out);
//! 2. `--work-orders` work orders loaded over two tenants and `--teams-per-tenant` teams
//!    each, with their history, follow-up links and delivery logs: realistic states,
//!    priorities, SLA states (consistent with their deadlines, so the SLA watcher has only
//!    what time brings) and ages up to the default retention age of 90 days (what the hot
//!    tables hold with archiving on; older work would be in the archive tables);
//! 3. the loop's maximum completed rate again, at that size;
//! 4. the API phase: `--clients` concurrent agent desks, each on its own connection, for
//!    `--phase-secs`: `ListWorkOrders` by team and state paged with page tokens to the last
//!    page, `GetWorkOrder`, `GetComplaintStatus`, `GetWorkOrderHistory`, `ListDeliveries`
//!    by work order, `AcceptWorkOrder` and `ResolveWorkOrder`; `--watchers`
//!    `WatchWorkOrders` streams; while the loop ingests `--ingest-rate` complaints a second;
//! 5. the direct phase: the same desks, the same mix, the same ingest, but each call is the
//!    store function behind the RPC (its SQL and row decoding) on a pool configured as the
//!    service's: the raw cost of the query, which each RPC's latency is divided by;
//! 6. `EXPLAIN ANALYZE` of every read at this size, checked for sequential scans, and the
//!    tables' sizes per work order.
//!
//! The first 5 s of each desk phase are not counted: the pools open their connections
//! then, and a new PostgreSQL backend's first queries fill its catalog caches.
//!
//! Prints tables; writes `bench-api.json` and `bench-api.svg` to `--out`.
//! `scripts/bench.sh api` builds what it needs and runs it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use closedloop_dispatch::lifecycle::Action;
use closedloop_dispatch::store::{self as work_order_store, Change, ListFilter, Lookup, Tier};
use closedloop_e2e::bench::{self, BenchServers, LoopUnderTest, Mix, Workload, millis, quantile, table};
use closedloop_e2e::drive;
use closedloop_e2e::system::authed;
use closedloop_notify::store as delivery_store;
use closedloop_proto::v1::notification_service_client::NotificationServiceClient;
use closedloop_proto::v1::work_order_service_client::WorkOrderServiceClient;
use closedloop_proto::v1::*;
use closedloop_runtime::auth::hash_token;
use closedloop_runtime::config::{DatabaseArgs, Secret};
use closedloop_runtime::db;
use serde_json::json;
use sqlx::{PgPool, Postgres as Pg, QueryBuilder};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel as GrpcChannel;
use uuid::Uuid;

const TENANTS: [&str; 2] = ["acme", "globex"];
/// Rows per loading statement.
const LOAD_CHUNK: usize = 50_000;
/// What a page of `ListWorkOrders` and `ListDeliveries` holds.
const PAGE: u32 = 50;
/// The start of each phase that is not counted (see `Calls::warm_until`); the phase runs
/// this much longer.
const WARM_UP: Duration = Duration::from_secs(5);

/// Pool size of the direct phase: the services' default (`CLOSEDLOOP_DATABASE_MAX_CONNECTIONS`).
const SERVICE_POOL: u32 = 10;

#[derive(Debug, Parser)]
struct Args {
    /// Work orders to load.
    #[arg(long, default_value_t = 1_000_000)]
    work_orders: usize,
    /// Teams in each of the two tenants (the routing rules' teams, then queues).
    #[arg(long, default_value_t = 25)]
    teams_per_tenant: usize,
    #[arg(long, default_value_t = 8)]
    agents_per_team: usize,
    /// Concurrent agent desks in the API and direct phases.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Mean pause of a desk between calls (uniform from 0 to twice this), in milliseconds:
    /// desks are people clicking, not a closed loop at full speed.
    #[arg(long, default_value_t = 1_000)]
    think_ms: u64,
    /// `WatchWorkOrders` streams during the API phase.
    #[arg(long, default_value_t = 50)]
    watchers: usize,
    /// Complaints per second the loop ingests during the API and direct phases.
    #[arg(long, default_value_t = 500.0)]
    ingest_rate: f64,
    /// Length of the API phase and of the direct phase.
    #[arg(long, default_value_t = 60.0)]
    phase_secs: f64,
    /// Complaints of each maximum-rate measurement.
    #[arg(long, default_value_t = 20_000)]
    max_complaints: usize,
    /// Concurrent callers of the maximum-rate measurements.
    #[arg(long, default_value_t = 128)]
    submitters: usize,
    /// Worker threads of each service (0: one per core).
    #[arg(long, default_value_t = 1)]
    service_worker_threads: usize,
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Where the service binaries are (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// The RPCs the desks call, in the order the tables print them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Rpc {
    ListWorkOrders,
    GetWorkOrder,
    GetComplaintStatus,
    GetWorkOrderHistory,
    ListDeliveries,
    AcceptWorkOrder,
    ResolveWorkOrder,
}

impl Rpc {
    const ALL: [Rpc; 7] = [
        Rpc::ListWorkOrders,
        Rpc::GetWorkOrder,
        Rpc::GetComplaintStatus,
        Rpc::GetWorkOrderHistory,
        Rpc::ListDeliveries,
        Rpc::AcceptWorkOrder,
        Rpc::ResolveWorkOrder,
    ];

    fn name(self) -> &'static str {
        match self {
            Rpc::ListWorkOrders => "ListWorkOrders (team, state; each page)",
            Rpc::GetWorkOrder => "GetWorkOrder",
            Rpc::GetComplaintStatus => "GetComplaintStatus",
            Rpc::GetWorkOrderHistory => "GetWorkOrderHistory",
            Rpc::ListDeliveries => "ListDeliveries (work order)",
            Rpc::AcceptWorkOrder => "AcceptWorkOrder",
            Rpc::ResolveWorkOrder => "ResolveWorkOrder",
        }
    }

    fn is_read(self) -> bool {
        !matches!(self, Rpc::AcceptWorkOrder | Rpc::ResolveWorkOrder)
    }

    /// What a desk does next: a listing session (all its pages) a fifth of the time, the
    /// rest single calls in the shares an agent's day has them.
    fn pick(roll: u64) -> Rpc {
        match roll % 100 {
            0..20 => Rpc::ListWorkOrders,
            20..42 => Rpc::GetWorkOrder,
            42..60 => Rpc::GetComplaintStatus,
            60..75 => Rpc::GetWorkOrderHistory,
            75..88 => Rpc::ListDeliveries,
            88..94 => Rpc::AcceptWorkOrder,
            _ => Rpc::ResolveWorkOrder,
        }
    }
}

/// Listing filters a desk pages through: the open queues and recent resolutions.
const LISTED_STATES: [WorkOrderState; 4] = [
    WorkOrderState::Assigned,
    WorkOrderState::InProgress,
    WorkOrderState::PendingCustomer,
    WorkOrderState::Resolved,
];

/// A loaded work order a call may name.
#[derive(Clone)]
struct Known {
    tenant: usize,
    work_order_id: String,
    complaint_id: String,
}

/// What the desks call with: loaded ids, and work orders waiting to be accepted or
/// resolved (each taken once, so every Accept and Resolve is a real transition).
struct Targets {
    known: Vec<Known>,
    linked_complaints: Vec<(usize, String)>,
    to_accept: Vec<Mutex<Vec<String>>>,
    to_resolve: Vec<Mutex<Vec<String>>>,
    teams: Vec<String>,
}

impl Targets {
    fn take(queue: &Mutex<Vec<String>>) -> Option<String> {
        queue.lock().ok()?.pop()
    }

    fn give(queue: &Mutex<Vec<String>>, id: String) {
        if let Ok(mut queue) = queue.lock() {
            queue.push(id);
        }
    }
}

/// Latencies and failures of each RPC in one phase.
#[derive(Default)]
struct Calls {
    took: HashMap<Rpc, Vec<Duration>>,
    failed: HashMap<Rpc, usize>,
    /// Calls started before this are not counted: connections are still being opened and
    /// each new PostgreSQL backend fills its catalog caches on its first queries.
    warm_until: Option<Instant>,
}

impl Calls {
    fn record<T, E: std::fmt::Display>(
        &mut self,
        rpc: Rpc,
        started: Instant,
        result: Result<T, E>,
    ) -> Option<T> {
        match result {
            Ok(value) => {
                if self.warm_until.is_none_or(|warm| started >= warm) {
                    self.took.entry(rpc).or_default().push(started.elapsed());
                }
                Some(value)
            }
            Err(error) => {
                let failed = self.failed.entry(rpc).or_default();
                if *failed < 3 {
                    eprintln!("  {} failed: {error}", rpc.name());
                }
                *failed += 1;
                None
            }
        }
    }

    fn merge(&mut self, other: Calls) {
        for (rpc, took) in other.took {
            self.took.entry(rpc).or_default().extend(took);
        }
        for (rpc, failed) in other.failed {
            *self.failed.entry(rpc).or_default() += failed;
        }
    }

    /// p50, p99, max of `rpc`, sorted in place.
    fn percentiles(&mut self, rpc: Rpc) -> [Option<Duration>; 3] {
        let took = self.took.entry(rpc).or_default();
        took.sort();
        [quantile(took, 0.5), quantile(took, 0.99), took.last().copied()]
    }
}

/// A desk's clients of dispatch and notify, each on its own connection, and its token.
struct ApiDesk {
    work_orders: WorkOrderServiceClient<GrpcChannel>,
    notifications: NotificationServiceClient<GrpcChannel>,
    token: String,
}

/// How one desk reaches the work orders: through the API, or straight to the stores.
enum Desk {
    Api(Box<ApiDesk>),
    Direct {
        dispatch: work_order_store::Db,
        notify: PgPool,
        name: String,
    },
}

/// A small deterministic generator per desk (splitmix64).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

impl Desk {
    async fn list_page(
        &mut self,
        tenant: &str,
        filter: &ListFilter,
        page_token: String,
    ) -> anyhow::Result<String> {
        match self {
            Desk::Api(desk) => {
                let ApiDesk {
                    work_orders, token, ..
                } = desk.as_mut();
                let request = ListWorkOrdersRequest {
                    team: filter.team.clone().unwrap_or_default(),
                    state: filter.state.map_or(0, |s| s as i32),
                    page_size: PAGE as i32,
                    page_token,
                    ..Default::default()
                };
                let page = work_orders
                    .list_work_orders(authed(token, request))
                    .await?
                    .into_inner();
                Ok(page.next_page_token)
            }
            Desk::Direct { dispatch, .. } => {
                let (_, next) = db::list_page(&dispatch.pool, tenant, filter, PAGE, &page_token).await?;
                Ok(next)
            }
        }
    }

    async fn call(&mut self, rpc: Rpc, tenant: &str, target: &Known) -> anyhow::Result<()> {
        let id = target.work_order_id.clone();
        match self {
            Desk::Api(desk) => {
                let ApiDesk {
                    work_orders,
                    notifications,
                    token,
                } = desk.as_mut();
                match rpc {
                    Rpc::GetWorkOrder => {
                        work_orders
                            .get_work_order(authed(token, GetWorkOrderRequest { work_order_id: id }))
                            .await?;
                    }
                    Rpc::GetComplaintStatus => {
                        let request = GetComplaintStatusRequest {
                            complaint_id: target.complaint_id.clone(),
                        };
                        work_orders.get_complaint_status(authed(token, request)).await?;
                    }
                    Rpc::GetWorkOrderHistory => {
                        let request = GetWorkOrderHistoryRequest { work_order_id: id };
                        work_orders.get_work_order_history(authed(token, request)).await?;
                    }
                    Rpc::ListDeliveries => {
                        let request = ListDeliveriesRequest {
                            work_order_id: id,
                            page_size: PAGE as i32,
                            ..Default::default()
                        };
                        notifications.list_deliveries(authed(token, request)).await?;
                    }
                    Rpc::AcceptWorkOrder => {
                        let request = AcceptWorkOrderRequest {
                            work_order_id: id,
                            ..Default::default()
                        };
                        work_orders.accept_work_order(authed(token, request)).await?;
                    }
                    Rpc::ResolveWorkOrder => {
                        let request = ResolveWorkOrderRequest {
                            work_order_id: id,
                            resolution_note: "line card replaced".into(),
                            ..Default::default()
                        };
                        work_orders.resolve_work_order(authed(token, request)).await?;
                    }
                    Rpc::ListWorkOrders => anyhow::bail!("listings go through list_page"),
                }
            }
            Desk::Direct {
                dispatch,
                notify,
                name,
            } => match rpc {
                Rpc::GetWorkOrder => {
                    work_order_store::get(&dispatch.pool, tenant, Lookup::work_order(&id)?).await?;
                }
                Rpc::GetComplaintStatus => {
                    let lookup = Lookup::complaint(&target.complaint_id)?;
                    work_order_store::get(&dispatch.pool, tenant, lookup).await?;
                }
                Rpc::GetWorkOrderHistory => {
                    work_order_store::history(&dispatch.pool, tenant, &id).await?;
                }
                Rpc::ListDeliveries => {
                    let filter = delivery_store::ListFilter {
                        work_order_id: Some(id),
                        ..Default::default()
                    };
                    db::list_page(notify, tenant, &filter, PAGE, "").await?;
                }
                Rpc::AcceptWorkOrder | Rpc::ResolveWorkOrder => {
                    let (action, note) = if rpc == Rpc::AcceptWorkOrder {
                        (Action::Accept, "")
                    } else {
                        (Action::Resolve, "line card replaced")
                    };
                    let change = Change {
                        action,
                        expected_version: 0,
                        actor: name,
                        note,
                    };
                    let assignee = name.clone();
                    work_order_store::apply(dispatch, tenant, &id, change, |wo| {
                        if action == Action::Accept {
                            wo.assignee = assignee;
                        }
                    })
                    .await?;
                }
                Rpc::ListWorkOrders => anyhow::bail!("listings go through list_page"),
            },
        }
        Ok(())
    }
}

/// One desk's calls until `stop`: pick an RPC, call it, record it.
async fn run_desk(
    mut desk: Desk,
    tenant: usize,
    seed: u64,
    think_ms: u64,
    targets: Arc<Targets>,
    warm_until: Instant,
    stop: CancellationToken,
) -> Calls {
    let mut dice = Dice(seed);
    let mut calls = Calls {
        warm_until: Some(warm_until),
        ..Default::default()
    };
    let tenant_name = TENANTS[tenant];
    let mine: Vec<&Known> = targets.known.iter().filter(|k| k.tenant == tenant).collect();
    let linked: Vec<&String> = targets
        .linked_complaints
        .iter()
        .filter(|(t, _)| *t == tenant)
        .map(|(_, id)| id)
        .collect();
    let think = |dice: &mut Dice| Duration::from_millis(dice.next() % (2 * think_ms + 1));
    while !stop.is_cancelled() {
        let rpc = Rpc::pick(dice.next());
        match rpc {
            Rpc::ListWorkOrders => {
                let filter = ListFilter {
                    team: Some(targets.teams[dice.below(targets.teams.len())].clone()),
                    state: Some(LISTED_STATES[dice.below(LISTED_STATES.len())]),
                    ..Default::default()
                };
                let mut page_token = String::new();
                loop {
                    let started = Instant::now();
                    let result = desk.list_page(tenant_name, &filter, page_token).await;
                    match calls.record(rpc, started, result) {
                        Some(next) if !next.is_empty() && !stop.is_cancelled() => page_token = next,
                        _ => break,
                    }
                    tokio::time::sleep(think(&mut dice)).await;
                }
            }
            Rpc::AcceptWorkOrder | Rpc::ResolveWorkOrder => {
                let (from, to) = if rpc == Rpc::AcceptWorkOrder {
                    (&targets.to_accept[tenant], Some(&targets.to_resolve[tenant]))
                } else {
                    (&targets.to_resolve[tenant], None)
                };
                let Some(work_order_id) = Targets::take(from) else {
                    tokio::time::sleep(think(&mut dice)).await;
                    continue;
                };
                let target = Known {
                    tenant,
                    work_order_id: work_order_id.clone(),
                    complaint_id: String::new(),
                };
                let started = Instant::now();
                let result = desk.call(rpc, tenant_name, &target).await;
                if calls.record(rpc, started, result).is_some()
                    && let Some(to) = to
                {
                    Targets::give(to, work_order_id);
                }
                tokio::time::sleep(think(&mut dice)).await;
            }
            _ => {
                let mut target = mine[dice.below(mine.len())].clone();
                // A tenth of the status lookups are for follow-ups attached to a work order.
                if rpc == Rpc::GetComplaintStatus && !linked.is_empty() && dice.below(10) == 0 {
                    target.complaint_id = linked[dice.below(linked.len())].clone();
                }
                let started = Instant::now();
                let result = desk.call(rpc, tenant_name, &target).await;
                calls.record(rpc, started, result);
                tokio::time::sleep(think(&mut dice)).await;
            }
        }
    }
    calls
}

/// The desk tokens of `tenant` (`CLOSEDLOOP_AUTH_TOKENS` entries and the tokens).
fn desk_token(tenant: usize, desk: usize) -> String {
    format!("bench-desk-{}-{desk}", TENANTS[tenant])
}

/// Which tenant desk `n` works for: three in five for the larger one.
fn tenant_of(desk: usize) -> usize {
    usize::from(desk % 5 >= 3)
}

/// The dispatch policy: the built-in routing and SLA targets; in each tenant the rules'
/// teams and then queues up to `teams_per_tenant`, each with `agents_per_team` online
/// agents. Returns the policy and the team names.
fn policy(
    teams_per_tenant: usize,
    agents_per_team: usize,
) -> anyhow::Result<(serde_json::Value, Vec<String>)> {
    let mut policy: serde_json::Value =
        serde_json::from_str(&bench::staffed_policy(TENANTS[0], agents_per_team, true)?)?;
    let directory = policy["directory"][0].clone();
    let skills = directory["teams"][0]["skills"].clone();
    let mut teams: Vec<String> = directory["teams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["team_id"].as_str().map(str::to_owned))
        .collect();
    let mut queue = 1;
    while teams.len() < teams_per_tenant {
        teams.push(format!("queue-{queue:02}"));
        queue += 1;
    }
    let agents: Vec<serde_json::Value> = teams
        .iter()
        .flat_map(|team| {
            let skills = skills.clone();
            (0..agents_per_team).map(move |n| {
                json!({"agent_id": format!("{team}-{n}"), "team_id": team, "skills": skills,
                       "capacity": 1_000, "online": true})
            })
        })
        .collect();
    let team_entries: Vec<serde_json::Value> = teams
        .iter()
        .map(|team| json!({"team_id": team, "skills": skills}))
        .collect();
    policy["directory"] = TENANTS
        .iter()
        .map(|tenant| json!({"tenant": tenant, "teams": team_entries, "agents": agents}))
        .collect();
    // A fresh database has no baseline, so any category and region would look like a spike.
    policy["incidents"]["min_count"] = json!(1_000_000);
    Ok((policy, teams))
}

/// Loads work orders `from..to` with their history, follow-up links and delivery logs, in
/// one statement. States, priorities and ages follow the shares of a busy desk; deadlines
/// follow the default SLA targets; SLA states agree with the deadlines as of now. History
/// rows are loaded as already published (no relay position), as history is.
async fn load_chunk(
    connection: &mut sqlx::PgConnection,
    from: usize,
    to: usize,
    teams: &[String],
    agents_per_team: usize,
) -> anyhow::Result<()> {
    let categories = [
        "outage",
        "network_quality",
        "billing",
        "refund",
        "service_request",
        "plan_change",
        "staff_attitude",
        "delivery",
        "fraud",
        "other",
    ];
    sqlx::query(
        r#"
WITH drawn AS (
    SELECT n, random() AS r_state, random() AS r_age, random() AS r_prio, random() AS r_resp,
           random() AS r_link, random() AS r_tenant
    FROM generate_series($1::bigint, $2::bigint - 1) AS g(n)
), shaped AS (
    SELECT n, r_link, r_resp,
        CASE WHEN r_tenant < 0.6 THEN 'acme' ELSE 'globex' END AS tenant,
        $3::text[] AS teams,
        CASE WHEN r_state < 0.835 THEN 6 WHEN r_state < 0.895 THEN 5 WHEN r_state < 0.935 THEN 2
             WHEN r_state < 0.965 THEN 3 WHEN r_state < 0.985 THEN 4 ELSE 7 END::smallint AS state,
        CASE WHEN r_prio < 0.05 THEN 1 WHEN r_prio < 0.2 THEN 2 WHEN r_prio < 0.7 THEN 3 ELSE 4 END::smallint
            AS priority,
        r_age
    FROM drawn
), aged AS (
    SELECT s.*,
        now() - CASE WHEN s.state IN (2, 3, 4, 7) THEN interval '7 days' * s.r_age * s.r_age
                     WHEN s.state = 5 THEN interval '1 day' + interval '25 days' * s.r_age
                     ELSE interval '3 days' + interval '85 days' * s.r_age END AS created_at,
        CASE s.priority WHEN 1 THEN interval '15 minutes' WHEN 2 THEN interval '30 minutes'
                        WHEN 3 THEN interval '2 hours' ELSE interval '8 hours' END AS first_response,
        CASE s.priority WHEN 1 THEN interval '4 hours' WHEN 2 THEN interval '24 hours'
                        WHEN 3 THEN interval '72 hours' ELSE interval '168 hours' END AS resolution,
        s.teams[(1 + s.n % array_length(s.teams, 1))::int] AS team
    FROM shaped s
), timed AS (
    SELECT a.*,
        a.created_at + a.first_response AS first_response_due,
        a.created_at + a.resolution AS resolution_due,
        a.created_at + a.first_response * 0.8 AS first_response_risk_at,
        a.created_at + a.resolution * 0.8 AS resolution_risk_at,
        CASE WHEN a.state = 2 AND a.r_resp < 0.5 THEN NULL
             ELSE a.created_at + a.first_response * a.r_resp * 0.9 END AS first_responded_at,
        CASE WHEN a.state IN (5, 6) THEN a.created_at + least(a.resolution * 0.7 * a.r_resp, interval '2 days')
             ELSE NULL END AS resolved_at
    FROM aged a
), orders AS (
    SELECT t.*,
        gen_random_uuid() AS work_order_id, gen_random_uuid() AS complaint_id,
        t.team || '-' || (t.n % $4::bigint) AS assignee,
        ($5::text[])[(1 + t.n % array_length($5::text[], 1))::int] AS category,
        CASE t.state WHEN 2 THEN 2 WHEN 3 THEN 3 WHEN 4 THEN 4 WHEN 5 THEN 5 WHEN 6 THEN 6 ELSE 6 END AS version,
        CASE WHEN t.state NOT IN (2, 3, 4, 7) THEN 1
             WHEN (t.first_responded_at IS NULL AND t.first_response_due <= now()) OR t.resolution_due <= now() THEN 3
             WHEN (t.first_responded_at IS NULL AND t.first_response_risk_at <= now())
                  OR t.resolution_risk_at <= now() THEN 2
             ELSE 1 END::smallint AS sla_state
    FROM timed t
), inserted AS (
    INSERT INTO dispatch.work_orders (work_order_id, tenant, complaint_id, state, version, team, assignee,
        category, priority, intent, channel, channel_message_id, poster_id, poster_name, poster_followers,
        summary, locale, created_at, updated_at, first_response_due, resolution_due, resolved_at,
        resolution_note, province, city, influence_tier, sla_state, first_response_risk_at,
        resolution_risk_at, first_responded_at, satisfaction)
    SELECT work_order_id, tenant, complaint_id, state, version, team, assignee, category, priority,
        1, 1 + (n % 6), 'seed-' || n, 'seed-poster-' || (n % 300000), '用户' || (n % 300000),
        (n * 7919) % 20000, '宽带又断网了，已经报修第' || (n % 9 + 1) || '次，师傅还没上门', 'zh-CN',
        created_at, coalesce(resolved_at, created_at), first_response_due, resolution_due, resolved_at,
        CASE WHEN resolved_at IS NULL THEN '' ELSE '已更换光猫，线路恢复' END,
        '广东', '深圳', 1, sla_state, first_response_risk_at, resolution_risk_at, first_responded_at,
        CASE WHEN state = 6 THEN (1 + n % 5)::smallint ELSE 0::smallint END
    FROM orders
    RETURNING work_order_id, tenant, complaint_id, state, version, assignee, poster_id, channel,
        created_at, resolved_at
), history AS (
    INSERT INTO dispatch.work_order_history (work_order_id, version, kind, actor, note, occurred_at,
        written_by, seq)
    SELECT i.work_order_id, v,
        CASE WHEN v = 6 AND i.state = 7 THEN 'reopened'
             ELSE (ARRAY['created', 'assigned', 'accepted', 'replied', 'resolved', 'closed'])[v] END,
        CASE WHEN v IN (1, 2, 6) THEN 'dispatch' ELSE i.assignee END,
        CASE WHEN v = 4 THEN '您好，师傅已在路上，预计两小时内到达' ELSE '' END,
        i.created_at + (coalesce(i.resolved_at, now()) - i.created_at) * (v - 1) / 6,
        NULL, NULL
    FROM inserted i, generate_series(1, i.version) AS v
), links AS (
    INSERT INTO dispatch.complaint_links (tenant, complaint_id, work_order_id, linked_at)
    SELECT i.tenant, gen_random_uuid(), i.work_order_id, i.created_at + interval '1 hour'
    FROM inserted i, orders o WHERE o.work_order_id = i.work_order_id AND o.r_link < 0.05
)
INSERT INTO notify.deliveries (delivery_id, tenant, kind, state, channel, recipient, complaint_id,
    work_order_id, body, attempts, created_at, delivered_at)
SELECT gen_random_uuid(), i.tenant, k.kind, 2, i.channel, i.poster_id, i.complaint_id::text,
    i.work_order_id::text,
    CASE k.kind WHEN 1 THEN '您的反馈已收到，我们会在规定时间内处理。工单号随后发送。'
                WHEN 5 THEN '您反映的问题已处理完毕：已更换光猫，线路恢复。'
                ELSE '请回复 1-5 为本次服务打分。' END,
    1, k.at, k.at
FROM inserted i, LATERAL (
    SELECT 1 AS kind, i.created_at + interval '2 seconds' AS at
    UNION ALL SELECT 5, i.resolved_at WHERE i.resolved_at IS NOT NULL
    UNION ALL SELECT 6, i.resolved_at + interval '1 second' WHERE i.resolved_at IS NOT NULL AND i.state = 6
) k
"#,
    )
    .bind(from as i64)
    .bind(to as i64)
    .bind(teams)
    .bind(agents_per_team as i64)
    .bind(&categories[..])
    .execute(connection)
    .await?;
    Ok(())
}

/// Loads `n` work orders in chunks, then vacuums and analyses the tables.
async fn load(pool: &PgPool, n: usize, teams: &[String], agents_per_team: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut connection = pool.acquire().await?;
    // The work orders' triggers name dispatch's tables unqualified, as its pool sees them.
    sqlx::query("SET search_path TO dispatch")
        .execute(&mut *connection)
        .await?;
    let mut from = 0;
    while from < n {
        let to = (from + LOAD_CHUNK).min(n);
        load_chunk(&mut connection, from, to, teams, agents_per_team).await?;
        from = to;
        eprintln!(
            "  loaded {from} work orders in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    sqlx::query("RESET search_path").execute(&mut *connection).await?;
    drop(connection);
    for table in [
        "dispatch.work_orders",
        "dispatch.work_order_history",
        "dispatch.complaint_links",
        "notify.deliveries",
    ] {
        sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(pool)
            .await?;
    }
    // Write the load's dirty pages out now: left to the next checkpoint, they would be
    // written during the measurement at this size and charged to the loop.
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(started.elapsed().as_secs_f64())
}

/// What the desks will ask for, drawn from the loaded tables.
async fn targets(pool: &PgPool, teams: Vec<String>, per_tenant: usize) -> anyhow::Result<Targets> {
    let mut known = Vec::new();
    let mut linked_complaints = Vec::new();
    let mut to_accept = Vec::new();
    let mut to_resolve = Vec::new();
    for (index, tenant) in TENANTS.iter().enumerate() {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT work_order_id::text, complaint_id::text FROM dispatch.work_orders TABLESAMPLE BERNOULLI (5) \
             WHERE tenant = $1 LIMIT $2",
        )
        .bind(tenant)
        .bind(per_tenant as i64)
        .fetch_all(pool)
        .await?;
        known.extend(rows.into_iter().map(|(work_order_id, complaint_id)| Known {
            tenant: index,
            work_order_id,
            complaint_id,
        }));
        let links: Vec<(String,)> = sqlx::query_as(
            "SELECT complaint_id::text FROM dispatch.complaint_links TABLESAMPLE BERNOULLI (20) \
             WHERE tenant = $1 LIMIT $2",
        )
        .bind(tenant)
        .bind((per_tenant / 10) as i64)
        .fetch_all(pool)
        .await?;
        linked_complaints.extend(links.into_iter().map(|(id,)| (index, id)));
        let assigned: Vec<(String,)> = sqlx::query_as(
            "SELECT work_order_id::text FROM dispatch.work_orders WHERE tenant = $1 AND state = $2 \
             ORDER BY created_at DESC LIMIT 100000",
        )
        .bind(tenant)
        .bind(WorkOrderState::Assigned as i16)
        .fetch_all(pool)
        .await?;
        to_accept.push(Mutex::new(assigned.into_iter().map(|(id,)| id).collect()));
        to_resolve.push(Mutex::new(Vec::new()));
    }
    anyhow::ensure!(!known.is_empty(), "no work orders loaded");
    Ok(Targets {
        known,
        linked_complaints,
        to_accept,
        to_resolve,
        teams,
    })
}

/// A pool as a service builds it for `schema`.
fn service_pool(database_url: &str, schema: &'static str) -> anyhow::Result<PgPool> {
    let args = DatabaseArgs {
        database_url: Secret::new(database_url.to_owned()),
        database_max_connections: SERVICE_POOL,
    };
    Ok(closedloop_runtime::db::pool(&args, schema)?)
}

/// Sequential scans PostgreSQL has started so far on the tables that grow with every
/// complaint (the small ones, agents, teams, counters and cursors, are read whole by design).
async fn seq_scans(pool: &PgPool) -> anyhow::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT schemaname || '.' || relname, seq_scan FROM pg_stat_user_tables \
         WHERE (schemaname, relname) IN (('dispatch', 'work_orders'), ('dispatch', 'work_order_history'), \
           ('dispatch', 'complaint_links'), ('dispatch', 'outbox'), ('notify', 'deliveries'))",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Tables with more sequential scans now than in `before`, and how many more.
fn seq_scans_since(before: &HashMap<String, i64>, now: &HashMap<String, i64>) -> Vec<(String, i64)> {
    let mut grown: Vec<(String, i64)> = now
        .iter()
        .filter_map(|(table, n)| {
            let added = n - before.get(table).copied().unwrap_or(0);
            (added > 0).then(|| (table.clone(), added))
        })
        .collect();
    grown.sort();
    grown
}

/// The loop's completed rate for `n` complaints from `callers` flat out.
/// Whether `pg_stat_statements` is loaded (with
/// `CLOSEDLOOP_POSTGRES_FLAGS="-c shared_preload_libraries=pg_stat_statements"`); if so its
/// counts start again from zero.
async fn reset_statements(pool: &PgPool) -> bool {
    let created = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await;
    created.is_ok()
        && sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(pool)
            .await
            .is_ok()
}

/// The statements PostgreSQL spent most time on since `reset_statements`, as a table.
async fn costliest_statements(pool: &PgPool) -> anyhow::Result<String> {
    let rows: Vec<(f64, i64, String)> = sqlx::query_as(
        "SELECT total_exec_time + total_plan_time, calls, \
                left(regexp_replace(query, '\\s+', ' ', 'g'), 110) \
         FROM pg_stat_statements ORDER BY 1 DESC LIMIT 8",
    )
    .fetch_all(pool)
    .await?;
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(ms, calls, query)| {
            let per_call = ms / (calls.max(1) as f64);
            vec![
                format!("{ms:.0}"),
                calls.to_string(),
                format!("{per_call:.3}"),
                query,
            ]
        })
        .collect();
    Ok(table(&["ms", "calls", "ms/call", "statement"], &rows))
}

async fn max_rate(
    submitters: &drive::Submitters,
    js: &async_nats::jetstream::Context,
    pool: &PgPool,
    workload: &mut Workload,
    n: usize,
    callers: usize,
) -> anyhow::Result<f64> {
    let submissions = (0..n).map(|_| workload.next_steady().1).collect();
    let statements = reset_statements(pool).await;
    let accepted_before = submitters.ledger.accepted.load(Ordering::Relaxed);
    let started = Instant::now();
    submitters.flat_out(0, submissions, callers).await;
    let complete = drive::drained(js, pool, started).await?;
    let accepted = submitters.ledger.accepted.load(Ordering::Relaxed) - accepted_before;
    if statements {
        eprintln!(
            "  PostgreSQL's costliest statements meanwhile:\n{}",
            costliest_statements(pool).await?
        );
    }
    Ok(accepted as f64 / complete.as_secs_f64().max(f64::EPSILON))
}

/// One phase of desks (and, for the API, watchers) while the loop ingests at `rate`.
async fn phase(
    desks: Vec<(Desk, usize)>,
    targets: &Arc<Targets>,
    submitters: &drive::Submitters,
    workload: &mut Workload,
    args: &Args,
) -> anyhow::Result<Calls> {
    let (rate, secs, think_ms) = (args.ingest_rate, args.phase_secs, args.think_ms);
    let stop = CancellationToken::new();
    let warm_until = Instant::now() + WARM_UP;
    let mut tasks = tokio::task::JoinSet::new();
    for (n, (desk, tenant)) in desks.into_iter().enumerate() {
        tasks.spawn(run_desk(
            desk,
            tenant,
            0x5eed + n as u64,
            think_ms,
            targets.clone(),
            warm_until,
            stop.clone(),
        ));
    }
    let secs = secs + WARM_UP.as_secs_f64();
    let submissions: Vec<ComplaintSubmission> = (0..(rate * secs) as usize)
        .map(|_| workload.next_steady().1)
        .collect();
    if submissions.is_empty() {
        // No loop load asked for: the desks alone, for the phase's length.
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    } else {
        submitters.at_rate(0, submissions, rate).await?;
    }
    stop.cancel();
    let mut calls = Calls::default();
    while let Some(desk) = tasks.join_next().await {
        calls.merge(desk?);
    }
    Ok(calls)
}

/// `EXPLAIN (ANALYZE, FORMAT JSON)` of a read, run as its store runs it.
/// A statement pushed onto a query builder the caller starts.
/// The tier the reads are explained on: the hot one, which the API reads first.
const HOT: Tier = Tier::Hot;

type Push<'a> = Box<dyn FnOnce(&mut QueryBuilder<'a, Pg>) + 'a>;

async fn explain<'a>(pool: &PgPool, push: Push<'a>) -> anyhow::Result<serde_json::Value> {
    let mut query = QueryBuilder::new("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ");
    push(&mut query);
    let (plan,): (serde_json::Value,) = query.build_query_as().fetch_one(pool).await?;
    Ok(plan)
}

/// The plan's nodes, as "Node Type on relation using index", depth first.
fn plan_nodes(node: &serde_json::Value, out: &mut Vec<String>) {
    let kind = node["Node Type"].as_str().unwrap_or("?");
    let mut line = kind.to_owned();
    if let Some(relation) = node["Relation Name"].as_str() {
        line.push_str(&format!(" on {relation}"));
    }
    if let Some(index) = node["Index Name"].as_str() {
        line.push_str(&format!(" using {index}"));
    }
    out.push(line);
    for child in node["Plans"].as_array().into_iter().flatten() {
        plan_nodes(child, out);
    }
}

struct Explained {
    name: &'static str,
    nodes: Vec<String>,
    execution_ms: f64,
    plan: serde_json::Value,
}

async fn explain_reads(
    dispatch: &PgPool,
    notify: &PgPool,
    targets: &Targets,
) -> anyhow::Result<Vec<Explained>> {
    let sample = &targets.known[0];
    let tenant = TENANTS[sample.tenant];
    let work_order_id = Uuid::parse_str(&sample.work_order_id)?;
    let complaint_id = Uuid::parse_str(&sample.complaint_id)?;
    let linked = targets
        .linked_complaints
        .iter()
        .find(|(t, _)| *t == sample.tenant)
        .map(|(_, id)| Uuid::parse_str(id))
        .transpose()?
        .unwrap_or(complaint_id);
    let by_team_state = ListFilter {
        team: Some(targets.teams[1].clone()),
        state: Some(WorkOrderState::InProgress),
        ..Default::default()
    };
    // The last page of that listing, where an offset-paged API would be slowest.
    let (_, mut token) = db::list_page(dispatch, tenant, &by_team_state, PAGE, "").await?;
    let mut after = None;
    while !token.is_empty() {
        let (page, next) = db::list_page(dispatch, tenant, &by_team_state, PAGE, &token).await?;
        if let Some(last) = page.last()
            && !next.is_empty()
        {
            after = Some((last.created_at, Uuid::parse_str(&last.work_order_id)?));
        }
        token = next;
    }
    let unfiltered = ListFilter::default();
    let deliveries = delivery_store::ListFilter {
        work_order_id: Some(sample.work_order_id.clone()),
        ..Default::default()
    };
    let limit = i64::from(PAGE) + 1;
    // Each read as the API runs it, pushed onto `EXPLAIN` in place of a plain query.
    let by_complaint =
        |id| -> Push { Box::new(move |q| work_order_store::push_get(q, HOT, tenant, Lookup::Complaint(id))) };
    let listing =
        |filter, after| -> Push { Box::new(move |q| db::push_listing(q, filter, HOT, tenant, after, limit)) };
    // A table, one read a line.
    #[rustfmt::skip]
    let statements: Vec<(&str, &PgPool, Push)> = vec![
        ("GetWorkOrder", dispatch, Box::new(|q| work_order_store::push_get(q, HOT, tenant, Lookup::WorkOrder(work_order_id)))),
        ("GetComplaintStatus (opening complaint)", dispatch, by_complaint(complaint_id)),
        ("GetComplaintStatus (follow-up)", dispatch, by_complaint(linked)),
        ("GetWorkOrderHistory", dispatch, Box::new(|q| work_order_store::push_history(q, HOT, tenant, work_order_id))),
        ("ListWorkOrders (team, state; first page)", dispatch, listing(&by_team_state, None)),
        ("ListWorkOrders (team, state; last page)", dispatch, listing(&by_team_state, after)),
        ("ListWorkOrders (tenant; first page)", dispatch, listing(&unfiltered, None)),
        ("ListDeliveries (work order)", notify, Box::new(|q| db::push_listing(q, &deliveries, HOT, tenant, None, limit))),
    ];
    let mut plans = Vec::new();
    for (name, pool, push) in statements {
        plans.push((name, explain(pool, push).await?));
    }
    Ok(plans
        .into_iter()
        .map(|(name, plan)| {
            let mut nodes = Vec::new();
            plan_nodes(&plan[0]["Plan"], &mut nodes);
            Explained {
                name,
                nodes,
                execution_ms: plan[0]["Execution Time"].as_f64().unwrap_or(f64::NAN),
                plan,
            }
        })
        .collect())
}

/// Bytes and rows of the loop's tables (heap, indexes and TOAST).
async fn table_sizes(pool: &PgPool) -> anyhow::Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid), c.reltuples::bigint \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname IN ('dispatch', 'notify') AND c.relkind = 'r' ORDER BY 2 DESC",
    )
    .fetch_all(pool)
    .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let servers = BenchServers::start("bench-api", args.bin_dir.as_deref(), &args.out)?;
    let cancel = CancellationToken::new();
    let (policy, teams) = policy(args.teams_per_tenant, args.agents_per_team)?;
    let desk_tokens: Vec<String> = (0..args.clients.max(args.watchers))
        .map(|desk| {
            let tenant = tenant_of(desk);
            format!(
                "{}:agent:{}:desk-{desk}",
                TENANTS[tenant],
                hash_token(&desk_token(tenant, desk))
            )
        })
        .collect();
    let LoopUnderTest {
        // Kept to the end: it stands in for the gateway notify calls.
        webhook: _webhook,
        database_url,
        options,
        children,
        submitters,
    } = servers
        .start_loop(
            &policy,
            TENANTS[0],
            &desk_tokens,
            &[],
            args.service_worker_threads,
            &cancel,
        )
        .await?;
    let dispatch_addr = std::net::SocketAddr::new(options.host, options.ports[2]);
    let notify_addr = std::net::SocketAddr::new(options.host, options.ports[3]);
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&servers.nats.url()).await?);
    let pool = bench::pool(&database_url, 4).await?;
    // Each measurement's posters are new, so their complaints open work orders of their own.
    let fresh_workload = |seed| {
        Workload::new(
            &format!("api-{}", Uuid::new_v4().simple()),
            TENANTS[0],
            seed,
            Mix::default(),
        )
    };
    let measure_max_rate = async |workload: &mut Workload| {
        max_rate(
            &submitters,
            &js,
            &pool,
            workload,
            args.max_complaints,
            args.submitters,
        )
        .await
    };
    let mut workload = fresh_workload(11);

    eprintln!(
        "loop at its maximum rate, empty database: {} complaints",
        args.max_complaints
    );
    let empty_rate = measure_max_rate(&mut workload).await?;
    eprintln!("  {empty_rate:.0} completed/s");

    eprintln!("loading {} work orders", args.work_orders);
    let load_secs = load(&pool, args.work_orders, &teams, args.agents_per_team).await?;
    let (work_orders_total,): (i64,) = sqlx::query_as("SELECT count(*) FROM dispatch.work_orders")
        .fetch_one(&pool)
        .await?;

    eprintln!("loop at its maximum rate, {work_orders_total} work orders");
    // New posters, as on the empty database: the first measurement's posters have open work
    // orders now, which the same posters' complaints would join instead of opening their own.
    let mut workload = fresh_workload(12);
    let scans_before_loaded_max = seq_scans(&pool).await?;
    let loaded_rate = measure_max_rate(&mut workload).await?;
    let loaded_max_scans = seq_scans_since(&scans_before_loaded_max, &seq_scans(&pool).await?);
    eprintln!("  {loaded_rate:.0} completed/s");

    let targets = Arc::new(targets(&pool, teams.clone(), 50_000).await?);
    let connect = |addr: std::net::SocketAddr| async move {
        GrpcChannel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .map_err(anyhow::Error::from)
    };

    // The watchers: each desk may hold a few streams; these are the first desks'.
    let watch_stop = CancellationToken::new();
    let watched_events = Arc::new(AtomicUsize::new(0));
    let mut watchers = tokio::task::JoinSet::new();
    for n in 0..args.watchers {
        let tenant = tenant_of(n);
        let mut client = WorkOrderServiceClient::new(connect(dispatch_addr).await?);
        let request = WatchWorkOrdersRequest {
            team: if n % 2 == 0 {
                teams[n % teams.len()].clone()
            } else {
                String::new()
            },
            ..Default::default()
        };
        let mut stream = client
            .watch_work_orders(authed(&desk_token(tenant, n), request))
            .await?
            .into_inner();
        let (stop, events) = (watch_stop.clone(), watched_events.clone());
        watchers.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    message = stream.message() => match message {
                        Ok(Some(_)) => { events.fetch_add(1, Ordering::Relaxed); }
                        Ok(None) => break,
                        Err(status) => { eprintln!("  a watch stream ended: {status}"); break; }
                    },
                }
            }
        });
    }

    eprintln!(
        "API phase: {} desks, {} watchers, {:.0} complaints/s ingested, {:.0} s",
        args.clients, args.watchers, args.ingest_rate, args.phase_secs
    );
    let mut desks = Vec::new();
    for n in 0..args.clients {
        let tenant = tenant_of(n);
        let channel = connect(dispatch_addr).await?;
        desks.push((
            Desk::Api(Box::new(ApiDesk {
                work_orders: WorkOrderServiceClient::new(channel),
                notifications: NotificationServiceClient::new(connect(notify_addr).await?),
                token: desk_token(tenant, n),
            })),
            tenant,
        ));
    }
    let scans_before_api = seq_scans(&pool).await?;
    let watch_started = Instant::now();
    let mut api = phase(desks, &targets, &submitters, &mut workload, &args).await?;
    let api_scans = seq_scans_since(&scans_before_api, &seq_scans(&pool).await?);
    watch_stop.cancel();
    let watch_secs = watch_started.elapsed().as_secs_f64();
    while watchers.join_next().await.is_some() {}
    let events = watched_events.load(Ordering::Relaxed);

    eprintln!(
        "direct phase: the same desks on the stores, {:.0} s",
        args.phase_secs
    );
    let dispatch_pool = service_pool(&database_url, closedloop_dispatch::SCHEMA)?;
    let notify_pool = service_pool(&database_url, closedloop_notify::SCHEMA)?;
    let desks = (0..args.clients)
        .map(|n| {
            (
                Desk::Direct {
                    dispatch: work_order_store::Db::new(dispatch_pool.clone()),
                    notify: notify_pool.clone(),
                    name: format!("desk-{n}"),
                },
                tenant_of(n),
            )
        })
        .collect();
    let scans_before_direct = seq_scans(&pool).await?;
    let mut direct = phase(desks, &targets, &submitters, &mut workload, &args).await?;
    let direct_scans = seq_scans_since(&scans_before_direct, &seq_scans(&pool).await?);
    drive::drained(&js, &pool, Instant::now()).await?;

    eprintln!("query plans at this size");
    let plans = explain_reads(&dispatch_pool, &notify_pool, &targets).await?;
    let sizes = table_sizes(&pool).await?;
    let failed_submissions = submitters.ledger.failed.load(Ordering::Relaxed);

    cancel.cancel();
    if let Err(error) = children.stop() {
        eprintln!("{error}");
    }
    pool.close().await;

    // Figures.
    let mut rows = Vec::new();
    let mut rpc_json = Vec::new();
    let mut bars = Vec::new();
    for rpc in Rpc::ALL {
        let [api50, api99, api_max] = api.percentiles(rpc);
        let [raw50, raw99, raw_max] = direct.percentiles(rpc);
        let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if !b.is_zero() => Some(a.as_secs_f64() / b.as_secs_f64()),
            _ => None,
        };
        let (r50, r99) = (ratio(api50, raw50), ratio(api99, raw99));
        let shown = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{r:.2}"));
        let calls = api.took.get(&rpc).map_or(0, Vec::len);
        let direct_calls = direct.took.get(&rpc).map_or(0, Vec::len);
        rows.push(vec![
            rpc.name().to_owned(),
            format!("{calls} / {direct_calls}"),
            millis(api50),
            millis(api99),
            millis(api_max),
            millis(raw50),
            millis(raw99),
            millis(raw_max),
            shown(r50),
            shown(r99),
            format!(
                "{} / {}",
                api.failed.get(&rpc).copied().unwrap_or(0),
                direct.failed.get(&rpc).copied().unwrap_or(0)
            ),
        ]);
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        rpc_json.push(json!({
            "rpc": rpc.name(), "read": rpc.is_read(),
            "api": {"calls": calls, "failed": api.failed.get(&rpc).copied().unwrap_or(0),
                    "p50_ms": ms(api50), "p99_ms": ms(api99), "max_ms": ms(api_max)},
            "direct": {"calls": direct_calls, "failed": direct.failed.get(&rpc).copied().unwrap_or(0),
                       "p50_ms": ms(raw50), "p99_ms": ms(raw99), "max_ms": ms(raw_max)},
            "ratio_p50": r50, "ratio_p99": r99,
        }));
        bars.push((rpc.name(), ms(api50), ms(api99), ms(raw50), ms(raw99)));
    }
    println!(
        "\nbench-api: {work_orders_total} work orders ({} loaded in {load_secs:.0} s), {} desks, {} watchers, \
         {:.0} complaints/s ingested, {:.0} s per phase\n",
        args.work_orders, args.clients, args.watchers, args.ingest_rate, args.phase_secs
    );
    println!(
        "{}",
        table(
            &[
                "RPC",
                "calls api / direct",
                "api p50 ms",
                "p99",
                "max",
                "direct p50 ms",
                "p99",
                "max",
                "p50 ratio",
                "p99 ratio",
                "failed",
            ],
            &rows,
        )
    );
    let per_second = |calls: &Calls| {
        calls.took.values().map(Vec::len).sum::<usize>() as f64 / args.phase_secs.max(f64::EPSILON)
    };
    println!(
        "\ncalls per second: API {:.0}, direct {:.0}",
        per_second(&api),
        per_second(&direct)
    );
    println!(
        "WatchWorkOrders: {events} events on {} streams in {watch_secs:.0} s",
        args.watchers
    );
    println!(
        "\nloop maximum completed rate: empty database {empty_rate:.0}/s, at {work_orders_total} work orders \
         {loaded_rate:.0}/s ({:.0}%)",
        100.0 * loaded_rate / empty_rate.max(f64::EPSILON)
    );
    let show_scans = |scans: &[(String, i64)]| {
        if scans.is_empty() {
            "none".to_owned()
        } else {
            scans
                .iter()
                .map(|(t, n)| format!("{t} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!(
        "sequential scans started: loop at max rate {}; API phase {}; direct phase {}",
        show_scans(&loaded_max_scans),
        show_scans(&api_scans),
        show_scans(&direct_scans)
    );
    println!("\nquery plans (EXPLAIN ANALYZE at this size):");
    let mut any_seq_scan = false;
    for plan in &plans {
        let seq = plan.nodes.iter().any(|n| n.starts_with("Seq Scan"));
        any_seq_scan |= seq;
        println!(
            "  {} ({:.3} ms{}): {}",
            plan.name,
            plan.execution_ms,
            if seq { ", SEQUENTIAL SCAN" } else { "" },
            plan.nodes.join(" > ")
        );
    }
    let per_work_order = |bytes: i64| bytes as f64 / work_orders_total.max(1) as f64;
    let total_bytes: i64 = sizes.iter().map(|(_, b, _)| b).sum();
    println!(
        "\ntable sizes ({:.0} MiB in all, {:.0} bytes per work order):",
        total_bytes as f64 / 1048576.0,
        per_work_order(total_bytes)
    );
    for (table_name, bytes, rows) in sizes.iter().take(5) {
        println!(
            "  {table_name}: {:.0} MiB, {rows} rows, {:.0} bytes per work order",
            *bytes as f64 / 1048576.0,
            per_work_order(*bytes)
        );
    }
    if failed_submissions > 0 {
        println!("\n{failed_submissions} submissions failed");
    }

    let report = json!({
        "work_orders": work_orders_total, "loaded": args.work_orders, "load_secs": load_secs,
        "clients": args.clients, "watchers": args.watchers, "ingest_rate": args.ingest_rate,
        "phase_secs": args.phase_secs, "teams": teams.len() * TENANTS.len(),
        "think_ms": args.think_ms,
        "calls_per_sec": {"api": per_second(&api), "direct": per_second(&direct)},
        "rpcs": rpc_json,
        "watch": {"streams": args.watchers, "events": events, "secs": watch_secs},
        "loop_max_completed_per_sec": {"empty": empty_rate, "loaded": loaded_rate,
                                       "share": loaded_rate / empty_rate.max(f64::EPSILON)},
        "seq_scans": {"loop_max_loaded": loaded_max_scans, "api_phase": api_scans, "direct_phase": direct_scans},
        "plans": plans.iter().map(|p| json!({"query": p.name, "nodes": p.nodes,
            "execution_ms": p.execution_ms, "explain": p.plan})).collect::<Vec<_>>(),
        "any_seq_scan_in_plans": any_seq_scan,
        "table_sizes": sizes.iter().map(|(t, b, r)| json!({"table": t, "bytes": b, "rows": r})).collect::<Vec<_>>(),
        "failed_submissions": failed_submissions,
        "machine": {"cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
                    "nats_server": bench::nats_version()},
    });
    std::fs::write(
        args.out.join("bench-api.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(
        args.out.join("bench-api.svg"),
        svg(&bars, empty_rate, loaded_rate),
    )?;
    eprintln!("wrote {}", args.out.join("bench-api.{json,svg}").display());
    Ok(())
}

/// Per RPC, p50 and p99 through the API beside the direct call; and the loop's rate empty
/// and loaded.
/// An RPC's name, and its p50 and p99 through the API and direct, in milliseconds.
type Bar<'a> = (&'a str, Option<f64>, Option<f64>, Option<f64>, Option<f64>);

fn svg(bars: &[Bar<'_>], empty: f64, loaded: f64) -> String {
    let (left, top, width, row) = (300.0, 40.0, 560.0, 44.0);
    let scale = bars
        .iter()
        .flat_map(|(_, a, b, c, d)| [*a, *b, *c, *d])
        .flatten()
        .fold(1.0, f64::max);
    let height = top + row * bars.len() as f64 + 120.0;
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif">
<text x="10" y="20" font-size="14" font-weight="bold">bench-api: latency per RPC, API (blue) beside the direct store call (grey); ms, 0 – {scale:.1}</text>
"##,
        left + width + 40.0
    );
    for (index, (name, api50, api99, raw50, raw99)) in bars.iter().enumerate() {
        let y = top + row * index as f64;
        out.push_str(&format!(
            r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{name}</text>"#,
            left - 8.0,
            y + 18.0
        ));
        let bar = |value: Option<f64>, dy: f64, colour: &str, opacity: f64| {
            value.map_or(String::new(), |v| {
                format!(
                    r#"<rect x="{left}" y="{}" width="{:.1}" height="9" fill="{colour}" fill-opacity="{opacity}"/>"#,
                    y + dy,
                    width * v / scale
                )
            })
        };
        out.push_str(&bar(*api99, 4.0, "#4a7bd0", 0.45));
        out.push_str(&bar(*api50, 4.0, "#4a7bd0", 1.0));
        out.push_str(&bar(*raw99, 16.0, "#888", 0.45));
        out.push_str(&bar(*raw50, 16.0, "#888", 1.0));
    }
    let y = top + row * bars.len() as f64 + 20.0;
    let most = empty.max(loaded).max(1.0);
    out.push_str(&format!(
        r##"<text x="10" y="{y}" font-size="13" font-weight="bold">loop maximum completed per second (light: p99 / dark: p50 above)</text>
<text x="{}" y="{}" font-size="11" text-anchor="end">empty database: {empty:.0}/s</text>
<rect x="{left}" y="{}" width="{:.1}" height="12" fill="#5a5"/>
<text x="{}" y="{}" font-size="11" text-anchor="end">loaded: {loaded:.0}/s</text>
<rect x="{left}" y="{}" width="{:.1}" height="12" fill="#a55"/>
</svg>
"##,
        left - 8.0,
        y + 26.0,
        y + 16.0,
        width * empty / most,
        left - 8.0,
        y + 50.0,
        y + 40.0,
        width * loaded / most,
    ));
    out
}
