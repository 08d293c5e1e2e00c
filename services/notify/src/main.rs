//! `closedloop-notify`: flags and environment in, the service out.

fn main() -> anyhow::Result<()> {
    closedloop_runtime::service::main::<closedloop_notify::Notify>()
}
