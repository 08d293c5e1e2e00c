//! What the benchmarks share: a synthetic but realistic workload (channels, Simplified,
//! Traditional and English texts, heavy-tailed reach, duplicates and follow-ups, outage
//! bursts), a dispatch policy that staffs every team so work is assigned, percentiles and a
//! printed table. Benchmarks print figures; nothing here asserts on time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A small deterministic generator (SplitMix64): runs are repeatable without a `rand`
/// dependency, and statistical quality is beside the point here.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// The team's labelled examples: real-looking Simplified Chinese posts of every intent.
const LABELLED: &str = include_str!("../../services/classify/data/labelled.tsv");

const TRADITIONAL: [&str; 6] = [
    "寬頻又斷網了，已經三天還沒解決，客服電話一直打不通！",
    "這個月的帳單多扣了五十塊，請查一下是什麼費用",
    "請問怎麼綁定帳號？找了半天找不到入口",
    "快遞說已經簽收但我根本沒收到包裹，要求退款",
    "營業廳的工作人員態度太差了，我要投訴",
    "信號很差，在家裡打電話總是斷線",
];

const ENGLISH: [&str; 6] = [
    "My fibre connection drops every evening around 8pm, please fix it.",
    "I was charged twice for my monthly plan, I want a refund.",
    "How do I change my plan to the unlimited data one?",
    "The technician never showed up for the appointment, third time now.",
    "Your staff at the store were rude and refused to help me.",
    "No signal at all in my apartment since yesterday.",
];

/// Texts of an outage: one category, one region, many posters at once.
const OUTAGE: [&str; 4] = [
    "深圳南山这边全部断网了，宽带和手机都没信号",
    "南山区停网了吗？家里宽带突然断了，光猫红灯",
    "深圳网络故障，一个小时了还上不了网",
    "宽带断网，南山科技园整栋楼都没网了",
];

const PROVINCES: [&str; 8] = [
    "广东 深圳",
    "广东 广州",
    "北京",
    "上海",
    "浙江 杭州",
    "四川 成都",
    "湖北 武汉",
    "江苏 南京",
];

/// Shares of the workload; the rest are fresh complaints.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Exact resubmissions of an earlier message (gateway retries): ingest answers "duplicate".
    pub duplicates: f64,
    /// New messages on an earlier thread by the same poster: merged into its work order.
    pub follow_ups: f64,
    /// Every poster distinct (no same-poster merges), for benchmarks that count work orders.
    pub distinct_posters: bool,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            duplicates: 0.02,
            follow_ups: 0.05,
            distinct_posters: false,
        }
    }
}

/// What one generated submission is, so a benchmark knows what to expect of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Fresh,
    Duplicate,
    FollowUp,
    Outage,
}

/// Generates submissions for one tenant.
pub struct Workload {
    rng: Rng,
    run: String,
    tenant: String,
    texts: Vec<String>,
    issued: usize,
    /// Earlier fresh submissions, for duplicates and follow-ups (bounded).
    earlier: Vec<ComplaintSubmission>,
    mix: Mix,
}

