//! End-to-end tests of the closed loop on a real nats-server (JetStream) and PostgreSQL,
//! with the four services running in process and a webhook receiver as the gateway.

use std::time::Duration;

use closedloop_e2e::system::{TestEnv, authed, contact, refused};
use closedloop_e2e::wait_until;
use closedloop_proto::v1::*;
use closedloop_runtime::bus;
use prost::Message as _;
use tonic::Code;
use tonic_types::StatusExt;

const WAIT: Duration = Duration::from_secs(30);

fn outage_post(message_id: &str) -> ComplaintSubmission {
    let text = "家里宽带又断网了，已经三天了还没解决！";
    ComplaintSubmission {
        locale: "zh-CN".into(),
        ..contact(Channel::WeiboPost, message_id, "weibo-uid-42", 1200, text)
    }
}

/// Every work order `token` may list, two a page, so that paging is exercised.
async fn list_all(env: &TestEnv, token: &str) -> anyhow::Result<Vec<WorkOrder>> {
    env.list_work_orders(token, 2, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complaint_travels_the_whole_loop() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;

    let submitted = env.submit(outage_post("weibo-1001")).await?;
    assert!(!submitted.duplicate);
    let complaint_id = submitted.complaint_id;

    // Acknowledged on the customer's channel through the signed webhook.
    wait_until("the acknowledgement", WAIT, || async {
        !env.webhook.about(&complaint_id, "acknowledgement").is_empty()
    })
    .await?;
    let ack = &env.webhook.about(&complaint_id, "acknowledgement")[0];
    assert!(
        ack.signature_valid,
        "signature must verify with the gateway secret"
    );
    assert_eq!(ack.field("delivery_id"), ack.idempotency_key);
    assert_eq!(ack.field("channel"), "weibo_post");
    assert_eq!(ack.field("recipient"), "weibo-uid-42");
    assert_eq!(ack.field("reply_to_message_id"), "weibo-1001");
    assert!(ack.field("text").contains("已收到"));

    // A work order was created and routed by category.
    let work_order = env.work_order_for(&complaint_id).await?;
    assert_eq!(work_order.state(), WorkOrderState::New);
    assert_eq!(work_order.category, "outage");
    assert_eq!(work_order.team, "network-ops");
    assert_eq!(work_order.version, 1);
    let due = |ts: &Option<prost_types::Timestamp>| ts.as_ref().map(|t| t.seconds).unwrap_or_default();
    assert!(due(&work_order.created_at) < due(&work_order.first_response_due));
    assert!(due(&work_order.first_response_due) < due(&work_order.resolution_due));

    // An agent resolves it; the customer gets the closure message.
    let mut work_orders = env.work_orders().await?;
    let resolved = work_orders
        .resolve_work_order(authed(
            &env.tokens.agent,
            ResolveWorkOrderRequest {
                work_order_id: work_order.work_order_id.clone(),
                resolution_note: "线路已修复".into(),
                expected_version: 1,
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order in response"))?;
    assert_eq!(resolved.state(), WorkOrderState::Resolved);
    assert_eq!(resolved.version, 2);

    wait_until("the closure message", WAIT, || async {
        !env.webhook.about(&complaint_id, "closure").is_empty()
    })
    .await?;
    let closure = &env.webhook.about(&complaint_id, "closure")[0];
    assert!(closure.signature_valid);
    assert_eq!(closure.field("work_order_id"), work_order.work_order_id);
    // A public post: the closure does not repeat the agent's note.
    assert!(!closure.field("text").contains("线路已修复"));

    // Resolving again is not a valid transition.
    refused(
        work_orders
            .resolve_work_order(authed(
                &env.tokens.agent,
                ResolveWorkOrderRequest {
                    work_order_id: work_order.work_order_id.clone(),
                    ..Default::default()
                },
            ))
            .await,
        Code::FailedPrecondition,
        "already resolved",
    )?;

    // The delivery log has the three messages, delivered.
    env.wait_idle().await?;
    let mut notifications = env.notifications().await?;
    let log = notifications
        .list_deliveries(authed(
            &env.tokens.agent,
            ListDeliveriesRequest {
                complaint_id: complaint_id.clone(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .deliveries;
    // The pipeline's own figures are served on /metrics.
    let notify_metrics = env
        .system
        .metrics
        .iter()
        .find(|(name, _)| *name == "notify")
        .map(|(_, addr)| *addr)
        .ok_or_else(|| anyhow::anyhow!("notify serves no metrics"))?;
    let text = reqwest::get(format!("http://{notify_metrics}/metrics"))
        .await?
        .text()
        .await?;
    let figure = |prefix: &str| -> f64 {
        text.lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(figure("closedloop_first_response_seconds_count") >= 1.0, "{text}");
    assert!(
        figure(r#"closedloop_deliveries_total{kind="closure",outcome="delivered"}"#) >= 1.0,
        "{text}"
    );
    assert!(figure(r#"closedloop_consumer_events_total{consumer="notify-workorders",outcome="ack"}"#) >= 1.0);
    // Each of this complaint's three deliveries was timed through every step.
    for step in ["claim", "send", "record", "publish"] {
        let count = format!(r#"closedloop_delivery_step_seconds_count{{step="{step}"}}"#);
        assert!(figure(&count) >= 3.0, "{count} in {text}");
    }
    assert!(
        figure("closedloop_notify_log_write_seconds_count") >= 1.0,
        "{text}"
    );
    assert!(figure("closedloop_notify_log_batch_size_count") >= 1.0, "{text}");
    assert!(
        text.contains("closedloop_complaints_received_total"),
        "ingest's figures share the registry"
    );

    let mut kinds: Vec<_> = log.iter().map(|d| (d.kind(), d.state())).collect();
    kinds.sort_by_key(|(k, _)| *k as i32);
    assert_eq!(
        kinds,
        vec![
            (NotificationKind::Acknowledgement, DeliveryState::Delivered),
            (NotificationKind::Closure, DeliveryState::Delivered),
            (NotificationKind::SatisfactionSurvey, DeliveryState::Delivered)
        ]
    );

    // notify's work-order consumer is handed only the events it tells someone about: the
    // resolution, not the creation.
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&env.nats.url()).await?);
    let mut work_order_events = js.get_stream(bus::WORK_ORDERS_STREAM).await?;
    let stored = work_order_events.info().await?.state.messages;
    let mut created = 0;
    let mut subjects = work_order_events
        .info_with_subjects(bus::work_order_event_topic(WorkOrderEventKind::Created).all_tenants())
        .await?;
    while let Some(subject) = futures::StreamExt::next(&mut subjects).await {
        created += subject?.1 as u64;
    }
    assert_eq!(created, 1, "the creation is in the stream");
    let notify_consumer = work_order_events
        .consumer_info(closedloop_notify::WORK_ORDER_CONSUMER)
        .await?;
    assert_eq!(
        notify_consumer.delivered.consumer_sequence,
        stored - created,
        "{stored} events stored"
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_create_one_work_order_and_one_message() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;

    let first = env.submit(outage_post("weibo-dup")).await?;
    let second = env.submit(outage_post("weibo-dup")).await?;
    assert_eq!(first.complaint_id, second.complaint_id);
    assert!(!first.duplicate);
    assert!(second.duplicate, "the stream recognised the retry");

    // A redelivery beyond JetStream's duplicate window: the same complaint published again
    // under a new message id. Dispatch and notify must still do nothing twice.
    env.wait_idle().await?;
    let complaint = Complaint {
        complaint_id: first.complaint_id.clone(),
        tenant: "acme".into(),
        channel: Channel::WeiboPost as i32,
        channel_message_id: "weibo-dup".into(),
        poster: Some(Poster {
            poster_id: "weibo-uid-42".into(),
            ..Default::default()
        }),
        text: "家里宽带又断网了".into(),
        ..Default::default()
    };
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "replayed-after-window");
    js.publish_with_headers(
        bus::COMPLAINT_RECEIVED.subject("acme"),
        headers,
        ComplaintReceived {
            complaint: Some(complaint),
        }
        .encode_to_vec()
        .into(),
    )
    .await?
    .await?;
    env.wait_idle().await?;

    let work_orders = list_all(&env, &env.tokens.agent).await?;
    assert_eq!(work_orders.len(), 1, "one work order for one complaint");
    assert_eq!(
        env.webhook.about(&first.complaint_id, "acknowledgement").len(),
        1,
        "one acknowledgement"
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_unauthenticated() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let mut ingest = env.ingest().await?;
    let request = SubmitComplaintRequest {
        complaint: Some(outage_post("no-token")),
    };
    refused(
        ingest.submit_complaint(request.clone()).await,
        Code::Unauthenticated,
        "no token",
    )?;
    refused(
        ingest
            .submit_complaint(authed("not-a-token", request.clone()))
            .await,
        Code::Unauthenticated,
        "bad token",
    )?;
    // An agent token may not submit as a gateway.
    refused(
        ingest.submit_complaint(authed(&env.tokens.agent, request)).await,
        Code::PermissionDenied,
        "wrong role",
    )?;

    let mut work_orders = env.work_orders().await?;
    refused(
        work_orders
            .list_work_orders(ListWorkOrdersRequest::default())
            .await,
        Code::Unauthenticated,
        "no token",
    )?;
    let mut classify = env.classify().await?;
    refused(
        classify
            .classify(ClassifyRequest {
                text: "断网了".into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "no token",
    )?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_work_orders_are_invisible() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let submitted = env.submit(outage_post("weibo-tenant")).await?;
    let work_order = env.work_order_for(&submitted.complaint_id).await?;

    let mut work_orders = env.work_orders().await?;
    let beta = &env.tokens.other_tenant;
    refused(
        work_orders
            .get_work_order(authed(
                beta,
                GetWorkOrderRequest {
                    work_order_id: work_order.work_order_id.clone(),
                },
            ))
            .await,
        Code::NotFound,
        "other tenant",
    )?;
    refused(
        work_orders
            .get_complaint_status(authed(
                beta,
                GetComplaintStatusRequest {
                    complaint_id: submitted.complaint_id.clone(),
                },
            ))
            .await,
        Code::NotFound,
        "other tenant",
    )?;
    refused(
        work_orders
            .resolve_work_order(authed(
                beta,
                ResolveWorkOrderRequest {
                    work_order_id: work_order.work_order_id.clone(),
                    ..Default::default()
                },
            ))
            .await,
        Code::NotFound,
        "other tenant",
    )?;
    assert!(list_all(&env, beta).await?.is_empty());
    assert_eq!(list_all(&env, &env.tokens.agent).await?.len(), 1);

    let mut notifications = env.notifications().await?;
    let beta_log = notifications
        .list_deliveries(authed(beta, ListDeliveriesRequest::default()))
        .await?
        .into_inner()
        .deliveries;
    assert!(beta_log.is_empty());
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_and_change_nothing() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let mut ingest = env.ingest().await?;
    let bad = ComplaintSubmission {
        tenant: "beta".into(),
        channel: 0,
        channel_message_id: String::new(),
        text: "   ".into(),
        attachment_urls: vec!["ftp://example.com/a.png".into()],
        ..Default::default()
    };
    let status = refused(
        ingest
            .submit_complaint(authed(
                &env.tokens.gateway,
                SubmitComplaintRequest { complaint: Some(bad) },
            ))
            .await,
        Code::InvalidArgument,
        "invalid",
    )?;
    let details = status.get_error_details();
    let fields: Vec<&str> = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.as_str()).collect())
        .unwrap_or_default();
    // Every violation the validator finds (its unit tests name each), as the field it names.
    assert_eq!(fields.len(), 6, "{fields:?}");
    for expected in [
        "complaint.tenant",
        "complaint.text",
        "complaint.attachment_urls[0]",
    ] {
        assert!(fields.contains(&expected), "{expected} missing from {fields:?}");
    }
    refused(
        ingest
            .submit_complaint(authed(
                &env.tokens.gateway,
                SubmitComplaintRequest { complaint: None },
            ))
            .await,
        Code::InvalidArgument,
        "missing complaint",
    )?;

    // An oversized request is refused from its length prefix, before decoding; tonic
    // answers OUT_OF_RANGE naming the limit.
    let mut huge = outage_post("huge");
    huge.text = "断".repeat(2_000_000);
    let status = refused(
        ingest
            .submit_complaint(authed(
                &env.tokens.gateway,
                SubmitComplaintRequest {
                    complaint: Some(huge),
                },
            ))
            .await,
        Code::OutOfRange,
        "too large",
    )?;
    assert!(status.message().contains("too large"), "{}", status.message());

    // Nothing reached the stream, nothing reached the customer, no work order exists.
    env.wait_idle().await?;
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(bus::COMPLAINTS_STREAM).await?.get_info().await?;
    assert_eq!(stream.state.messages, 0);
    assert!(env.webhook.messages().is_empty());
    assert!(list_all(&env, &env.tokens.agent).await?.is_empty());
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_with_its_reason() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    js.publish(
        bus::COMPLAINT_RECEIVED.subject("acme"),
        vec![0xff, 0xff, 0xff].into(),
    )
    .await?
    .await?;
    let dead = closedloop_e2e::dead_letter_of(&env.nats.url(), "classify").await?;
    assert!(
        dead.reason.contains("undecodable"),
        "reason was {:?}",
        dead.reason
    );
    assert_eq!(dead.payload.as_ref(), &[0xff, 0xff, 0xff]);
    // The pipeline is not blocked: a good complaint still goes through.
    let submitted = env.submit(outage_post("after-poison")).await?;
    wait_until("the acknowledgement", WAIT, || async {
        !env.webhook
            .about(&submitted.complaint_id, "acknowledgement")
            .is_empty()
    })
    .await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_dry_run_explains_and_publishes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let mut classify = env.classify().await?;
    let response = classify
        .classify(authed(
            &env.tokens.agent,
            ClassifyRequest {
                text: "话费乱扣，再不处理就去12315投诉".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    let classification = response
        .classification
        .ok_or_else(|| anyhow::anyhow!("no classification"))?;
    assert_eq!(classification.category, "billing");
    assert_eq!(classification.priority(), Priority::P1);
    assert!(classification.escalation_risk, "12315 is a regulator");
    assert_eq!(classification.influence_tier(), InfluenceTier::Regular);
    assert!(
        classification.reasons.iter().any(|r| r.contains("12315")),
        "{:?}",
        classification.reasons
    );
    assert!(!classification.reasons.is_empty());
    refused(
        classify
            .classify(authed(
                &env.tokens.agent,
                ClassifyRequest {
                    text: " ".into(),
                    ..Default::default()
                },
            ))
            .await,
        Code::InvalidArgument,
        "empty",
    )?;
    let oversized = ClassifyRequest {
        text: "断".repeat(20_001),
        ..Default::default()
    };
    let status = refused(
        classify.classify(authed(&env.tokens.agent, oversized)).await,
        Code::InvalidArgument,
        "too long",
    )?;
    assert!(
        status.message().contains("at most 20000 characters"),
        "{}",
        status.message()
    );

    // Invisible and full-width characters are read as ingest reads them.
    let folded = classify
        .classify(authed(
            &env.tokens.agent,
            ClassifyRequest {
                text: "话费乱扣\u{200b}，再不处理就去１２３１５投诉".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner()
        .classification
        .ok_or_else(|| anyhow::anyhow!("no classification"))?;
    assert!(folded.escalation_risk, "{:?}", folded.reasons);
    refused(
        classify
            .classify(authed(
                &env.tokens.agent,
                ClassifyRequest {
                    text: "\u{200b}\u{2060} \u{feff}".into(),
                    ..Default::default()
                },
            ))
            .await,
        Code::InvalidArgument,
        "nothing visible",
    )?;
    // A gateway's token submits contacts; it does not classify them.
    refused(
        classify
            .classify(authed(
                &env.tokens.gateway,
                ClassifyRequest {
                    text: "话费乱扣".into(),
                    ..Default::default()
                },
            ))
            .await,
        Code::PermissionDenied,
        "not a gateway's call",
    )?;

    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(bus::COMPLAINTS_STREAM).await?.get_info().await?;
    assert_eq!(stream.state.messages, 0, "a dry run publishes nothing");
    env.shutdown().await
}

async fn deliveries_of(env: &TestEnv, complaint_id: &str) -> anyhow::Result<Vec<Delivery>> {
    let mut notifications = env.notifications().await?;
    let request = ListDeliveriesRequest {
        complaint_id: complaint_id.to_owned(),
        ..Default::default()
    };
    Ok(notifications
        .list_deliveries(authed(&env.tokens.agent, request))
        .await?
        .into_inner()
        .deliveries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gateway_is_retried_and_the_customer_gets_one_message() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    env.webhook.fail_next(2);
    let submitted = env.submit(outage_post("weibo-flaky")).await?;
    wait_until("the acknowledgement", WAIT, || async {
        !env.webhook
            .about(&submitted.complaint_id, "acknowledgement")
            .is_empty()
    })
    .await?;
    env.wait_idle().await?;

    let attempts: Vec<_> = env
        .webhook
        .attempts()
        .into_iter()
        .filter(|m| m.field("complaint_id") == submitted.complaint_id)
        .collect();
    let answers: Vec<u16> = attempts.iter().map(|m| m.answered).collect();
    assert_eq!(answers, vec![500, 500, 200], "two failures, then delivered");
    assert!(
        attempts
            .iter()
            .all(|m| m.idempotency_key == attempts[0].idempotency_key),
        "one key for all tries"
    );
    assert_eq!(
        env.webhook
            .about(&submitted.complaint_id, "acknowledgement")
            .len(),
        1
    );

    let log = deliveries_of(&env, &submitted.complaint_id).await?;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state(), DeliveryState::Delivered);
    assert_eq!(log[0].attempts, 3);
    env.shutdown().await
}

/// A gateway that keeps failing delays the reply; it never parks the event. The event is
/// kept (no redelivery, so none of its budget is spent), retried with growing waits past the
/// breaker's pauses, and delivered once under one key when the gateway answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_keeps_failing_delays_the_reply_and_never_parks_it() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|options| {
        options
            .notify_args
            .extend(["--breaker-cooldown-secs".into(), "1".into()]);
    })
    .await?;
    // More failures than the five deliveries an event's budget allows.
    let failures = 7;
    env.webhook.fail_next(failures);
    let submitted = env.submit(outage_post("weibo-gateway-down")).await?;
    wait_until("the reply once the gateway answers", WAIT, || async {
        env.webhook
            .about(&submitted.complaint_id, "acknowledgement")
            .len()
            == 1
    })
    .await?;
    env.wait_idle().await?;

    let attempts: Vec<_> = env
        .webhook
        .attempts()
        .into_iter()
        .filter(|m| m.field("kind") == "acknowledgement")
        .collect();
    assert_eq!(
        attempts.len(),
        failures + 1,
        "every failure retried, then one success"
    );
    assert!(
        attempts
            .iter()
            .all(|m| m.idempotency_key == attempts[0].idempotency_key),
        "one key"
    );
    // Retries back off: each wait about doubles (base 100 ms in tests, +-20% jitter).
    // Compared two apart (a 4x ratio), so scheduling noise on a busy machine cannot flip it.
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[2] > gaps[0], "gaps must grow: {gaps:?}");
    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let parked = closedloop_e2e::dead_letter_count(&env.nats.url()).await?;
    assert_eq!(parked, 0, "nothing dead-lettered");
    let notify = js
        .get_stream(bus::COMPLAINTS_STREAM)
        .await?
        .consumer_info(closedloop_notify::CLASSIFIED_CONSUMER)
        .await?;
    assert_eq!(notify.num_redelivered, 0, "kept in hand, not handed back");
    let log = deliveries_of(&env, &submitted.complaint_id).await?;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state(), DeliveryState::Delivered);
    assert_eq!(log[0].attempts, failures as i32 + 1);
    env.shutdown().await
}

/// A gateway that refuses a message for good (a 4xx other than 408, 425 and 429) gets it
/// once: the event is parked in the dead-letter stream with the reason, and the log and a
/// `notification.failed` event say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_for_good_is_parked_with_its_reason() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    env.webhook.fail_next_with(usize::MAX, 410);
    let submitted = env.submit(outage_post("weibo-gateway-gone")).await?;

    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let dead = closedloop_e2e::dead_letter_of(&env.nats.url(), "notify-classified").await?;
    assert!(dead.reason.contains("HTTP 410"), "{}", dead.reason);
    assert_eq!(dead.deliveries, "1");
    assert_eq!(dead.subject, bus::COMPLAINT_CLASSIFIED.subject("acme"));
    env.wait_idle().await?;
    let attempts: Vec<_> = env
        .webhook
        .attempts()
        .into_iter()
        .filter(|m| m.field("complaint_id") == submitted.complaint_id)
        .collect();
    assert_eq!(attempts.len(), 1, "refused for good: not tried again");
    let log = deliveries_of(&env, &submitted.complaint_id).await?;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].state(), DeliveryState::Failed);
    assert_eq!(log[0].attempts, 1);
    assert!(log[0].last_error.contains("HTTP 410"), "{}", log[0].last_error);
    let failed = js
        .get_stream(bus::NOTIFICATIONS_STREAM)
        .await?
        .get_last_raw_message_by_subject(&bus::NOTIFICATION_FAILED.subject("acme"))
        .await?;
    let failed = NotificationFailed::decode(failed.payload.as_ref())?;
    assert!(failed.reason.contains("HTTP 410"));
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_complaint_across_the_bus() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let submitted = env.submit(outage_post("weibo-traced")).await?;
    env.work_order_for(&submitted.complaint_id).await?;
    env.wait_idle().await?;

    let client = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let trace_id = |message: &async_nats::jetstream::message::StreamMessage| {
        let header = message
            .headers
            .get("traceparent")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        // traceparent = version-traceid-spanid-flags
        header.split('-').nth(1).unwrap_or_default().to_owned()
    };
    let complaints = js.get_stream(bus::COMPLAINTS_STREAM).await?;
    let received = complaints
        .get_last_raw_message_by_subject(&bus::COMPLAINT_RECEIVED.subject("acme"))
        .await?;
    let classified = complaints
        .get_last_raw_message_by_subject(&bus::COMPLAINT_CLASSIFIED.subject("acme"))
        .await?;
    let created = js
        .get_stream(bus::WORK_ORDERS_STREAM)
        .await?
        .get_last_raw_message_by_subject(&bus::work_order_topic("created").subject("acme"))
        .await?;
    let trace = trace_id(&received);
    assert_eq!(trace.len(), 32, "ingest published a traceparent");
    assert_eq!(trace_id(&classified), trace, "classify continued the trace");
    assert_eq!(
        trace_id(&created),
        trace,
        "dispatch's work-order event continued the trace"
    );

    // The CloudEvents headers ride along.
    let header = |name: &str| {
        received
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header("ce-specversion"), "1.0");
    assert_eq!(header("ce-type"), "closedloop.complaint.received.v1");
    assert_eq!(header("ce-source"), "closedloop/ingest");
    assert_eq!(header("content-type"), "application/protobuf");
    assert_eq!(
        header("Nats-Msg-Id"),
        format!("received:{}", submitted.complaint_id)
    );

    // A gateway that sends its own `traceparent` gets its trace continued.
    let gateway_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut request = authed(
        &env.tokens.gateway,
        SubmitComplaintRequest {
            complaint: Some(outage_post("weibo-traced-by-gateway")),
        },
    );
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{gateway_trace}-b7ad6b7169203331-01").parse()?,
    );
    env.ingest().await?.submit_complaint(request).await?;
    let received = complaints
        .get_last_raw_message_by_subject(&bus::COMPLAINT_RECEIVED.subject("acme"))
        .await?;
    assert_eq!(
        trace_id(&received),
        gateway_trace,
        "ingest continued the gateway's trace"
    );
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reports_each_item() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    env.submit(outage_post("weibo-b1")).await?;
    let mut bad = outage_post("weibo-b3");
    bad.text = String::new();
    let mut ingest = env.ingest().await?;
    // Another poster: the same poster's second outage report would join the first work order.
    let mut second = outage_post("weibo-b2");
    if let Some(poster) = second.poster.as_mut() {
        poster.poster_id = "weibo-uid-43".into();
    }
    let request = SubmitComplaintsRequest {
        complaints: vec![outage_post("weibo-b1"), second, bad],
    };
    let results = ingest
        .submit_complaints(authed(&env.tokens.gateway, request))
        .await?
        .into_inner()
        .results;
    let outcomes: Vec<_> = results.iter().map(|r| r.outcome()).collect();
    assert_eq!(
        outcomes,
        vec![
            SubmissionOutcome::Duplicate,
            SubmissionOutcome::Accepted,
            SubmissionOutcome::Rejected
        ]
    );
    assert!(
        results[2].reason.contains("complaints[2].text"),
        "{}",
        results[2].reason
    );
    env.wait_idle().await?;
    assert_eq!(list_all(&env, &env.tokens.agent).await?.len(), 2);
    env.shutdown().await
}

/// The median of `calls` sequential runs of `call`, in milliseconds.
async fn sequential_median_ms<F, Fut>(calls: usize, mut call: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut took = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = std::time::Instant::now();
        call().await?;
        took.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    Ok(took[took.len() / 2])
}

/// A sequential client on one connection must not meet Nagle's algorithm against its own
/// delayed ACK: without `TCP_NODELAY` on the listener every small call takes a flat ~40 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_answer_without_the_delayed_ack_stall() -> anyhow::Result<()> {
    const CALLS: usize = 60;
    const STALL_FREE_MS: f64 = 5.0;
    let env = TestEnv::start().await?;
    let accepted = env.submit(outage_post("nodelay-1")).await?;
    env.wait_idle().await?;

    let classify = env.classify().await?;
    let classify_ms = sequential_median_ms(CALLS, || {
        let mut classify = classify.clone();
        let request = authed(
            &env.tokens.agent,
            ClassifyRequest {
                text: "宽带断网了，三天了还没修好".into(),
                ..Default::default()
            },
        );
        async move {
            classify.classify(request).await?;
            Ok(())
        }
    })
    .await?;
    let work_orders = env.work_orders().await?;
    let status_ms = sequential_median_ms(CALLS, || {
        let mut client = work_orders.clone();
        let request = authed(
            &env.tokens.agent,
            GetComplaintStatusRequest {
                complaint_id: accepted.complaint_id.clone(),
            },
        );
        async move {
            client.get_complaint_status(request).await?;
            Ok(())
        }
    })
    .await?;
    let list_ms = sequential_median_ms(CALLS, || {
        let mut client = work_orders.clone();
        let request = authed(
            &env.tokens.agent,
            ListWorkOrdersRequest {
                page_size: 50,
                ..Default::default()
            },
        );
        async move {
            client.list_work_orders(request).await?;
            Ok(())
        }
    })
    .await?;
    // HTTP on one kept-alive connection: a repeated (deduplicated) JSON submission, and
    // `/metrics`. HTTP/1 responses leave in one write today, so these stay fast even
    // without the option; the runtime's unit tests check it is set on every HTTP listener.
    let http = reqwest::Client::new();
    let submission = serde_json::json!({"complaint": {"channel": "weibo_post",
        "channel_message_id": "nodelay-1", "poster": {"poster_id": "weibo-uid-42"},
        "text": "家里宽带又断网了"}})
    .to_string();
    let submit_url = format!("http://{}/v1/complaints", env.system.ingest_http);
    let json_ms = sequential_median_ms(CALLS, || {
        let request = http
            .post(&submit_url)
            .bearer_auth(&env.tokens.gateway)
            .header("content-type", "application/json")
            .body(submission.clone());
        async move {
            request.send().await?.error_for_status()?.bytes().await?;
            Ok(())
        }
    })
    .await?;
    let metrics = env
        .system
        .metrics
        .iter()
        .find(|(name, _)| *name == "ingest")
        .map(|(_, addr)| format!("http://{addr}/metrics"))
        .ok_or_else(|| anyhow::anyhow!("ingest serves no /metrics"))?;
    let metrics_ms = sequential_median_ms(CALLS, || {
        let request = http.get(&metrics);
        async move {
            request.send().await?.error_for_status()?.bytes().await?;
            Ok(())
        }
    })
    .await?;

    let medians = [
        ("Classify", classify_ms),
        ("GetComplaintStatus", status_ms),
        ("ListWorkOrders", list_ms),
        ("POST /v1/complaints", json_ms),
        ("GET /metrics", metrics_ms),
    ];
    println!("sequential medians (ms): {medians:?}");
    for (rpc, median) in medians {
        assert!(
            median < STALL_FREE_MS,
            "{rpc}: median {median:.2} ms over {CALLS} sequential calls"
        );
    }
    env.shutdown().await
}

/// Pages of a filtered listing hold every match once; a page token is good only for the
/// tenant and the filters it was issued to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tokens_are_bound_to_their_tenant_and_filters() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let mut submitted = Vec::new();
    for n in 0..5 {
        // Each from its own poster, so that none joins another's work order.
        let mut post = outage_post(&format!("paged-{n}"));
        if let Some(poster) = post.poster.as_mut() {
            poster.poster_id = format!("weibo-uid-paged-{n}");
        }
        submitted.push(env.submit(post).await?.complaint_id);
    }
    env.wait_idle().await?;

    let mut work_orders = env.work_orders().await?;
    let by_team = |page_token: String| ListWorkOrdersRequest {
        team: "network-ops".into(),
        page_size: 2,
        page_token,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut first_token = None;
    loop {
        let page = work_orders
            .list_work_orders(authed(&env.tokens.agent, by_team(page_token)))
            .await?
            .into_inner();
        assert!(page.work_orders.len() <= 2);
        seen.extend(page.work_orders.into_iter().map(|wo| wo.complaint_id));
        if page.next_page_token.is_empty() {
            break;
        }
        first_token.get_or_insert_with(|| page.next_page_token.clone());
        page_token = page.next_page_token;
    }
    seen.sort();
    submitted.sort();
    assert_eq!(
        seen, submitted,
        "every work order of the team once, across 3 pages"
    );

    let token =
        first_token.ok_or_else(|| anyhow::anyhow!("5 work orders in pages of 2 had no second page"))?;
    refused(
        work_orders
            .list_work_orders(authed(&env.tokens.other_tenant, by_team(token.clone())))
            .await,
        Code::InvalidArgument,
        "another tenant's token",
    )?;
    let other_filters = ListWorkOrdersRequest {
        team: "billing".into(),
        ..by_team(token.clone())
    };
    let replayed_with_other_filters = refused(
        work_orders
            .list_work_orders(authed(&env.tokens.agent, other_filters))
            .await,
        Code::InvalidArgument,
        "a token of another listing",
    )?;
    assert!(
        replayed_with_other_filters.message().contains("page_token"),
        "{}",
        replayed_with_other_filters.message()
    );

    // The delivery log's tokens, likewise.
    let mut notifications = env.notifications().await?;
    let one_per_page = ListDeliveriesRequest {
        page_size: 1,
        ..Default::default()
    };
    let first_page = notifications
        .list_deliveries(authed(&env.tokens.agent, one_per_page.clone()))
        .await?
        .into_inner();
    assert!(
        !first_page.next_page_token.is_empty(),
        "5 acknowledgements, one per page"
    );
    let second = ListDeliveriesRequest {
        page_token: first_page.next_page_token.clone(),
        ..one_per_page.clone()
    };
    notifications
        .list_deliveries(authed(&env.tokens.agent, second.clone()))
        .await?;
    refused(
        notifications
            .list_deliveries(authed(&env.tokens.other_tenant, second.clone()))
            .await,
        Code::InvalidArgument,
        "another tenant's token",
    )?;
    refused(
        notifications
            .list_deliveries(authed(
                &env.tokens.agent,
                ListDeliveriesRequest {
                    complaint_id: submitted[0].clone(),
                    ..second
                },
            ))
            .await,
        Code::InvalidArgument,
        "a token of another listing",
    )?;
    env.shutdown().await
}
