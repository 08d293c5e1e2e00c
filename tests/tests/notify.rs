//! Notify end to end on real NATS and PostgreSQL: every message kind reaches the customer
//! (or staff) once, stale status updates are dropped, slow gateways cause no double
//! messages, and the first-response watchdog keeps the reply promise while classify is down.

use std::time::Duration;

use closedloop_e2e::system::{TestEnv, authed, contact};
use closedloop_e2e::wait_until;
use closedloop_e2e::webhook::ReceivedMessage;
use closedloop_proto::v1::*;
use closedloop_runtime::bus;
use prost::Message as _;

const WAIT: Duration = Duration::from_secs(30);

fn wechat_message(message_id: &str, locale: &str) -> ComplaintSubmission {
    let text = "My bill was charged twice this month, please refund";
    ComplaintSubmission {
        locale: locale.to_owned(),
        ..contact(Channel::Wechat, message_id, "o-customer", 0, text)
    }
}

/// Waits until a message of `kind` has reached the gateway. Notify handles a work order's
/// events concurrently, so messages of different events are ordered only by time: each
/// step waits for the last one's message, as a desk working at human speed would.
async fn delivered(env: &TestEnv, kind: &str) -> anyhow::Result<()> {
    wait_until(&format!("a {kind} to reach the gateway"), WAIT, || async {
        env.webhook.messages().iter().any(|m| m.field("kind") == kind)
    })
    .await
}

