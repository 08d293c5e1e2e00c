//! `closedloop-connect`: flags and environment in, the service out.

fn main() -> anyhow::Result<()> {
    closedloop_runtime::service::main::<closedloop_connect::Connect>()
}
