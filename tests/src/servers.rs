//! Real servers for tests: `nats-server` with JetStream and PostgreSQL, each in its own
//! directory on a free port. Each runs under a small shell guard that stops the server and
//! removes its directory when our end of its stdin closes — which happens however this
//! process ends, so a panicking or killed test leaves nothing running.
//!
//! PostgreSQL refuses to run as root; when we are root it runs as the `postgres` user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::free_port;

/// A server process that stops when dropped (or when this process exits).
struct Guarded {
    child: Child,
    /// Closing it tells the guard to stop the server.
    stdin: Option<ChildStdin>,
}

impl Guarded {
    /// Runs `command` under the guard. `cleanup_dir` is removed after the server stops.
    fn spawn(
        run_as: Option<&str>,
        command: &str,
        log: &Path,
        cleanup_dir: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let cleanup = cleanup_dir
            .map(|d| format!("rm -rf '{}'", d.display()))
            .unwrap_or_default();
        let script = format!(
            "{command} >>'{log}' 2>&1 & pid=$!\nread _ignored\nkill -INT $pid 2>/dev/null\nwait $pid\n{cleanup}",
            log = log.display()
        );
        let mut cmd = match run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "sh", "-c", &script]);
                c
            }
            None => {
                let mut c = Command::new("sh");
                c.args(["-c", &script]);
                c
            }
        };
        // Own process group: a Ctrl-C meant for us must not stop the servers before the
        // services using them have drained.
        let mut child = cmd
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {command}"))?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// Stops the server and waits until its guard has exited.
    fn stop(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_binary(name: &str, env_override: &str, extra_dirs: &[PathBuf]) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(env_override) {
        return Ok(PathBuf::from(path));
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in path_dirs.iter().chain(extra_dirs) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` not found on PATH (or set {env_override}); run scripts/install-deps.sh")
}

fn wait_for_port(port: u16, timeout: Duration, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} did not listen on {port} within {timeout:?}; log:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Stream settings for a harness's short-lived server, where benchmarks and tests provision
/// the streams without a service: an hour's retention, no size limit, a two-minute duplicate
/// window, one replica.
pub fn harness_streams() -> closedloop_runtime::bus::StreamSettings {
    closedloop_runtime::bus::StreamSettings {
        max_age: Duration::from_secs(3600),
        max_bytes: -1,
        duplicate_window: Duration::from_secs(120),
        replicas: 1,
    }
}

/// A `nats-server` with JetStream.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    /// Set when the store is a temporary directory, removed on drop.
    _temporary: Option<tempfile::TempDir>,
    process: Option<Guarded>,
}

impl NatsServer {
    /// On a free port with its store in a temporary directory.
    pub fn start() -> anyhow::Result<Self> {
        let temporary = tempfile::Builder::new().prefix("closedloop-nats-").tempdir()?;
        let mut server = Self {
            port: free_port()?,
            store: temporary.path().to_owned(),
            _temporary: Some(temporary),
            process: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// On `port` with its store kept in `store` across runs.
    pub fn start_in(store: &Path, port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store)?;
        let mut server = Self {
            port,
            store: store.to_owned(),
            _temporary: None,
            process: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// Starts it again on the same port and store (after [`NatsServer::stop`]). It runs
    /// with the users and permissions of `deploy/nats-auth.conf`, as a deployment does,
    /// each user's password being [`nats_password`].
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let binary = find_binary("nats-server", "NATS_SERVER_BIN", &[])?;
        let log = self.store.join("nats.log");
        let config = self.store.join("nats.conf");
        // nats-server includes files relative to the including one: a copy goes beside it.
        let auth = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats-auth.conf");
        std::fs::copy(&auth, self.store.join("nats-auth.conf"))
            .with_context(|| format!("copying {}", auth.display()))?;
        std::fs::write(
            &config,
            format!(
                "host: 127.0.0.1\nport: {}\njetstream {{ store_dir: \"{}\" }}\ninclude \"nats-auth.conf\"\n",
                self.port,
                self.store.join("jetstream").display(),
            ),
        )?;
        let passwords: Vec<String> = NATS_USERS
            .iter()
            .map(|user| {
                format!(
                    "CLOSEDLOOP_NATS_{}_PASSWORD='{}'",
                    user.to_uppercase(),
                    nats_password(user)
                )
            })
            .collect();
        let command = format!(
            "env {} '{}' -c '{}' -P '{}'",
            passwords.join(" "),
            binary.display(),
            config.display(),
            self.pid_file().display()
        );
        self.process = Some(Guarded::spawn(None, &command, &log, None)?);
        wait_for_port(self.port, Duration::from_secs(20), "nats-server", &log)
    }

    /// Stops the server (the store is kept).
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.store.join("nats.pid")
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file()).ok()?.trim().parse().ok()
    }

    /// Kills the server with SIGKILL, as a crash would (the store is kept); [`resume`]
    /// starts it again.
    ///
    /// [`resume`]: NatsServer::resume
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.pid_file())?;
        kill_and_wait(pid.trim(), "KILL")?;
        self.stop();
        Ok(())
    }

    /// Where it listens, as the `admin` user (who may do everything): for tests, tools and
    /// benchmarks that inspect or drive the bus themselves.
    pub fn url(&self) -> String {
        format!("nats://admin:{}@127.0.0.1:{}", nats_password("admin"), self.port)
    }

    /// Where it listens, without credentials: services connect here as their own user.
    pub fn service_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// The users of `deploy/nats-auth.conf`.
pub const NATS_USERS: [&str; 6] = ["ingest", "classify", "dispatch", "notify", "connect", "admin"];

/// The password the harness gives a bus user.
pub fn nats_password(user: &str) -> String {
    format!("harness-{user}-secret")
}

/// Sends `signal` to process `pid` and waits until it is gone.
fn kill_and_wait(pid: &str, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").args([&format!("-{signal}"), pid]).status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie has exited; its parent (the guard) reaps it when told to stop.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        if Instant::now() > deadline {
            bail!("process {pid} still runs a minute after SIGKILL/SIGQUIT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A PostgreSQL cluster in a temporary directory, trust auth for `postgres` on loopback.
pub struct Postgres {
    pub port: u16,
    process: Option<Guarded>,
    data_dir: PathBuf,
    remove_when_done: bool,
    durable: bool,
    /// Set for a cluster that can crash and restart: removed on drop, after the server.
    _temporary: Option<tempfile::TempDir>,
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn postgres_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse(); // newest major version first
    dirs
}

impl Postgres {
    /// Starts a cluster in `data_dir` (initialising it if empty) on `port`. With
    /// `remove_when_done`, the directory goes when the server stops.
    pub fn start_in(data_dir: &Path, port: u16, remove_when_done: bool) -> anyhow::Result<Self> {
        Self::start_cluster(data_dir, port, remove_when_done, false)
    }

    /// Like [`Postgres::start_in`], but with PostgreSQL's durable defaults (fsync, synchronous
    /// commit, full page writes): what benchmarks measure, since commits cost what they
    /// would in production.
    pub fn start_durable_in(data_dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_cluster(data_dir, port, true, true)
    }

    /// A cluster on a free port that [`Postgres::crash`] and [`Postgres::resume`] can stop
    /// and start again with its data; removed when dropped. It keeps PostgreSQL's durable
    /// defaults: with asynchronous commit, an immediate shutdown loses commits already
    /// reported to the client, which a production server would not.
    pub fn start_restartable() -> anyhow::Result<Self> {
        let temporary = tempfile::Builder::new().prefix("closedloop-pg-").tempdir()?;
        let mut server = Self::start_cluster(temporary.path(), free_port()?, false, true)?;
        server._temporary = Some(temporary);
        Ok(server)
    }

    /// Stops the server as `pg_ctl stop -m immediate` does (SIGQUIT to the postmaster: no
    /// checkpoint, crash recovery at the next start), and waits until it is gone.
    pub fn crash(&mut self) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.data_dir.join("cluster").join("postmaster.pid"))?;
        let pid = pid.lines().next().unwrap_or_default().trim().to_owned();
        kill_and_wait(&pid, "QUIT")?;
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
        Ok(())
    }

    /// Starts the server again on its port and data (after [`Postgres::crash`]).
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let restarted = Self::start_cluster(&self.data_dir, self.port, self.remove_when_done, self.durable)?;
        self.process = restarted.process_taken();
        Ok(())
    }

    fn process_taken(mut self) -> Option<Guarded> {
        self.process.take()
    }

    fn start_cluster(
        data_dir: &Path,
        port: u16,
        remove_when_done: bool,
        durable: bool,
    ) -> anyhow::Result<Self> {
        let extra = postgres_bin_dirs();
        let initdb = find_binary("initdb", "CLOSEDLOOP_INITDB", &extra)?;
        let postgres = find_binary("postgres", "CLOSEDLOOP_POSTGRES", &extra)?;
        let run_as = running_as_root().then_some("postgres");
        std::fs::create_dir_all(data_dir)?;
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .args(["-R", &format!("{user}:"), &data_dir.display().to_string()])
                .status()
                .context("chown of the PostgreSQL directory")?;
            if !status.success() {
                bail!(
                    "cannot hand {} to the {user} user (does the user exist?)",
                    data_dir.display()
                );
            }
        }
        let cluster = data_dir.join("cluster");
        let log = data_dir.join("postgres.log");
        if !cluster.join("PG_VERSION").exists() {
            let mut cmd = match run_as {
                Some(user) => {
                    let mut c = Command::new("runuser");
                    c.args(["-u", user, "--"]).arg(&initdb);
                    c
                }
                None => Command::new(&initdb),
            };
            let out = cmd
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(&cluster)
                .output()
                .context("running initdb")?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        // Durability settings off for tests: their data is thrown away, and this keeps them fast.
        let durability = if durable {
            ""
        } else {
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        };
        // Extra server flags for diagnosis, e.g.
        // `-c shared_preload_libraries=pg_stat_statements` while profiling a benchmark.
        let extra_flags = std::env::var("CLOSEDLOOP_POSTGRES_FLAGS").unwrap_or_default();
        let command = format!(
            "'{}' -D '{}' -p {port} -k '{}' -c listen_addresses=127.0.0.1 -c max_connections=300{durability} {extra_flags}",
            postgres.display(),
            cluster.display(),
            data_dir.display(),
        );
        let cleanup = remove_when_done.then_some(data_dir);
        let process = Guarded::spawn(run_as, &command, &log, cleanup)?;
        let server = Self {
            port,
            process: Some(process),
            data_dir: data_dir.to_owned(),
            remove_when_done,
            durable,
            _temporary: None,
        };
        server.wait_ready(&log)?;
        Ok(server)
    }

    fn wait_ready(&self, log: &Path) -> anyhow::Result<()> {
        wait_for_port(self.port, Duration::from_secs(60), "postgres", log)?;
        let pg_isready = find_binary("pg_isready", "CLOSEDLOOP_PG_ISREADY", &postgres_bin_dirs())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(&pg_isready)
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres on {} not ready in time", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One cluster per test process, shared by its tests; each test takes its own database.
    pub fn shared() -> anyhow::Result<&'static Postgres> {
        static SHARED: OnceLock<Mutex<Option<&'static Postgres>>> = OnceLock::new();
        let slot = SHARED.get_or_init(|| Mutex::new(None));
        let mut slot = slot
            .lock()
            .map_err(|_| anyhow::anyhow!("postgres start panicked earlier"))?;
        if let Some(server) = *slot {
            return Ok(server);
        }
        let dir = tempfile::Builder::new()
            .prefix("closedloop-pg-")
            .tempdir()?
            .keep();
        let server: &'static Postgres = Box::leak(Box::new(Postgres::start_in(&dir, free_port()?, true)?));
        *slot = Some(server);
        Ok(server)
    }

    /// Creates `database` unless it exists.
    pub async fn ensure_database(&self, database: &str) -> anyhow::Result<String> {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&mut admin)
            .await?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE \"{database}\""))
                .execute(&mut admin)
                .await?;
        }
        admin.close().await?;
        Ok(self.url(database))
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a fresh database with a random name and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        use sqlx::Connection;
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(self.url(&name))
    }
}