fn kinds(messages: &[ReceivedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|m| format!("{}:{}", m.field("channel"), m.field("kind")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_kind_reaches_customer_and_staff_once() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let complaint_id = env
        .submit(wechat_message("wx-kinds", "en-US"))
        .await?
        .complaint_id;
    let work_order = env.work_order_for(&complaint_id).await?;
    let id = work_order.work_order_id.clone();
    let mut client = env.work_orders().await?;
    let agent = &env.tokens.agent;
    delivered(&env, "acknowledgement").await?;

    client
        .accept_work_order(authed(
            agent,
            AcceptWorkOrderRequest {
                work_order_id: id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    delivered(&env, "status_update").await?;
    client
        .reply_to_customer(authed(
            agent,
            ReplyToCustomerRequest {
                work_order_id: id.clone(),
                text: "We found the double charge.".into(),
                ..Default::default()
            },
        ))
        .await?;
    delivered(&env, "agent_reply").await?;
    client
        .escalate_work_order(authed(
            agent,
            EscalateWorkOrderRequest {
                work_order_id: id.clone(),
                reason: "refund above my limit".into(),
                ..Default::default()
            },
        ))
        .await?;
    delivered(&env, "staff_alert").await?;
    client
        .resolve_work_order(authed(
            agent,
            ResolveWorkOrderRequest {
                work_order_id: id.clone(),
                resolution_note: "Refunded 20 yuan".into(),
                ..Default::default()
            },
        ))
        .await?;
    // Reopened once the survey is there, as a customer answering it would.
    delivered(&env, "satisfaction_survey").await?;
    client
        .reopen_work_order(authed(
            agent,
            ReopenWorkOrderRequest {
                work_order_id: id.clone(),
                reason: "still charged".into(),
                ..Default::default()
            },
        ))
        .await?;
    env.wait_idle().await?;

    let messages = env.webhook.messages();
    assert_eq!(
        kinds(&messages),
        vec![
            "wechat:acknowledgement",
            "wechat:status_update",
            "wechat:agent_reply",
            "staff:staff_alert",
            "wechat:closure",
            "wechat:satisfaction_survey",
            "wechat:reopened",
        ]
    );
    assert!(messages.iter().all(|m| m.signature_valid));
    let text = |kind: &str| {
        messages
            .iter()
            .find(|m| m.field("kind") == kind)
            .map(|m| m.field("text").to_owned())
    };
    assert_eq!(
        text("status_update").as_deref(),
        Some(
            format!(
                "Your issue (ref {}) is being worked on. We will get back to you soon.",
                &complaint_id[..8]
            )
            .as_str()
        )
    );
    assert!(
        text("agent_reply")
            .unwrap_or_default()
            .starts_with("We found the double charge.")
    );
    assert!(
        text("closure").unwrap_or_default().contains("Refunded 20 yuan"),
        "a private channel shows the note"
    );
    let alert = text("staff_alert").unwrap_or_default();
    assert!(alert.contains("refund above my limit"), "{alert}");
    assert!(
        ["P1", "P2", "P3", "P4"].iter().any(|priority| {
            alert.contains(&format!("（{priority}，")) || alert.contains(&format!("({priority}, "))
        }),
        "the alert shows the priority by its short name: {alert}"
    );
    let staff = messages
        .iter()
        .find(|m| m.field("kind") == "staff_alert")
        .map(|m| m.field("recipient").to_owned());
    assert_eq!(
        staff.as_deref(),
        Some("agent-7"),
        "the alert names who holds the work order"
    );
    env.shutdown().await
}

/// Nothing a customer is owed waits on the staff webhook: with it down, the customer still
/// hears that their complaint was assigned, while the alert to staff keeps being retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_webhook_outage_holds_back_no_customer_message() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    env.webhook.set_down_channel(Some("staff"));
    let complaint_id = env
        .submit(wechat_message("wx-staff-down", "zh-CN"))
        .await?
        .complaint_id;
    let work_order = env.work_order_for(&complaint_id).await?;
    env.work_orders()
        .await?
        .reassign_work_order(authed(
            &env.tokens.supervisor,
            ReassignWorkOrderRequest {
                work_order_id: work_order.work_order_id.clone(),
                assignee: "agent-7".into(),
                ..Default::default()
            },
        ))
        .await?;
    wait_until("the customer's status update", WAIT, || async {
        env.webhook.about(&complaint_id, "status_update").len() == 1
    })
    .await?;
    wait_until("the staff alert, tried and refused", WAIT, || async {
        env.webhook
            .attempts()
            .iter()
            .any(|m| m.field("channel") == "staff" && m.answered == 503)
    })
    .await?;
    assert!(
        env.webhook
            .messages()
            .iter()
            .all(|m| m.field("channel") != "staff"),
        "the staff webhook took nothing while down"
    );
    // Back up: the alert goes out, once.
    env.webhook.set_down_channel(None);
    wait_until("the staff alert once the webhook is back", WAIT, || async {
        env.webhook
            .messages()
            .iter()
            .any(|m| m.field("channel") == "staff")
    })
    .await?;
    env.wait_idle().await?;
    assert_eq!(env.webhook.about(&complaint_id, "status_update").len(), 1);
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_status_update_is_not_sent() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let complaint_id = env
        .submit(wechat_message("wx-stale", "zh-CN"))
        .await?
        .complaint_id;
    let work_order = env.work_order_for(&complaint_id).await?;
    let mut client = env.work_orders().await?;
    let id = work_order.work_order_id.clone();
    client
        .resolve_work_order(authed(
            &env.tokens.agent,
            ResolveWorkOrderRequest {
                work_order_id: id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    env.wait_idle().await?;

    // An "accepted" for version 2 — older than the resolution the customer was told about —
    // arrives late (say, from a lagging replica's relay).
    let mut stale = work_order.clone();
    stale.version = 2;
    stale.set_state(WorkOrderState::InProgress);
    let event = WorkOrderEvent {
        event_id: "late-accept".into(),
        kind: WorkOrderEventKind::Accepted as i32,
        work_order: Some(stale),
        actor: "agent-7".into(),
        ..Default::default()
    };
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    js.publish(
        bus::work_order_topic("accepted").subject("acme"),
        event.encode_to_vec().into(),
    )
    .await?
    .await?;
    env.wait_idle().await?;

    let messages = kinds(&env.webhook.messages());
    assert_eq!(
        messages,
        vec![
            "wechat:acknowledgement",
            "wechat:closure",
            "wechat:satisfaction_survey"
        ]
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_gateway_is_retried_under_one_key_and_the_customer_sees_one_message() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|options| {
        options
            .notify_args
            .extend(["--gateway-timeout-secs".into(), "1".into()]);
    })
    .await?;
    // The gateway takes the first call but answers after notify gave up waiting.
    env.webhook.slow_next(1, Duration::from_millis(2_500));
    let complaint_id = env.submit(wechat_message("wx-slow", "zh-CN")).await?.complaint_id;
    wait_until("a second, answered attempt", WAIT, || async {
        env.webhook.attempts().len() >= 2
    })
    .await?;
    env.wait_idle().await?;

    let attempts = env.webhook.attempts();
    assert!(
        attempts
            .iter()
            .all(|m| m.idempotency_key == attempts[0].idempotency_key),
        "one key"
    );
    assert_eq!(
        env.webhook.unique_messages().len(),
        1,
        "a gateway honouring the key shows it once"
    );
    let mut notifications = env.notifications().await?;
    let log = notifications
        .list_deliveries(authed(
            &env.tokens.agent,
            ListDeliveriesRequest {
                complaint_id,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .deliveries;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state(), DeliveryState::Delivered);
    assert!(log[0].last_error.is_empty());
    assert!(
        log[0].attempts >= 2,
        "the timed-out call counted: {}",
        log[0].attempts
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_acknowledges_when_classify_is_down_and_never_twice() -> anyhow::Result<()> {
    let mut env = TestEnv::start_with(|options| options.without_classify = true).await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            env.submit(wechat_message(&format!("wx-watchdog-{i}"), "zh-CN"))
                .await?
                .complaint_id,
        );
    }
    // The watchdog is set to 1 s in tests; allow for a slow machine, not for minutes.
    wait_until(
        "a first reply to every complaint",
        Duration::from_secs(15),
        || async {
            ids.iter()
                .all(|id| env.webhook.about(id, "acknowledgement").len() == 1)
        },
    )
    .await?;
    // The watchdog's consumer reads complaints a deadline behind, so it saw each one once, when
    // due, rather than once at arrival and again after being put back.
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&env.nats.url()).await?);
    let watchdog = js
        .get_stream(bus::COMPLAINTS_STREAM)
        .await?
        .consumer_info(closedloop_notify::WATCHDOG_CONSUMER)
        .await?;
    assert_eq!(
        watchdog.delivered.consumer_sequence, 3,
        "deliveries to the watchdog, one per complaint"
    );

    // Classify comes back and catches up: work orders appear, no second acknowledgement.
    env.system.start_classify().await?;
    env.system.wait_ready(&env.nats.url()).await?;
    env.wait_idle().await?;
    for id in &ids {
        assert_eq!(env.webhook.about(id, "acknowledgement").len(), 1, "{id}");
        env.work_order_for(id).await?;
    }
    assert_eq!(env.webhook.messages().len(), 3);
    env.shutdown().await
}

/// A delivery logged as sent whose `notification.delivered` could not be published (here
/// the stream is missing; a crash between the two leaves the same state) is told of when
/// its event comes back: the customer gets nothing twice, and the outcome is published
/// from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_event_that_failed_to_publish_is_published_on_redelivery() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|options| {
        // Room for retries while the stream is away, at the tests' 100 ms retry base.
        options.notify_args.extend(["--max-deliver".into(), "10".into()]);
    })
    .await?;
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&env.nats.url()).await?);
    js.delete_stream(bus::NOTIFICATIONS_STREAM).await?;

    let complaint_id = env
        .submit(wechat_message("wx-unpublished", "zh-CN"))
        .await?
        .complaint_id;
    wait_until("the acknowledgement at the gateway", WAIT, || async {
        env.webhook.about(&complaint_id, "acknowledgement").len() == 1
    })
    .await?;
    // The publish after the record failed, so the event came back: a second delivery of
    // the one classified complaint.
    wait_until("a redelivery to notify", WAIT, || async {
        match js.get_stream(bus::COMPLAINTS_STREAM).await {
            Ok(stream) => stream
                .consumer_info(closedloop_notify::CLASSIFIED_CONSUMER)
                .await
                .is_ok_and(|info| info.delivered.consumer_sequence >= 2),
            Err(_) => false,
        }
    })
    .await?;

    let cancel = tokio_util::sync::CancellationToken::new();
    let bus = bus::Bus::connect(
        &closedloop_runtime::config::NatsConnectArgs::url(env.nats.url()),
        "test",
        &cancel,
    )
    .await?;
    bus.provision(&closedloop_e2e::servers::harness_streams()).await?;
    let subject = bus::NOTIFICATION_DELIVERED.subject("acme");
    let acknowledgements = || async {
        let mut found = Vec::new();
        let Ok(mut stream) = js.get_stream(bus::NOTIFICATIONS_STREAM).await else {
            return found;
        };
        let Ok(info) = stream.info().await else {
            return found;
        };
        for sequence in info.state.first_sequence..=info.state.last_sequence {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            if message.subject.as_str() != subject {
                continue;
            }
            if let Some(delivery) = NotificationDelivered::decode(message.payload.as_ref())
                .ok()
                .and_then(|event| event.delivery)
                && delivery.complaint_id == complaint_id
                && delivery.kind() == NotificationKind::Acknowledgement
            {
                found.push(delivery);
            }
        }
        found
    };
    wait_until("the delivered event, from the log", WAIT, || async {
        !acknowledgements().await.is_empty()
    })
    .await?;
    env.wait_idle().await?;

    let told = acknowledgements().await;
    assert_eq!(told.len(), 1, "told once: {told:?}");
    assert_eq!(told[0].state(), DeliveryState::Delivered);
    assert_eq!(told[0].attempts, 1, "as logged after the one call");
    assert_eq!(
        env.webhook.about(&complaint_id, "acknowledgement").len(),
        1,
        "the customer got it once"
    );
    cancel.cancel();
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sla_and_incident_alerts_reach_staff_once() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let complaint_id = env.submit(wechat_message("wx-sla", "zh-CN")).await?.complaint_id;
    let work_order = env.work_order_for(&complaint_id).await?;
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);

    // Dispatch's SLA watcher and incident detector publish these; here the test does, each
    // twice under different message ids, as a redelivery past the dedup window would.
    for (kind, version, name) in [
        (WorkOrderEventKind::SlaAtRisk, 2, "sla_at_risk"),
        (WorkOrderEventKind::SlaBreached, 3, "sla_breached"),
    ] {
        let mut at = work_order.clone();
        at.version = version;
        let event = WorkOrderEvent {
            event_id: format!("{name}-1"),
            kind: kind as i32,
            work_order: Some(at),
            note: "first response due in 3 min".into(),
            ..Default::default()
        };
        for copy in 0..2 {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{name}-copy-{copy}").as_str());
            let subject = bus::work_order_topic(name).subject("acme");
            js.publish_with_headers(subject, headers, event.encode_to_vec().into())
                .await?
                .await?;
        }
    }
    let incident = IncidentOpened {
        incident_id: "incident-1".into(),
        tenant: "acme".into(),
        category: "outage".into(),
        region: "广东 深圳".into(),
        complaint_count: 42,
        summary: "10 分钟内 42 条，平时 3 条".into(),
        ..Default::default()
    };
    for copy in 0..2 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("incident-copy-{copy}").as_str());
        js.publish_with_headers(
            bus::INCIDENT_OPENED.subject("acme"),
            headers,
            incident.encode_to_vec().into(),
        )
        .await?
        .await?;
    }
    env.wait_idle().await?;

    let alerts: Vec<String> = env
        .webhook
        .messages()
        .into_iter()
        .filter(|m| m.field("channel") == "staff")
        .map(|m| m.field("text").to_owned())
        .collect();
    assert_eq!(alerts.len(), 3, "{alerts:?}");
    assert!(
        alerts
            .iter()
            .any(|t| t.starts_with("【sla_at_risk】") && t.contains("first response due")),
        "{alerts:?}"
    );
    assert!(
        alerts.iter().any(|t| t.starts_with("【sla_breached】")),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .any(|t| t == "【突发事件】广东 深圳 outage：10 分钟内 42 条，平时 3 条"),
        "{alerts:?}"
    );
    env.shutdown().await
}

