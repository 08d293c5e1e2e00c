//! Turns SIGTERM and SIGINT into a cancellation token that every task of a service watches.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; finishing in-flight work");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the service");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs a service until it returns. Once `cancel` fires, the service has `grace` to finish
/// in-flight work; past that it is abandoned with an error, so a stuck drain cannot keep a
/// replica from exiting.
pub async fn run_with_grace(
    service: impl std::future::Future<Output = anyhow::Result<()>>,
    cancel: CancellationToken,
    grace: std::time::Duration,
) -> anyhow::Result<()> {
    tokio::pin!(service);
    tokio::select! {
        result = &mut service => return result,
        _ = cancel.cancelled() => {}
    }
    match tokio::time::timeout(grace, service).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!("in-flight work did not finish within {grace:?} of the shutdown signal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_drain_that_hangs_is_cut_off_after_the_grace_period() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let stuck = std::future::pending::<anyhow::Result<()>>();
        let result = run_with_grace(stuck, cancel, Duration::from_millis(20)).await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn a_service_that_drains_in_time_returns_its_result() {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let service = async move {
            token.cancelled().await;
            Ok(())
        };
        cancel.cancel();
        assert!(
            run_with_grace(service, cancel, Duration::from_secs(1))
                .await
                .is_ok()
        );
    }
}
