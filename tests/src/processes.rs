//! The four services as processes of their own binaries, as operators run them: for the
//! benchmarks, and for fault tests that kill one with SIGKILL and start it again. Each
//! service's output goes to `<logs>/<service>.log` (appended across restarts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use anyhow::Context;

use crate::system::{Service, SystemOptions};

/// Where the service binaries of this build are: `CLOSEDLOOP_BIN_DIR` if set, else the
/// target directory a test or benchmark executable runs from (`target/<profile>`, whether
/// the executable sits there or in its `deps/`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CLOSEDLOOP_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no directory for {}", exe.display()))?;
    if dir.ends_with("deps") {
        dir = dir
            .parent()
            .ok_or_else(|| anyhow::anyhow!("no directory above {}", dir.display()))?;
    }
    Ok(dir.to_owned())
}

/// The service processes a run started. Dropped, it kills them, so no service outlives a
/// run that failed part way.
pub struct ServiceProcesses {
    bin_dir: PathBuf,
    options: SystemOptions,
    logs: PathBuf,
    children: Vec<(Service, Child)>,
}

impl ServiceProcesses {
    /// Starts the four service binaries from `bin_dir` with `options`.
    pub fn spawn(bin_dir: &Path, options: &SystemOptions, logs: &Path) -> anyhow::Result<Self> {
        let mut processes = Self {
            bin_dir: bin_dir.to_owned(),
            options: options.clone(),
            logs: logs.to_owned(),
            children: Vec::new(),
        };
        for service in Service::ALL {
            processes.start(service)?;
        }
        Ok(processes)
    }

    fn start(&mut self, service: Service) -> anyhow::Result<()> {
        let binary = self.bin_dir.join(format!("closedloop-{}", service.name()));
        anyhow::ensure!(
            binary.exists(),
            "{} not found: build the services first (cargo build --bins, or --release for benchmarks)",
            binary.display()
        );
        let args = service.command_line(&self.options);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(service))?;
        let child = Command::new(&binary)
            .args(&args[1..])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        self.children.push((service, child));
        Ok(())
    }

    fn log_path(&self, service: Service) -> PathBuf {
        self.logs.join(format!("{}.log", service.name()))
    }

    /// Each running service's process id.
    pub fn pids(&self) -> Vec<(Service, u32)> {
        self.children
            .iter()
            .map(|(service, child)| (*service, child.id()))
            .collect()
    }

    /// Kills `service` with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self, service: Service) -> anyhow::Result<()> {
        let index = self
            .children
            .iter()
            .position(|(s, _)| *s == service)
            .ok_or_else(|| anyhow::anyhow!("{} is not running", service.name()))?;
        let (_, mut child) = self.children.remove(index);
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts `service` again (after [`ServiceProcesses::kill`]).
    pub fn restart(&mut self, service: Service) -> anyhow::Result<()> {
        self.start(service)
    }

    /// The services that exited on their own, with how.
    pub fn exited(&mut self) -> Vec<(Service, ExitStatus)> {
        self.children
            .iter_mut()
            .filter_map(|(service, child)| child.try_wait().ok().flatten().map(|status| (*service, status)))
            .collect()
    }

    /// Why the services may not have come up: those that exited, each with the end of its log.
    pub fn exited_report(&mut self) -> String {
        let mut report = Vec::new();
        for (service, status) in self.exited() {
            let log = std::fs::read_to_string(self.log_path(service)).unwrap_or_default();
            // An error's backtrace would fill the tail; what went wrong is above it.
            let before_backtrace = log.split("\nStack backtrace:").next().unwrap_or_default();
            let lines: Vec<&str> = before_backtrace.lines().collect();
            let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
            report.push(format!(
                "{} exited with {status}; its log ends:\n  {tail}",
                service.name()
            ));
        }
        if report.is_empty() {
            "every service is still running".to_owned()
        } else {
            report.join("\n")
        }
    }

    /// SIGTERM for a graceful drain (the services exit on it), then waits for each; fails
    /// if one did not exit cleanly.
    pub fn stop(mut self) -> anyhow::Result<()> {
        for (_, child) in &mut self.children {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        let mut failed = Vec::new();
        for (service, mut child) in std::mem::take(&mut self.children) {
            let status = child.wait()?;
            if !status.success() {
                failed.push(format!("{} exited with {status}", service.name()));
            }
        }
        anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
        Ok(())
    }
}

impl Drop for ServiceProcesses {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