/// The claims bucket on a real nats-server, with two notify processes: a delivery is held
/// by one sender at a time; a watchdog's only-if-new claim of an existing delivery is not its
/// to send; a delivered one is done; a failed attempt leaves it to the next claimer with its
/// count; a sender that is gone loses what it held at once, before its deadline; what the
/// customer was told never moves backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_hold_each_delivery_for_one_live_sender() -> anyhow::Result<()> {
    use closedloop_notify::claims::{Attempt, Claim, Claims, Stage};

    let nats = closedloop_e2e::servers::NatsServer::start()?;
    let client = closedloop_e2e::nats(&nats.url()).await?;
    let js = async_nats::jetstream::new(client.clone());
    let settings = closedloop_e2e::servers::harness_streams();
    let lease = Duration::from_secs(60);
    let a = Claims::open(&js, client.clone(), &settings, lease).await?;
    let b = Claims::open(&js, client.clone(), &settings, lease).await?;
    let a_alive = tokio_util::sync::CancellationToken::new();
    let b_alive = tokio_util::sync::CancellationToken::new();
    let a_answering = tokio::spawn(a.clone().answer_while_alive(a_alive.clone()));
    let b_answering = tokio::spawn(b.clone().answer_while_alive(b_alive.clone()));
    let id = |n: u128| uuid::Uuid::from_u128(n).to_string();
    wait_until("both senders answer", WAIT, || async {
        client.request(a.liveness_subject(), "".into()).await.is_ok()
            && client.request(b.liveness_subject(), "".into()).await.is_ok()
    })
    .await?;

    let Claim::Mine(held) = a.claim(&id(1), false, false).await? else {
        anyhow::bail!("a new delivery is the first claimer's");
    };
    assert!(
        matches!(a.claim(&id(1), false, false).await?, Claim::Busy),
        "held by another task of this process"
    );
    assert!(
        matches!(b.claim(&id(1), false, false).await?, Claim::Busy),
        "held by a live sender"
    );
    assert!(
        matches!(b.claim(&id(1), true, false).await?, Claim::NotOurs),
        "the watchdog's rule"
    );
    assert!(
        matches!(b.claim(&id(2), true, false).await?, Claim::Mine(_)),
        "new: the watchdog's"
    );

    let recorded = a.record(held, Attempt::Delivered, "").await?;
    assert_eq!((recorded.stage, recorded.attempts), (Stage::Delivered, 1));
    match b.claim(&id(1), false, false).await? {
        Claim::Done(record) => assert_eq!(record.stage, Stage::Delivered),
        other => anyhow::bail!("expected a finished delivery, got {other:?}"),
    }

    let Claim::Mine(failing) = a.claim(&id(3), false, false).await? else {
        anyhow::bail!("a new delivery");
    };
    a.record(failing, Attempt::Failed, "HTTP 503").await?;
    match b.claim(&id(3), false, false).await? {
        Claim::Mine(_) => {}
        other => anyhow::bail!("a failed attempt leaves it to the next claimer, got {other:?}"),
    }

    let Claim::Mine(_orphan) = a.claim(&id(4), false, false).await? else {
        anyhow::bail!("a new delivery");
    };
    a_alive.cancel();
    a_answering.await?;
    match b.claim(&id(4), false, false).await? {
        Claim::Mine(_) => {}
        other => anyhow::bail!("a gone sender's delivery is taken over at once, got {other:?}"),
    }

    let work_order = id(99);
    assert_eq!(b.told(&work_order).await?, 0, "never told");
    b.advance_told(&work_order, 3).await?;
    b.advance_told(&work_order, 2).await?;
    assert_eq!(b.told(&work_order).await?, 3, "never backwards");
    b_alive.cancel();
    b_answering.await?;
    Ok(())
}