impl Workload {
    /// `run` keeps message ids unique across runs against the same servers.
    pub fn new(run: &str, tenant: &str, seed: u64, mix: Mix) -> Self {
        let mut texts: Vec<String> = LABELLED
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split('\t').nth(2))
            .map(str::to_owned)
            .collect();
        texts.extend(TRADITIONAL.iter().chain(ENGLISH.iter()).map(|t| (*t).to_owned()));
        Self {
            rng: Rng::new(seed),
            run: run.to_owned(),
            tenant: tenant.to_owned(),
            texts,
            issued: 0,
            earlier: Vec::new(),
            mix,
        }
    }

    fn channel(&mut self) -> Channel {
        match self.rng.below(100) {
            0..35 => Channel::WeiboPost,
            35..55 => Channel::WeiboComment,
            55..65 => Channel::WeiboDirectMessage,
            65..85 => Channel::Wechat,
            85..92 => Channel::Hotline,
            _ => Channel::WebForm,
        }
    }

    /// Followers from a heavy-tailed (Lomax, shape 0.7) distribution: most posters have a
    /// few hundred, about 5% pass 10,000, 1% pass 100,000 and 0.2% a million — the reach
    /// that decides who is answered first and who gets an account manager.
    fn followers(&mut self) -> i64 {
        let u = 1.0 - self.rng.unit(); // (0, 1]
        let followers = 138.0 * (u.powf(-1.0 / 0.7) - 1.0);
        followers.min(50_000_000.0) as i64
    }

    fn poster(&mut self, n: usize) -> Poster {
        let followers = self.followers();
        let poster_id = if self.mix.distinct_posters {
            format!("{}-p{n}", self.run)
        } else {
            // A few thousand posters, so some post more than once.
            format!("{}-p{}", self.run, self.rng.below(5_000))
        };
        Poster {
            poster_id,
            display_name: String::new(),
            followers,
            verified: followers > 100_000 && self.rng.chance(0.5),
        }
    }

    fn fresh(&mut self, text: String, region: &str) -> ComplaintSubmission {
        let n = self.issued;
        let channel = self.channel();
        let locale = if text.is_ascii() { "en" } else { "zh-CN" };
        ComplaintSubmission {
            tenant: self.tenant.clone(),
            channel: channel as i32,
            channel_message_id: format!("{}-m{n}", self.run),
            poster: Some(self.poster(n)),
            text,
            thread_id: format!("{}-t{n}", self.run),
            locale: locale.into(),
            region_hint: region.to_owned(),
            ..Default::default()
        }
    }

    fn remember(&mut self, submission: &ComplaintSubmission) {
        if self.earlier.len() < 10_000 {
            self.earlier.push(submission.clone());
        } else {
            let slot = self.rng.below(self.earlier.len());
            self.earlier[slot] = submission.clone();
        }
    }

    /// The next submission of the steady mix.
    pub fn next_steady(&mut self) -> (Kind, ComplaintSubmission) {
        self.issued += 1;
        let roll = self.rng.unit();
        if !self.earlier.is_empty() && roll < self.mix.duplicates {
            let earlier = self.earlier[self.rng.below(self.earlier.len())].clone();
            return (Kind::Duplicate, earlier);
        }
        if !self.earlier.is_empty() && roll < self.mix.duplicates + self.mix.follow_ups {
            let mut follow_up = self.earlier[self.rng.below(self.earlier.len())].clone();
            follow_up.channel_message_id = format!("{}-m{}", self.run, self.issued);
            follow_up.text = format!("还没解决吗？{}", follow_up.text);
            return (Kind::FollowUp, follow_up);
        }
        let text = self.texts[self.rng.below(self.texts.len())].clone();
        let region = if self.rng.chance(0.6) {
            PROVINCES[self.rng.below(PROVINCES.len())]
        } else {
            ""
        };
        let submission = self.fresh(text, region);
        self.remember(&submission);
        (Kind::Fresh, submission)
    }

    /// The next submission of an outage: one category and region, new posters.
    pub fn next_outage(&mut self) -> (Kind, ComplaintSubmission) {
        self.issued += 1;
        let text = OUTAGE[self.rng.below(OUTAGE.len())].to_owned();
        (Kind::Outage, self.fresh(text, "广东 深圳"))
    }
}

