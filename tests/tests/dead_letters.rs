//! `closedloop-admin dead-letters`, run as operators run it, against a live system: it lists
//! what is parked grouped by consumer and reason, shows one event decoded, and replays
//! events to where they came from; a message a gateway refused for good is tried again
//! when its event is replayed. The binary must be built (`scripts/test.sh` builds it).

use std::time::Duration;

use closedloop_e2e::processes::bin_dir;
use closedloop_e2e::system::TestEnv;
use closedloop_e2e::wait_until;
use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster};
use closedloop_runtime::bus;

const WAIT: Duration = Duration::from_secs(30);

/// Runs `closedloop-admin` against `nats_url`; returns whether it succeeded, and what it
/// printed (stdout, then stderr).
async fn admin(nats_url: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let output = tokio::process::Command::new(bin_dir()?.join("closedloop-admin"))
        .arg("--nats-url")
        .arg(nats_url)
        .args(args)
        .output()
        .await?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), printed))
}

async fn parked(js: &async_nats::jetstream::Context, consumer: &str) -> Option<u64> {
    closedloop_runtime::dead_letters::DeadLetters::new(js.clone())
        .last_of(consumer)
        .await
        .map(|letter| letter.sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_show_and_replay_dead_letters() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let nats = env.nats.url();
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&nats).await?);

    // A gateway that refuses for good, and an event nothing can decode.
    env.webhook.fail_next_with(usize::MAX, 410);
    let refused = env
        .submit(ComplaintSubmission {
            channel: Channel::Wechat as i32,
            channel_message_id: "wx-refused".into(),
            poster: Some(Poster {
                poster_id: "o-customer".into(),
                ..Default::default()
            }),
            text: "话费被多扣了，要求退款".into(),
            locale: "zh-CN".into(),
            ..Default::default()
        })
        .await?;
    js.publish(
        bus::COMPLAINT_RECEIVED.subject("acme"),
        "not protobuf \u{1}".into(),
    )
    .await?
    .await?;
    wait_until("both parked", WAIT, || async {
        parked(&js, "notify-classified").await.is_some() && parked(&js, "classify").await.is_some()
    })
    .await?;
    let refused_at = parked(&js, "notify-classified")
        .await
        .ok_or_else(|| anyhow::anyhow!("parked a moment ago"))?;

    let (ok, listed) = admin(&nats, &["dead-letters", "list"]).await?;
    assert!(ok, "{listed}");
    assert!(
        listed.contains("notify-classified  delivery <id> refused: gateway answered HTTP 410"),
        "{listed}"
    );
    assert!(listed.contains("classify  undecodable payload"), "{listed}");

    let (ok, shown) = admin(&nats, &["dead-letters", "show", &refused_at.to_string()]).await?;
    assert!(ok, "{shown}");
    assert!(
        shown.contains("original subject:  closedloop.complaint.classified.acme"),
        "{shown}"
    );
    assert!(shown.contains("ComplaintClassified"), "{shown}");
    assert!(shown.contains(&refused.complaint_id), "{shown}");

    let (ok, refusal) = admin(&nats, &["dead-letters", "replay"]).await?;
    assert!(!ok && refusal.contains("name what to replay"), "{refusal}");

    // The gateway is fixed; the operator replays what notify parked.
    env.webhook.fail_next(0);
    let (ok, replayed) = admin(
        &nats,
        &["dead-letters", "replay", "--consumer", "notify-classified"],
    )
    .await?;
    assert!(ok, "{replayed}");
    assert!(replayed.contains("replayed 1 dead letter(s)"), "{replayed}");
    wait_until(
        "the acknowledgement, once the event is replayed",
        WAIT,
        || async { env.webhook.about(&refused.complaint_id, "acknowledgement").len() == 1 },
    )
    .await?;
    env.wait_idle().await?;

    let (ok, left) = admin(
        &nats,
        &["dead-letters", "list", "--consumer", "notify-classified"],
    )
    .await?;
    assert!(ok && left.contains("no dead letters"), "{left}");
    let (ok, left) = admin(&nats, &["dead-letters", "list"]).await?;
    assert!(
        ok && left.contains("classify  undecodable payload"),
        "what was not replayed stays: {left}"
    );
    assert_eq!(
        env.webhook.about(&refused.complaint_id, "acknowledgement").len(),
        1,
        "replayed once, sent once"
    );
    env.shutdown().await
}