/// The delivery log on the real schema: outcomes are written once per delivery; a delivery
/// logged as delivered stays so when an older failure arrives after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_log_keeps_the_latest_word_of_each_delivery() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let options = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&env.database_url)?
        .options([("search_path", closedloop_notify::SCHEMA)]);
    let pool = sqlx::PgPool::connect_with(options).await?;
    let outcome = |n: u128, state: DeliveryState, attempts: i32| Delivery {
        delivery_id: uuid::Uuid::from_u128(n).to_string(),
        tenant: "acme".into(),
        kind: NotificationKind::Acknowledgement as i32,
        state: state as i32,
        channel: Channel::Wechat as i32,
        recipient: "u-1".into(),
        complaint_id: "c-log".into(),
        body: "已收到".into(),
        attempts,
        ..Default::default()
    };
    closedloop_notify::store::log_outcomes(
        &pool,
        &[
            outcome(1, DeliveryState::Delivered, 1),
            outcome(2, DeliveryState::Failed, 3),
            outcome(2, DeliveryState::Failed, 4),
        ],
    )
    .await?;
    closedloop_notify::store::log_outcomes(&pool, &[outcome(1, DeliveryState::Failed, 2)]).await?;
    let (logged, _) = closedloop_runtime::db::list_page(
        &pool,
        "acme",
        &closedloop_notify::store::ListFilter {
            complaint_id: Some("c-log".into()),
            ..Default::default()
        },
        10,
        "",
    )
    .await?;
    let mut logged: Vec<(String, DeliveryState, i32)> = logged
        .into_iter()
        .map(|d| (d.delivery_id.clone(), d.state(), d.attempts))
        .collect();
    logged.sort();
    assert_eq!(
        logged,
        [
            (uuid::Uuid::from_u128(1).to_string(), DeliveryState::Delivered, 1),
            (uuid::Uuid::from_u128(2).to_string(), DeliveryState::Failed, 4),
        ]
    );
    pool.close().await;
    env.shutdown().await
}