/// A dispatch policy (JSON) for `tenant`: the built-in routing and SLA targets, every team
/// the rules name staffed with `agents_per_team` online agents of every skill and ample
/// capacity (1,000 each, the most the directory allows), so benchmarks measure placement and assignment rather than queueing. With
/// `incidents` false, spike detection is set out of reach.
pub fn staffed_policy(tenant: &str, agents_per_team: usize, incidents: bool) -> anyhow::Result<String> {
    let builtin = closedloop_dispatch::settings::DEFAULT_SETTINGS;
    let mut policy: serde_json::Value = serde_json::from_str(builtin)?;
    let mut teams: Vec<String> = policy["routing"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|rule| rule["team"].as_str().map(str::to_owned))
        .collect();
    for extra in [
        &policy["routing"]["default_team"],
        &policy["routing"]["account_managers"]["team"],
        &policy["sla"]["escalation_team"],
    ] {
        if let Some(team) = extra.as_str() {
            teams.push(team.to_owned());
        }
    }
    teams.sort();
    teams.dedup();
    let skills: Vec<serde_json::Value> = policy["routing"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|rule| rule["skill"].as_str().map(|s| serde_json::json!(s)))
        .collect();
    let mut agents = Vec::new();
    for team in &teams {
        for n in 0..agents_per_team {
            agents.push(serde_json::json!({
                "agent_id": format!("{team}-{n}"),
                "team_id": team,
                "skills": skills,
                "capacity": 1_000,
                "online": true,
            }));
        }
    }
    let teams: Vec<serde_json::Value> = teams
        .iter()
        .map(|team| serde_json::json!({ "team_id": team, "skills": skills }))
        .collect();
    policy["directory"] = serde_json::json!([{ "tenant": tenant, "teams": teams, "agents": agents }]);
    if !incidents {
        policy["incidents"]["min_count"] = serde_json::json!(1_000_000_000);
    }
    Ok(serde_json::to_string_pretty(&policy)?)
}

/// A pool of `connections` to `url`.
pub async fn pool(url: &str, connections: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .connect(url)
        .await?)
}

const RAW_TABLE: &str = "CREATE TABLE raw_rows (
    id uuid PRIMARY KEY, tenant text NOT NULL, body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())";

/// One INSERT per transaction from `writers` tasks.
pub async fn single_row_commits(
    url: &str,
    n: usize,
    writers: usize,
    connections: u32,
) -> anyhow::Result<f64> {
    let pool = pool(url, connections).await?;
    sqlx::query(RAW_TABLE).execute(&pool).await?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers.max(1) {
        let pool = pool.clone();
        let next = next.clone();
        tasks.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                sqlx::query("INSERT INTO raw_rows (id, tenant, body) VALUES ($1, $2, $3)")
                    .bind(uuid::Uuid::new_v4())
                    .bind("bench")
                    .bind("家里宽带又断网了，已经三天了还没解决，客服电话一直打不通！")
                    .execute(&pool)
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = rate(n, started.elapsed());
    pool.close().await;
    Ok(rate)
}

/// Multi-row INSERTs of 256 rows, one per transaction, over every connection.
pub async fn batched_inserts(url: &str, n: usize, connections: u32) -> anyhow::Result<f64> {
    const ROWS: usize = 256;
    let pool = pool(url, connections).await?;
    sqlx::query(RAW_TABLE).execute(&pool).await?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections.max(1) {
        let pool = pool.clone();
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(ROWS, std::sync::atomic::Ordering::Relaxed);
                if first >= n {
                    return anyhow::Ok(());
                }
                let count = ROWS.min(n - first);
                let ids: Vec<uuid::Uuid> = (0..count).map(|_| uuid::Uuid::new_v4()).collect();
                let tenants = vec!["bench"; count];
                let bodies = vec!["家里宽带又断网了，已经三天了还没解决，客服电话一直打不通！"; count];
                sqlx::query(
                    "INSERT INTO raw_rows (id, tenant, body) SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[])",
                )
                .bind(&ids)
                .bind(&tenants)
                .bind(&bodies)
                .execute(&pool)
                .await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = rate(n, started.elapsed());
    pool.close().await;
    Ok(rate)
}

/// Per second.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// The `q` quantile (0..=1) of sorted values, nearest rank; `None` when empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1).min(sorted.len() - 1)])
}

/// Milliseconds with one decimal, or "-" when there is nothing.
pub fn millis(value: Option<Duration>) -> String {
    value.map_or_else(|| "-".to_owned(), |d| format!("{:.1}", d.as_secs_f64() * 1000.0))
}

/// A plain-text table with a header row and right-aligned figures.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                let pad = widths[c].saturating_sub(cell.chars().count());
                if c == 0 {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1)));
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// The body of `GET /metrics` at `addr` (HTTP/1.0, so the server closes when done).
pub async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .ok_or_else(|| anyhow::anyhow!("no HTTP body from {addr}"))?;
    Ok(body.to_owned())
}

