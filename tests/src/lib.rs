//! The harness for end-to-end tests and the local launcher: starts a real `nats-server`
//! (JetStream on) and a real PostgreSQL on free ports in temporary directories, a webhook
//! receiver standing in for channel gateways, and the four services in process — the same
//! library code their binaries run.

pub mod bench;
pub mod drive;
pub mod fake_wechat;
pub mod fake_weibo;
pub mod gateway;
pub mod processes;
pub mod servers;
pub mod system;
pub mod webhook;

use std::future::Future;
use std::time::{Duration, Instant};

/// A NATS client for `url`, with the user and password the URL carries (the harness's
/// nats-server requires them; see [`servers::NatsServer::url`]).
pub async fn nats(url: &str) -> anyhow::Result<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some((user, password)) = closedloop_runtime::config::url_credentials(url) {
        options = options.user_and_password(user, password);
    }
    Ok(options.connect(url).await?)
}

/// How many events the dead-letter stream holds.
pub async fn dead_letter_count(nats_url: &str) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(nats(nats_url).await?);
    let mut stream = js.get_stream(closedloop_runtime::bus::DEAD_LETTER_STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

/// Waits until `consumer` has parked an event in the dead-letter stream, and returns the
/// last it parked.
pub async fn dead_letter_of(
    nats_url: &str,
    consumer: &str,
) -> anyhow::Result<closedloop_runtime::dead_letters::DeadLetter> {
    let letters =
        closedloop_runtime::dead_letters::DeadLetters::new(async_nats::jetstream::new(nats(nats_url).await?));
    wait_for(
        &format!("an event parked by {consumer}"),
        Duration::from_secs(30),
        || letters.last_of(consumer),
    )
    .await
}

/// Waits until `probe` yields a value, checking every 20 ms, or fails after `timeout`
/// with `what` in the message. Tests wait on conditions, never on fixed sleeps.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `condition` holds; see [`wait_for`].
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Where [`free_port`] looks: below Linux's ephemeral range (32768–60999), from which the
/// kernel picks the source port of every outgoing connection. A port taken from that range
/// may be handed to some client's connection before the service that is to listen on it
/// binds it ("Address already in use", seen in the fault tests).
const PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A free TCP port on loopback (bound, checked, released), never the same one twice in a
/// process.
/// Serves `app` on `listener` in the background until `cancel` fires: the local stand-ins
/// for gateways and platforms. A failure is printed, naming `what`.
pub fn serve_in_background(
    what: &'static str,
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cancel: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let served = axum::serve(closedloop_runtime::grpc::http_listener(listener), app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await;
        if let Err(error) = served {
            eprintln!("{what} failed: {error}");
        }
    });
}

pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let span = u64::from(PORTS.end - PORTS.start);
    for _ in 0..1_000 {
        // A fresh randomly keyed hasher is random enough to spread the picks.
        let pick = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            % span;
        let port = PORTS.start + u16::try_from(pick)?;
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {PORTS:?} after 1,000 tries")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_distinct() -> anyhow::Result<()> {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        assert!(ports.iter().all(|port| PORTS.contains(port)), "{ports:?}");
        let distinct: std::collections::HashSet<&u16> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        Ok(())
    }
}