/// Every service pool works in its own schema, names its sessions after the service, plans
/// each execution for its arguments and the table as it is then, and compiles nothing. Under PostgreSQL's
/// default a connection may settle on a generic plan costed while a table was nearly
/// empty: in bench-loop, notify's 40-key `customer_progress` lookup kept scanning the whole
/// table (20 ms a batch, growing with the table) for as long as nothing analysed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_pools_use_their_schema_and_plan_every_execution() -> anyhow::Result<()> {
    let server = closedloop_e2e::servers::Postgres::shared()?;
    let args = closedloop_runtime::config::DatabaseArgs {
        database_url: closedloop_runtime::Secret::new(server.ensure_database("pool_settings").await?),
        database_max_connections: 1,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let pool =
        closedloop_runtime::db::connect(&args, "pool_probe", &sqlx::migrate::Migrator::DEFAULT, &cancel)
            .await?;
    let search_path: String = sqlx::query_scalar("SHOW search_path").fetch_one(&pool).await?;
    let plan_cache_mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&pool)
        .await?;
    let application_name: String = sqlx::query_scalar("SHOW application_name")
        .fetch_one(&pool)
        .await?;
    let jit: String = sqlx::query_scalar("SHOW jit").fetch_one(&pool).await?;
    assert_eq!(jit, "off", "no JIT compilation of short statements");
    assert_eq!(search_path, "pool_probe");
    assert_eq!(plan_cache_mode, "force_custom_plan");
    assert_eq!(
        application_name, "closedloop-pool_probe",
        "named after the service"
    );
    pool.close().await;

    // A name in the URL is the operator's choice and stays.
    let named = closedloop_runtime::config::DatabaseArgs {
        database_url: closedloop_runtime::Secret::new(format!(
            "{}?application_name=billing-replica",
            server.ensure_database("pool_settings").await?
        )),
        database_max_connections: 1,
    };
    let pool =
        closedloop_runtime::db::connect(&named, "pool_probe", &sqlx::migrate::Migrator::DEFAULT, &cancel)
            .await?;
    let application_name: String = sqlx::query_scalar("SHOW application_name")
        .fetch_one(&pool)
        .await?;
    assert_eq!(application_name, "billing-replica");
    pool.close().await;
    Ok(())
}