/// The sum of every sample of `name` (across labels) in a Prometheus text exposition.
pub fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let series_name = series.split('{').next()?;
            (series_name == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `nats-server --version`, for the record.
pub fn nats_version() -> String {
    std::process::Command::new(std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into()))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&values, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&values, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn workload_mixes_duplicates_and_follow_ups_and_is_repeatable() {
        let generate = || {
            let mut workload = Workload::new("r", "t", 7, Mix::default());
            (0..5_000).map(|_| workload.next_steady()).collect::<Vec<_>>()
        };
        let first = generate();
        assert_eq!(first, generate(), "same seed, same workload");
        let count = |kind| first.iter().filter(|(k, _)| *k == kind).count();
        assert!(count(Kind::Duplicate) > 0 && count(Kind::FollowUp) > 0);
        assert!(count(Kind::Fresh) > 4_000);
        let big = first
            .iter()
            .filter(|(_, s)| s.poster.as_ref().is_some_and(|p| p.followers > 100_000))
            .count();
        assert!(
            (10..200).contains(&big),
            "heavy tail: a few posters with large reach, got {big}"
        );
        assert!(
            first.iter().any(|(_, s)| s.text.is_ascii()),
            "English texts present"
        );
    }

    #[test]
    fn staffed_policy_is_a_valid_dispatch_policy() {
        let json = staffed_policy("bench", 3, false).expect("policy");
        let file: closedloop_dispatch::settings::SettingsFile = serde_json::from_str(&json).expect("parses");
        closedloop_dispatch::Policy::from_file(&file).expect("valid");
        assert!(file.directory[0].agents.len() >= 3 * 8);
    }

    #[test]
    fn metric_sum_adds_labelled_series_and_skips_others() {
        let text = "# HELP x y\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\nx_total_other 9\n";
        assert_eq!(metric_sum(text, "x_total"), 5.5);
        assert_eq!(metric_sum(text, "missing"), 0.0);
    }

    #[test]
    fn table_aligns_columns() {
        let printed = table(
            &["a", "rate"],
            &[vec!["raw".into(), "1".into()], vec!["x".into(), "100".into()]],
        );
        assert_eq!(printed, "a    rate\n---------\nraw     1\nx     100");
    }
}

/// CPU time and memory of processes on this machine, from `/proc` (Linux).
pub mod procfs {
    use std::path::Path;

    /// Clock ticks per second, the unit of CPU times in `/proc/<pid>/stat`.
    pub fn ticks_per_second() -> f64 {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    }

