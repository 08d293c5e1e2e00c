//! Retention end to end on real NATS and PostgreSQL: at the retention age closed work
//! orders move to the archive with their history and follow-up links, delivery log entries
//! move too, and the API still reads all of it; open work stays hot.

use std::time::Duration;

use closedloop_e2e::system::{TestEnv, authed, wait_work_order};
use closedloop_e2e::{dead_letter_count, wait_for};
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::*;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

fn post(message_id: &str, poster: &str, thread: &str) -> ComplaintSubmission {
    ComplaintSubmission {
        channel: Channel::WeiboPost as i32,
        channel_message_id: message_id.to_owned(),
        poster: Some(Poster {
            poster_id: poster.to_owned(),
            followers: 10,
            ..Default::default()
        }),
        thread_id: thread.to_owned(),
        text: "家里宽带断网了，已经两天了".into(),
        ..Default::default()
    }
}

async fn listed(env: &TestEnv, include_archived: bool) -> anyhow::Result<Vec<String>> {
    let listed = env
        .list_work_orders(&env.tokens.agent, 500, include_archived)
        .await?;
    Ok(listed.into_iter().map(|wo| wo.work_order_id).collect())
}

async fn deliveries_about(
    env: &TestEnv,
    complaint_id: &str,
    include_archived: bool,
) -> anyhow::Result<usize> {
    let mut client = env.notifications().await?;
    let request = ListDeliveriesRequest {
        complaint_id: complaint_id.to_owned(),
        include_archived,
        ..Default::default()
    };
    Ok(client
        .list_deliveries(authed(&env.tokens.agent, request))
        .await?
        .into_inner()
        .deliveries
        .len())
}

