//! What every Closedloop service needs once: configuration, telemetry, the JetStream bus
//! (streams, publishing, the consume loop with its dead-letter stream), the gRPC server
//! bootstrap with auth, health and reflection, PostgreSQL, ids and shutdown.
//!
//! Services stay thin: they hold their domain logic and wire it to these edges.

pub mod archive;
pub mod auth;
pub mod batch;
pub mod bus;
pub mod chinese;
pub mod config;
pub mod consumer;
pub mod db;
pub mod dead_letters;
pub mod events;
pub mod grpc;
pub mod ids;
pub mod metrics;
pub mod pii;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod time;
pub mod webhook;

pub use config::Secret;

/// Every binary that links the runtime (the services, the local launcher, the benchmarks)
/// allocates with mimalloc. Under bench-loop's load glibc's allocator took 15-20% of notify's
/// CPU, much of it consolidating free chunks; see BENCHMARKS.md for the measured change.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