    /// User plus system CPU time of `pid` so far, in clock ticks.
    pub fn cpu_ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces; fields after it are plain.
        let after_name = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }

    /// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
    pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    }

    fn all_pids() -> Vec<u32> {
        std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Processes whose parent is `parent`.
    pub fn children(parent: u32) -> Vec<u32> {
        all_pids()
            .into_iter()
            .filter(|pid| status_kib(*pid, "PPid").is_some_and(|p| p == u64::from(parent)))
            .collect()
    }

    /// The postmaster of the cluster in `data_dir` (first line of `postmaster.pid`).
    pub fn postmaster(data_dir: &Path) -> Option<u32> {
        std::fs::read_to_string(data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

/// What a whole-system benchmark runs on: the service binaries (`bin_dir`, else the ones
/// built beside the benchmark), a scratch directory, and a durable PostgreSQL and a
/// nats-server of its own. `out` is created for the results.
pub struct BenchServers {
    pub bin_dir: std::path::PathBuf,
    pub scratch: tempfile::TempDir,
    /// The PostgreSQL data directory, kept after the run.
    pub pg_dir: std::path::PathBuf,
    pub pg: crate::servers::Postgres,
    pub nats: crate::servers::NatsServer,
}

impl BenchServers {
    pub fn start(
        name: &str,
        bin_dir: Option<&std::path::Path>,
        out: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let bin_dir = match bin_dir {
            Some(dir) => dir.to_owned(),
            None => crate::processes::bin_dir()?,
        };
        std::fs::create_dir_all(out)?;
        let scratch = tempfile::Builder::new().prefix(&format!("{name}-")).tempdir()?;
        let pg_dir = tempfile::Builder::new()
            .prefix(&format!("{name}-pg-"))
            .tempdir()?
            .keep();
        let pg = crate::servers::Postgres::start_durable_in(&pg_dir, crate::free_port()?)?;
        let nats = crate::servers::NatsServer::start()?;
        Ok(Self {
            bin_dir,
            scratch,
            pg_dir,
            pg,
            nats,
        })
    }
}

/// The four services running as processes on a [`BenchServers`]' fresh database, with a
/// webhook receiver standing in for the gateway and submitters connected to ingest.
pub struct LoopUnderTest {
    pub webhook: crate::webhook::WebhookReceiver,
    pub database_url: String,
    pub options: crate::system::SystemOptions,
    pub children: crate::processes::ServiceProcesses,
    pub submitters: crate::drive::Submitters,
}

impl BenchServers {
    /// Starts the loop with dispatch on `policy`, [`crate::drive::GATEWAY_TOKEN`] as
    /// `gateway_tenant`'s gateway plus `more_tokens` (`CLOSEDLOOP_AUTH_TOKENS` entries), and
    /// every consumer bound before it returns. The receiver stops with `cancel`.
    pub async fn start_loop(
        &self,
        policy: &impl serde::Serialize,
        gateway_tenant: &str,
        more_tokens: &[String],
        notify_args: &[String],
        worker_threads: usize,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<LoopUnderTest> {
        let webhook = crate::webhook::WebhookReceiver::start(
            "127.0.0.1:0".parse()?,
            crate::drive::GATEWAY_SECRET,
            false,
            cancel.clone(),
        )
        .await?;
        let database_url = self.pg.create_database().await?;
        let policy_path = self.scratch.path().join("policy.json");
        std::fs::write(&policy_path, serde_json::to_vec_pretty(policy)?)?;
        let options = crate::drive::loop_options(
            &self.nats,
            &database_url,
            &webhook,
            &policy_path,
            std::iter::once(format!(
                "{gateway_tenant}:gateway:{}:bench-gateway",
                closedloop_runtime::auth::hash_token(crate::drive::GATEWAY_TOKEN)
            ))
            .chain(more_tokens.iter().cloned())
            .collect::<Vec<_>>()
            .join(";"),
            notify_args,
            worker_threads,
        )?;
        eprintln!("starting the four services from {}", self.bin_dir.display());
        let mut children =
            crate::processes::ServiceProcesses::spawn(&self.bin_dir, &options, self.scratch.path())?;
        if let Err(error) =
            crate::system::wait_for_consumers(&self.nats.url(), &crate::system::CONSUMERS).await
        {
            return Err(error.context(children.exited_report()));
        }
        let ingest_addr = std::net::SocketAddr::new(options.host, options.ports[0]);
        let submitters =
            crate::drive::Submitters::connect(ingest_addr, 4, crate::drive::GATEWAY_TOKEN).await?;
        Ok(LoopUnderTest {
            webhook,
            database_url,
            options,
            children,
            submitters,
        })
    }
}
