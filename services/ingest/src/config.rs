//! Ingest configuration: flags and `CLOSEDLOOP_*` environment variables.

use std::net::SocketAddr;

use closedloop_runtime::config::ServiceArgs;

use crate::validate::Limits;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "closedloop-ingest",
    about = "Closedloop ingest: the front door for channel gateways"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "CLOSEDLOOP_INGEST_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Longest complaint text accepted, in characters.
    #[arg(long, env = "CLOSEDLOOP_MAX_TEXT_CHARS", default_value_t = 20_000)]
    pub max_text_chars: usize,
    /// Most complaints in one SubmitComplaints call.
    #[arg(long, env = "CLOSEDLOOP_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,
    #[command(flatten)]
    pub service: ServiceArgs,
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_text_chars: self.max_text_chars,
            max_batch: self.max_batch,
            ..Limits::default()
        }
    }
}