/// Rows of `table` (schema-qualified) whose `column` is `id`.
async fn rows(pool: &sqlx::PgPool, table: &str, column: &str, id: &str) -> anyhow::Result<i64> {
    let id = uuid::Uuid::parse_str(id)?;
    Ok(
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} = $1"))
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_work_moves_to_the_archive_and_stays_readable() -> anyhow::Result<()> {
    let archiving = || {
        ["--archive-after", "2s", "--archive-interval", "1s"]
            .map(String::from)
            .to_vec()
    };
    let env = TestEnv::start_with(|options| {
        options.dispatch_args.extend(archiving());
        options.notify_args.extend(archiving());
    })
    .await?;
    let closing = env
        .submit(post("retention-1", "poster-closing", "thread-r1"))
        .await?;
    let staying = env.submit(post("retention-2", "poster-staying", "")).await?;
    let closing_wo = env.work_order_for(&closing.complaint_id).await?;
    let staying_wo = env.work_order_for(&staying.complaint_id).await?;
    // A follow-up on the same thread joins the closing work order through a link.
    let follow_up = env
        .submit(post("retention-3", "poster-closing", "thread-r1"))
        .await?;
    let joined = env.work_order_for(&follow_up.complaint_id).await?;
    assert_eq!(joined.work_order_id, closing_wo.work_order_id);

    // Resolved, then a happy answer closes it.
    let mut work_orders = env.work_orders().await?;
    work_orders
        .resolve_work_order(authed(
            &env.tokens.supervisor,
            ResolveWorkOrderRequest {
                work_order_id: closing_wo.work_order_id.clone(),
                resolution_note: "光猫已更换".into(),
                ..Default::default()
            },
        ))
        .await?;
    let mut ingest = IngestServiceClient::new(TestEnv::channel(env.system.ingest).await?);
    let happy = SubmitFeedbackRequest {
        complaint_id: closing.complaint_id.clone(),
        satisfaction: 5,
        ..Default::default()
    };
    ingest
        .submit_feedback(authed(&env.tokens.gateway, happy.clone()))
        .await?;

    // Two seconds after it closed, the archiver moves it; reads still find it.
    let archived = wait_work_order(
        &work_orders,
        &env.tokens.agent,
        &closing_wo.work_order_id,
        "the closed work order to be archived",
        |wo| wo.archived,
    )
    .await?;
    assert_eq!(archived.state(), WorkOrderState::Closed);
    assert_eq!(archived.satisfaction, 5);
    assert_eq!(archived.resolution_note, "光猫已更换");

    for complaint in [&closing.complaint_id, &follow_up.complaint_id] {
        let status = work_orders
            .get_complaint_status(authed(
                &env.tokens.agent,
                GetComplaintStatusRequest {
                    complaint_id: complaint.clone(),
                },
            ))
            .await?
            .into_inner()
            .work_order
            .ok_or_else(|| anyhow::anyhow!("no work order"))?;
        assert_eq!(status.work_order_id, closing_wo.work_order_id);
        assert!(status.archived);
    }
    let history = work_orders
        .get_work_order_history(authed(
            &env.tokens.agent,
            GetWorkOrderHistoryRequest {
                work_order_id: closing_wo.work_order_id.clone(),
            },
        ))
        .await?
        .into_inner()
        .entries;
    assert_eq!(
        history.last().map(HistoryEntry::kind),
        Some(WorkOrderEventKind::Closed),
        "{history:?}"
    );
    assert_eq!(
        history.first().map(HistoryEntry::kind),
        Some(WorkOrderEventKind::Created)
    );

    // Listings: hot by default, the archive on request.
    let hot = listed(&env, false).await?;
    assert!(hot.contains(&staying_wo.work_order_id));
    assert!(!hot.contains(&closing_wo.work_order_id));
    let all = listed(&env, true).await?;
    assert!(all.contains(&staying_wo.work_order_id) && all.contains(&closing_wo.work_order_id));

    // Read, not changed; a late answer from the customer changes nothing and is not an error.
    let reopen = work_orders
        .reopen_work_order(authed(
            &env.tokens.supervisor,
            ReopenWorkOrderRequest {
                work_order_id: closing_wo.work_order_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("an archived work order");
    assert_eq!(reopen.code(), Code::FailedPrecondition, "{reopen:?}");
    let late = SubmitFeedbackRequest {
        satisfaction: 1,
        request_id: "late-answer".into(),
        ..happy
    };
    ingest.submit_feedback(authed(&env.tokens.gateway, late)).await?;

    // The delivery log's entries about it age out of the hot table too.
    wait_for("the delivery log to be archived", WAIT, || async {
        let hot = deliveries_about(&env, &closing.complaint_id, false).await.ok()?;
        let all = deliveries_about(&env, &closing.complaint_id, true).await.ok()?;
        (hot == 0 && all > 0).then_some(())
    })
    .await?;
    env.wait_idle().await?;
    assert_eq!(dead_letter_count(&env.nats.url()).await?, 0);

    // Where the rows are: the closed work order's in the archive, the open one's hot.
    let pool = sqlx::PgPool::connect(&env.database_url).await?;
    let (closing_id, staying_id) = (&closing_wo.work_order_id, &staying_wo.work_order_id);
    assert_eq!(
        rows(&pool, "dispatch.work_orders", "work_order_id", closing_id).await?,
        0
    );
    assert_eq!(
        rows(&pool, "dispatch.work_orders_archive", "work_order_id", closing_id).await?,
        1
    );
    assert_eq!(
        rows(&pool, "dispatch.work_order_history", "work_order_id", closing_id).await?,
        0
    );
    assert_eq!(
        rows(
            &pool,
            "dispatch.work_order_history_archive",
            "work_order_id",
            closing_id
        )
        .await?,
        history.len() as i64
    );
    assert_eq!(
        rows(&pool, "dispatch.complaint_links", "work_order_id", closing_id).await?,
        0
    );
    assert_eq!(
        rows(
            &pool,
            "dispatch.complaint_links_archive",
            "work_order_id",
            closing_id
        )
        .await?,
        1
    );
    assert_eq!(
        rows(&pool, "dispatch.work_orders", "work_order_id", staying_id).await?,
        1
    );
    let reopened: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dispatch.work_orders_archive WHERE state <> 6")
            .fetch_one(&pool)
            .await?;
    assert_eq!(reopened, 0, "only closed work orders are archived");
    pool.close().await;
    env.shutdown().await
}
