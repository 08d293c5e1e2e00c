//! Dispatch end to end on real NATS and PostgreSQL: assignment and merge, remedies and their
//! authority, the SLA watcher with two replicas (one escalation, not two), feedback that
//! reopens or closes, incidents from a spike, and an abrupt crash in the middle of a stream.

use closedloop_runtime::config::NatsConnectArgs;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use closedloop_e2e::system::{
    DispatchReplica, SystemOptions, TestEnv, authed, contact, get_work_order, list_work_orders, refused,
    wait_work_order,
};
use closedloop_e2e::wait_until;
use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::work_order_service_client::WorkOrderServiceClient;
use closedloop_proto::v1::*;
use serde_json::json;
use tonic::transport::Channel as GrpcChannel;

const WAIT: Duration = Duration::from_secs(60);

/// A policy file: one network team with the given agents, and SLA targets as given.
fn policy(
    agents: serde_json::Value,
    sla_p3: (&str, &str),
    incidents_min: i64,
) -> anyhow::Result<tempfile::NamedTempFile> {
    let target =
        |(first, resolution): (&str, &str)| json!({"first_response": first, "resolution": resolution});
    let document = json!({
        "routing": {
            "rules": [{"category": ["outage", "network_quality"], "team": "network-ops", "skill": "network"}],
            "default_team": "network-ops",
            "account_managers": {"team": "account-managers", "min_tier": "key_opinion_leader"}
        },
        "sla": {
            "targets": {
                "P1": target(sla_p3), "P2": target(sla_p3), "P3": target(sla_p3), "P4": target(sla_p3)
            },
            "at_risk_fraction": 0.5,
            "escalation_team": "supervisors",
            "watch_interval": "1s"
        },
        "incidents": {"window": "10m", "baseline_windows": 6, "min_count": incidents_min, "factor": 2.0},
        "feedback": {"close_unanswered_after": "30d"},
        "directory": [{
            "tenant": "acme",
            "teams": [
                {"team_id": "network-ops", "skills": ["network"]},
                {"team_id": "account-managers"},
                {"team_id": "supervisors"}
            ],
            "agents": agents
        }]
    });
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), serde_json::to_vec_pretty(&document)?)?;
    Ok(file)
}

/// A whole system whose dispatch runs on `policy`.
async fn start_with_policy(policy: &tempfile::NamedTempFile) -> anyhow::Result<TestEnv> {
    let path = policy.path().display().to_string();
    TestEnv::start_with(|o: &mut SystemOptions| o.dispatch_args = vec!["--policy".into(), path]).await
}

fn agent(id: &str, capacity: i32, authority: i64) -> serde_json::Value {
    json!({"agent_id": id, "team_id": "network-ops", "skills": ["network"], "capacity": capacity,
           "online": true, "authority_limit_minor": authority})
}

fn account_manager(id: &str, capacity: i32) -> serde_json::Value {
    json!({"agent_id": id, "team_id": "account-managers", "capacity": capacity, "online": true})
}

/// An outage report from a poster with two million followers: above the default
/// key-opinion-leader threshold, so it goes to the account-manager team.
fn from_blogger(message_id: &str, poster: &str) -> ComplaintSubmission {
    let mut submission = outage(message_id, poster, "家里宽带又断网了，已经三天了还没解决！");
    if let Some(p) = submission.poster.as_mut() {
        p.followers = 2_000_000;
        p.verified = true;
    }
    submission
}

fn resolution(id: &str) -> ResolveWorkOrderRequest {
    ResolveWorkOrderRequest {
        work_order_id: id.to_owned(),
        resolution_note: "已修复".into(),
        ..Default::default()
    }
}

fn outage(message_id: &str, poster: &str, text: &str) -> ComplaintSubmission {
    ComplaintSubmission {
        locale: "zh-CN".into(),
        ..contact(Channel::WeiboPost, message_id, poster, 300, text)
    }
}

async fn history(
    client: &mut WorkOrderServiceClient<GrpcChannel>,
    token: &str,
    id: &str,
) -> anyhow::Result<Vec<HistoryEntry>> {
    Ok(client
        .get_work_order_history(authed(
            token,
            GetWorkOrderHistoryRequest {
                work_order_id: id.to_owned(),
            },
        ))
        .await?
        .into_inner()
        .entries)
}

/// Every agent's trigger-kept `open_load` equals a count of the open work orders they hold.
async fn assert_loads_counted(env: &TestEnv) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&env.database_url).await?;
    let loads: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT a.agent_id, a.open_load, (SELECT count(*) FROM dispatch.work_orders w \
           WHERE w.tenant = a.tenant AND w.assignee = a.agent_id AND w.state IN (1, 2, 3, 4, 7)) \
         FROM dispatch.agents a",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let drifted: Vec<_> = loads
        .iter()
        .filter(|(_, kept, counted)| i64::from(*kept) != *counted)
        .collect();
    assert!(
        drifted.is_empty(),
        "open_load drifted from the work orders: {drifted:?}"
    );
    Ok(())
}

fn count_kind(entries: &[HistoryEntry], kind: WorkOrderEventKind) -> usize {
    entries.iter().filter(|e| e.kind() == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_merge_and_remedy_authority() -> anyhow::Result<()> {
    // agent-7 (the test token's agent) and agent-8 hold one work order each.
    let file = policy(
        json!([agent("agent-7", 1, 1_000), agent("agent-8", 1, 1_000)]),
        ("2h", "72h"),
        1_000,
    )?;
    let env = start_with_policy(&file).await?;
    let mut client = env.work_orders().await?;
    let text = "家里宽带又断网了，已经三天了还没解决！";

    let first = env.submit(outage("m-1", "poster-a", text)).await?;
    let first_wo = env.work_order_for(&first.complaint_id).await?;
    assert_eq!(first_wo.team, "network-ops");
    assert_eq!(first_wo.state(), WorkOrderState::Assigned);
    assert_eq!(
        first_wo.assignee, "agent-7",
        "tie on load: the longest-waiting, then the smaller id"
    );

    // The same poster about the same problem: attached, not a second work order.
    let again = env
        .submit(outage("m-2", "poster-a", "还是断网，到底什么时候修好？"))
        .await?;
    let joined = env.work_order_for(&again.complaint_id).await?;
    assert_eq!(
        joined.work_order_id, first_wo.work_order_id,
        "merged into the open one"
    );

    let second = env.submit(outage("m-3", "poster-b", text)).await?;
    let second_wo = env.work_order_for(&second.complaint_id).await?;
    assert_eq!(second_wo.assignee, "agent-8", "least loaded");

    // Nobody has room: the third waits in the team's queue.
    let third = env.submit(outage("m-4", "poster-c", text)).await?;
    let third_wo = env.work_order_for(&third.complaint_id).await?;
    env.wait_idle().await?;
    let third_wo = get_work_order(&mut client, &env.tokens.agent, &third_wo.work_order_id).await?;
    assert_eq!(third_wo.state(), WorkOrderState::New);
    assert_eq!(third_wo.assignee, "");

    // Above agent-7's authority: refused, nothing changes.
    let resolve = |remedy: Remedy, id: &str| ResolveWorkOrderRequest {
        work_order_id: id.to_owned(),
        resolution_note: "已修复".into(),
        remedy: Some(remedy),
        ..Default::default()
    };
    let waiver = |amount| Remedy {
        kind: "fee_waiver".into(),
        amount_minor: amount,
        currency: "CNY".into(),
        approved_by: String::new(),
    };
    let denied = refused(
        client
            .resolve_work_order(authed(
                &env.tokens.agent,
                resolve(waiver(5_000), &first_wo.work_order_id),
            ))
            .await,
        tonic::Code::PermissionDenied,
        "above the authority limit",
    )?;
    assert!(denied.message().contains("supervisor"), "{}", denied.message());
    refused(
        client
            .resolve_work_order(authed(
                &env.tokens.agent,
                resolve(waiver(-1), &first_wo.work_order_id),
            ))
            .await,
        tonic::Code::InvalidArgument,
        "negative amount",
    )?;
    assert_eq!(
        get_work_order(&mut client, &env.tokens.agent, &first_wo.work_order_id)
            .await?
            .state(),
        WorkOrderState::Assigned
    );
    // Within it: resolved, and agent-7's freed capacity takes the queued work order.
    let resolved = client
        .resolve_work_order(authed(
            &env.tokens.agent,
            resolve(waiver(500), &first_wo.work_order_id),
        ))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order"))?;
    assert_eq!(resolved.remedy.as_ref().map(|r| r.amount_minor), Some(500));
    assert_eq!(resolved.remedy.as_ref().map(|r| r.approved_by.as_str()), Some(""));
    let taken = wait_work_order(
        &client,
        &env.tokens.agent,
        &third_wo.work_order_id,
        "the queued work order to be assigned",
        |wo| wo.state() == WorkOrderState::Assigned,
    )
    .await?;
    assert_eq!(taken.assignee, "agent-7");
    // A supervisor may approve a larger remedy: the approval is recorded.
    let approved = client
        .resolve_work_order(authed(
            &env.tokens.supervisor,
            resolve(waiver(5_000), &second_wo.work_order_id),
        ))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order"))?;
    assert_eq!(approved.remedy.map(|r| r.approved_by), Some("sup-1".into()));

    // The timeline tells the story, one version per change.
    let entries = history(&mut client, &env.tokens.agent, &first_wo.work_order_id).await?;
    let kinds: Vec<_> = entries.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            WorkOrderEventKind::Created,
            WorkOrderEventKind::Assigned,
            WorkOrderEventKind::Merged,
            WorkOrderEventKind::Resolved
        ]
    );
    assert!(entries.windows(2).all(|w| w[1].version == w[0].version + 1));

    // The directory shows the load.
    let mut directory = closedloop_proto::v1::directory_service_client::DirectoryServiceClient::new(
        TestEnv::channel(env.system.dispatch).await?,
    );
    let agents = directory
        .list_agents(authed(
            &env.tokens.agent,
            ListAgentsRequest {
                team_id: "network-ops".into(),
            },
        ))
        .await?
        .into_inner()
        .agents;
    let loads: HashMap<_, _> = agents
        .iter()
        .map(|a| (a.agent_id.as_str(), a.open_work_orders))
        .collect();
    assert_eq!(loads, HashMap::from([("agent-7", 1), ("agent-8", 0)]));
    refused(
        directory
            .upsert_agent(authed(&env.tokens.agent, UpsertAgentRequest { agent: None }))
            .await,
        tonic::Code::PermissionDenied,
        "agents do not manage the directory",
    )?;
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_opinion_leader_keeps_the_same_account_manager() -> anyhow::Result<()> {
    let file = policy(
        json!([
            agent("agent-7", 5, 1_000),
            account_manager("am-1", 5),
            account_manager("am-2", 5)
        ]),
        ("2h", "72h"),
        1_000,
    )?;
    let env = start_with_policy(&file).await?;
    let mut client = env.work_orders().await?;
    let blogger = from_blogger;
    let resolve = resolution;

    let first = env.submit(blogger("kol-m-1", "blogger-1")).await?;
    let first_wo = env.work_order_for(&first.complaint_id).await?;
    assert_eq!(first_wo.team, "account-managers");
    assert_eq!(first_wo.assignee, "am-1", "tie on load: the smaller id");
    let other = env.submit(blogger("kol-m-2", "blogger-2")).await?;
    let other_wo = env.work_order_for(&other.complaint_id).await?;
    assert_eq!(other_wo.assignee, "am-2", "least loaded");

    // Both done: the managers are equally free, and am-1 has waited longer.
    for id in [&first_wo.work_order_id, &other_wo.work_order_id] {
        client
            .resolve_work_order(authed(&env.tokens.agent, resolve(id)))
            .await?;
    }
    // blogger-2 comes back: a new work order, still with am-2, whom round-robin alone
    // would not pick.
    let again = env.submit(blogger("kol-m-3", "blogger-2")).await?;
    let again_wo = env.work_order_for(&again.complaint_id).await?;
    assert_ne!(
        again_wo.work_order_id, other_wo.work_order_id,
        "the first one was resolved"
    );
    assert_eq!(
        again_wo.assignee, "am-2",
        "the same poster keeps the same manager"
    );
    let assigned = history(&mut client, &env.tokens.agent, &again_wo.work_order_id)
        .await?
        .into_iter()
        .find(|e| e.kind() == WorkOrderEventKind::Assigned)
        .ok_or_else(|| anyhow::anyhow!("no assignment in the timeline"))?;
    assert!(assigned.note.contains("account manager"), "{}", assigned.note);
    // A newcomer with the same reach goes to the least-loaded manager, am-1.
    let newcomer = env.submit(blogger("kol-m-4", "blogger-3")).await?;
    assert_eq!(env.work_order_for(&newcomer.complaint_id).await?.assignee, "am-1");
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blogger_first_served_from_the_queue_keeps_that_manager() -> anyhow::Result<()> {
    let file = policy(
        json!([account_manager("am-1", 1), account_manager("am-2", 1)]),
        ("2h", "72h"),
        1_000,
    )?;
    let env = start_with_policy(&file).await?;
    let mut client = env.work_orders().await?;
    let token = &env.tokens.agent;
    let first = env
        .work_order_for(&env.submit(from_blogger("q-1", "blogger-1")).await?.complaint_id)
        .await?;
    let second = env
        .work_order_for(&env.submit(from_blogger("q-2", "blogger-2")).await?.complaint_id)
        .await?;
    assert_eq!(
        (first.assignee.as_str(), second.assignee.as_str()),
        ("am-1", "am-2")
    );
    // Both managers are full: blogger-3 waits in the queue.
    let third = env
        .work_order_for(&env.submit(from_blogger("q-3", "blogger-3")).await?.complaint_id)
        .await?;
    assert_eq!(third.state(), WorkOrderState::New);
    assert_eq!(third.assignee, "");

    // am-2 frees first and takes blogger-3 from the queue, becoming their manager.
    client
        .resolve_work_order(authed(token, resolution(&second.work_order_id)))
        .await?;
    let taken = wait_work_order(
        &client,
        token,
        &third.work_order_id,
        "the queued work to be assigned",
        |wo| wo.state() == WorkOrderState::Assigned,
    )
    .await?;
    assert_eq!(taken.assignee, "am-2");
    // Everything done: am-1 has waited longer, so round-robin alone would pick am-1.
    for id in [&first.work_order_id, &third.work_order_id] {
        client.resolve_work_order(authed(token, resolution(id))).await?;
    }
    let again = env
        .work_order_for(&env.submit(from_blogger("q-4", "blogger-3")).await?.complaint_id)
        .await?;
    assert_eq!(again.assignee, "am-2", "the manager from the queue stays theirs");
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_work_order_nobody_rates_closes_after_the_configured_time() -> anyhow::Result<()> {
    let file = policy(json!([agent("agent-7", 5, 1_000)]), ("2h", "72h"), 1_000)?;
    let mut document: serde_json::Value = serde_json::from_slice(&std::fs::read(file.path())?)?;
    document["feedback"]["close_unanswered_after"] = json!("2s");
    std::fs::write(file.path(), serde_json::to_vec(&document)?)?;
    let env = start_with_policy(&file).await?;
    let mut client = env.work_orders().await?;
    let submitted = env
        .submit(outage("auto-close-1", "poster-q", "宽带断网了，请尽快修复"))
        .await?;
    let work_order = env.work_order_for(&submitted.complaint_id).await?;
    client
        .resolve_work_order(authed(
            &env.tokens.agent,
            ResolveWorkOrderRequest {
                work_order_id: work_order.work_order_id.clone(),
                resolution_note: "已修复".into(),
                ..Default::default()
            },
        ))
        .await?;
    let closed = wait_work_order(
        &client,
        &env.tokens.agent,
        &work_order.work_order_id,
        "the unrated work order to close",
        |wo| wo.state() == WorkOrderState::Closed,
    )
    .await?;
    assert_eq!(closed.satisfaction, 0, "nobody answered");
    let entries = history(&mut client, &env.tokens.agent, &work_order.work_order_id).await?;
    let last = entries
        .last()
        .ok_or_else(|| anyhow::anyhow!("an empty timeline"))?;
    assert_eq!(last.kind(), WorkOrderEventKind::Closed);
    assert_eq!(last.actor, "sla-watcher");
    assert!(last.note.contains("no answer"), "{}", last.note);
    assert_eq!(count_kind(&entries, WorkOrderEventKind::Closed), 1, "closed once");
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_escalate_a_breach_once_and_feedback_reopens_or_closes() -> anyhow::Result<()> {
    // Nobody to assign to, targets of seconds: the SLA clock runs out while both replicas watch.
    let file = policy(json!([]), ("2s", "4s"), 1_000)?;
    let env = start_with_policy(&file).await?;
    let replica = DispatchReplica::start(env.system.options()).await?;
    let mut client = env.work_orders().await?;

    let late = env
        .submit(outage("sla-1", "poster-late", "宽带断网了，一直连不上"))
        .await?;
    let wo = env.work_order_for(&late.complaint_id).await?;
    let priority = wo.priority;
    let escalated = wait_work_order(
        &client,
        &env.tokens.agent,
        &wo.work_order_id,
        "the breach to be escalated",
        |wo| wo.sla_state() == SlaState::Breached,
    )
    .await?;
    assert_eq!(escalated.team, "supervisors");
    assert_eq!(escalated.priority, (priority - 1).max(1), "one step more urgent");
    // More watcher rounds on both replicas change nothing: a later work order's breach
    // (seconds of rounds after the first) marks that they ran.
    let settled = escalated.version;
    let later = env.submit(outage("sla-1b", "poster-later", "宽带断网了")).await?;
    let later_wo = env.work_order_for(&later.complaint_id).await?;
    wait_work_order(
        &client,
        &env.tokens.agent,
        &later_wo.work_order_id,
        "a later breach",
        |wo| wo.sla_state() == SlaState::Breached,
    )
    .await?;
    let entries = history(&mut client, &env.tokens.agent, &wo.work_order_id).await?;
    assert_eq!(
        count_kind(&entries, WorkOrderEventKind::SlaAtRisk),
        1,
        "{entries:?}"
    );
    assert_eq!(
        count_kind(&entries, WorkOrderEventKind::SlaBreached),
        1,
        "{entries:?}"
    );
    assert_eq!(
        get_work_order(&mut client, &env.tokens.agent, &wo.work_order_id)
            .await?
            .version,
        settled
    );
    let breaches = env
        .webhook
        .unique_messages()
        .into_iter()
        .filter(|m| m.field("channel") == "staff" && m.field("text").contains(&wo.work_order_id))
        .count();
    assert!(breaches >= 1, "staff were alerted");

    // Resolved, then the customer is unhappy: reopened and escalated again.
    client
        .resolve_work_order(authed(
            &env.tokens.supervisor,
            ResolveWorkOrderRequest {
                work_order_id: wo.work_order_id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    let mut ingest = IngestServiceClient::new(TestEnv::channel(env.system.ingest).await?);
    let feedback = |complaint_id: &str, satisfaction| SubmitFeedbackRequest {
        complaint_id: complaint_id.to_owned(),
        satisfaction,
        comment: "还是不行".into(),
        ..Default::default()
    };
    ingest
        .submit_feedback(authed(&env.tokens.gateway, feedback(&late.complaint_id, 1)))
        .await?;
    let reopened = wait_work_order(
        &client,
        &env.tokens.agent,
        &wo.work_order_id,
        "the work order to reopen",
        |wo| wo.state() == WorkOrderState::Reopened && wo.satisfaction == 1,
    )
    .await?;
    assert!(reopened.priority <= escalated.priority);
    wait_until("the customer to hear it was reopened", WAIT, || async {
        !env.webhook.about(&late.complaint_id, "reopened").is_empty()
    })
    .await?;
    // Resolved again, and the customer answers the same again, in a new message: it counts
    // again (one answer, retried or redelivered, counts once).
    client
        .resolve_work_order(authed(
            &env.tokens.supervisor,
            ResolveWorkOrderRequest {
                work_order_id: wo.work_order_id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    let second_answer = SubmitFeedbackRequest {
        request_id: "wechat-msg-2".into(),
        ..feedback(&late.complaint_id, 1)
    };
    for _retry in 0..2 {
        ingest
            .submit_feedback(authed(&env.tokens.gateway, second_answer.clone()))
            .await?;
    }
    wait_work_order(
        &client,
        &env.tokens.agent,
        &wo.work_order_id,
        "the work order to reopen a second time",
        |again| again.state() == WorkOrderState::Reopened,
    )
    .await?;
    env.wait_idle().await?;
    let entries = history(&mut client, &env.tokens.agent, &wo.work_order_id).await?;
    let answers = entries
        .iter()
        .filter(|entry| entry.note.starts_with("customer rated"))
        .count();
    assert_eq!(answers, 2, "two answers, the second sent twice");

    // A happy answer closes a resolved work order.
    let happy = env.submit(outage("sla-2", "poster-happy", "宽带断网了")).await?;
    let happy_wo = env.work_order_for(&happy.complaint_id).await?;
    client
        .resolve_work_order(authed(
            &env.tokens.supervisor,
            ResolveWorkOrderRequest {
                work_order_id: happy_wo.work_order_id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    ingest
        .submit_feedback(authed(&env.tokens.gateway, feedback(&happy.complaint_id, 5)))
        .await?;
    wait_work_order(
        &client,
        &env.tokens.agent,
        &happy_wo.work_order_id,
        "the work order to close",
        |wo| wo.state() == WorkOrderState::Closed && wo.satisfaction == 5,
    )
    .await?;
    replica.stop().await?;
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_opens_one_incident_and_resolving_it_tells_every_customer() -> anyhow::Result<()> {
    let file = policy(json!([]), ("2h", "72h"), 5)?;
    let env = start_with_policy(&file).await?;
    let mut client = env.work_orders().await?;
    // An agent desk watching the team sees changes as they happen.
    let mut watch = client
        .watch_work_orders(authed(
            &env.tokens.agent,
            WatchWorkOrdersRequest {
                team: "network-ops".into(),
                assignee: String::new(),
            },
        ))
        .await?
        .into_inner();
    let mut complaints = Vec::new();
    for n in 0..7 {
        let submitted = env
            .submit(outage(
                &format!("spike-{n}"),
                &format!("poster-{n}"),
                "深圳南山区大面积停网了，宽带完全断网",
            ))
            .await?;
        complaints.push(submitted.complaint_id);
    }
    env.wait_idle().await?;
    let first = tokio::time::timeout(WAIT, watch.message())
        .await??
        .and_then(|r| r.event)
        .ok_or_else(|| anyhow::anyhow!("the watch ended"))?;
    assert_eq!(first.kind(), WorkOrderEventKind::Created);
    assert!(
        first
            .work_order
            .as_ref()
            .is_some_and(|wo| complaints.contains(&wo.complaint_id)),
        "{first:?}"
    );
    drop(watch);
    let incidents = client
        .list_incidents(authed(
            &env.tokens.agent,
            ListIncidentsRequest { open_only: true },
        ))
        .await?
        .into_inner()
        .incidents;
    assert_eq!(
        incidents.len(),
        1,
        "one incident, not one per complaint: {incidents:?}"
    );
    let incident = &incidents[0];
    assert_eq!(incident.region, "广东/深圳");
    assert_eq!(
        incident.work_order_count, 7,
        "the ones before the spike and after it"
    );
    wait_until("the incident alert to reach staff", WAIT, || async {
        env.webhook
            .unique_messages()
            .iter()
            .any(|m| m.field("channel") == "staff" && m.field("text").contains("广东/深圳"))
    })
    .await?;

    refused(
        client
            .resolve_incident(authed(
                &env.tokens.agent,
                ResolveIncidentRequest {
                    incident_id: incident.incident_id.clone(),
                    resolution_note: "光缆已修复".into(),
                },
            ))
            .await,
        tonic::Code::PermissionDenied,
        "supervisors resolve incidents",
    )?;
    let resolved = client
        .resolve_incident(authed(
            &env.tokens.supervisor,
            ResolveIncidentRequest {
                incident_id: incident.incident_id.clone(),
                resolution_note: "光缆已修复".into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(resolved.resolved_work_orders, 7);
    for complaint in &complaints {
        wait_until("every customer to get the closure", WAIT, || async {
            env.webhook.about(complaint, "closure").len() == 1
        })
        .await?;
    }
    refused(
        client
            .resolve_incident(authed(
                &env.tokens.supervisor,
                ResolveIncidentRequest {
                    incident_id: incident.incident_id.clone(),
                    resolution_note: String::new(),
                },
            ))
            .await,
        tonic::Code::NotFound,
        "already resolved",
    )?;
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    // Four agents of capacity 10 share 120 complaints across two replicas, one of which
    // crashes half way; the ack wait is short so its unacked messages come back quickly.
    let agents = json!([
        agent("a-1", 10, 0),
        agent("a-2", 10, 0),
        agent("a-3", 10, 0),
        agent("a-4", 10, 0)
    ]);
    let file = policy(agents, ("2h", "72h"), 1_000)?;
    let path = file.path().display().to_string();
    let env = TestEnv::start_with(|o: &mut SystemOptions| {
        o.without_dispatch = true;
        o.dispatch_args = vec!["--policy".into(), path, "--ack-wait-secs".into(), "2".into()];
    })
    .await?;
    let steady = DispatchReplica::start(env.system.options()).await?;
    let doomed = DispatchReplica::start(env.system.options()).await?;
    let mut client = steady.client().await?;
    let mut ingest = IngestServiceClient::new(TestEnv::channel(env.system.ingest).await?);
    let total = 120;
    let batch = |range: std::ops::Range<usize>| SubmitComplaintsRequest {
        complaints: range
            .map(|n| {
                outage(
                    &format!("crash-{n}"),
                    &format!("poster-{n}"),
                    "宽带断网了，一直连不上",
                )
            })
            .collect(),
    };
    ingest
        .submit_complaints(authed(&env.tokens.gateway, batch(0..total / 2)))
        .await?;
    wait_until("work orders to be flowing", WAIT, || {
        let mut client = client.clone();
        let token = env.tokens.agent.clone();
        async move {
            list_work_orders(&mut client, &token, 500, false)
                .await
                .is_ok_and(|all| !all.is_empty())
        }
    })
    .await?;
    doomed.kill();
    ingest
        .submit_complaints(authed(&env.tokens.gateway, batch(total / 2..total)))
        .await?;
    let restarted = DispatchReplica::start(env.system.options()).await?;
    env.wait_idle().await?;

    let all = list_work_orders(&mut client, &env.tokens.agent, 500, false).await?;
    assert_eq!(all.len(), total, "exactly one work order per complaint");
    let complaints: HashSet<_> = all.iter().map(|w| w.complaint_id.clone()).collect();
    assert_eq!(complaints.len(), total);
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    for wo in all.iter().filter(|w| !w.assignee.is_empty()) {
        *per_agent.entry(wo.assignee.clone()).or_default() += 1;
    }
    assert_eq!(
        per_agent.values().sum::<usize>(),
        40,
        "every free slot filled: {per_agent:?}"
    );
    assert!(
        per_agent.values().all(|n| *n == 10),
        "nobody past capacity: {per_agent:?}"
    );
    // Every event reached the stream once: one created (and at most one assigned) per work order.
    let nats = closedloop_e2e::nats(&env.nats.url()).await?;
    let js = async_nats::jetstream::new(nats);
    let mut stream = js.get_stream(closedloop_runtime::bus::WORK_ORDERS_STREAM).await?;
    let info = stream.info().await?;
    let created_subject = closedloop_runtime::bus::work_order_topic("created").subject("acme");
    let assigned_subject = closedloop_runtime::bus::work_order_topic("assigned").subject("acme");
    let counts = info.state.messages;
    let mut created = 0;
    let mut assigned = 0;
    for sequence in 1..=info.state.last_sequence {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        if message.subject.as_str() == created_subject {
            created += 1;
        } else if message.subject.as_str() == assigned_subject {
            assigned += 1;
        }
    }
    assert_eq!(created, total, "of {counts} events");
    assert_eq!(assigned, 40);
    restarted.stop().await?;
    steady.stop().await?;
    assert_loads_counted(&env).await?;
    env.shutdown().await
}

/// A work order with only what its event needs.
fn bare_work_order(version: i64) -> closedloop_dispatch::store::WorkOrder {
    closedloop_dispatch::store::WorkOrder {
        work_order_id: uuid::Uuid::new_v4().to_string(),
        tenant: "acme".into(),
        version,
        updated_at: chrono::Utc::now(),
        ..Default::default()
    }
}

/// Runs relay rounds until at least `events` have gone out and none waits on a running
/// transaction (other tests' transactions in this cluster may hold the relay a moment);
/// returns how many went out.
async fn relay_at_least(
    pool: &sqlx::PgPool,
    bus: &closedloop_runtime::bus::Bus,
    events: usize,
) -> anyhow::Result<usize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let published = AtomicUsize::new(0);
    wait_until("the relay to publish the events", WAIT, || async {
        match closedloop_dispatch::relay::relay_once(pool, bus).await {
            Ok(round) => {
                let so_far = published.fetch_add(round.published, Ordering::Relaxed) + round.published;
                so_far >= events && !round.unsettled
            }
            Err(_) => false,
        }
    })
    .await?;
    Ok(published.into_inner())
}

/// The relay reads work-order events from history past a cursor. A transaction that took its
/// id first but commits last must not land behind the cursor: the event committed after it
/// waits until it ends, then both go out, in transaction order. One rolled back holds nothing up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_behind_an_older_transaction_waits_and_is_not_skipped() -> anyhow::Result<()> {
    use closedloop_dispatch::relay;
    use closedloop_dispatch::store::{self, Recorded};
    use closedloop_runtime::bus::{Bus, WORK_ORDERS_STREAM};

    let nats = closedloop_e2e::servers::NatsServer::start()?;
    let postgres = closedloop_e2e::servers::Postgres::shared()?;
    let args = closedloop_runtime::config::DatabaseArgs {
        database_url: closedloop_runtime::Secret::new(postgres.create_database().await?),
        database_max_connections: 4,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let pool = closedloop_dispatch::connect_database(&args, &cancel).await?;
    let bus = Bus::connect(&NatsConnectArgs::url(nats.url()), "relay-test", &cancel).await?;
    bus.provision(&closedloop_e2e::servers::harness_streams()).await?;
    let created =
        |work_order: &store::WorkOrder| Recorded::new(work_order, WorkOrderEventKind::Created, "test", "");
    let (older, newer, abandoned) = (bare_work_order(1), bare_work_order(1), bare_work_order(1));

    // The older transaction takes its id, then the newer one writes its event and commits.
    let mut first = pool.begin().await?;
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *first)
        .await?;
    let mut second = pool.begin().await?;
    store::write_events(&mut second, &[created(&newer)]).await?;
    second.commit().await?;

    let round = relay::relay_once(&pool, &bus).await?;
    assert_eq!(
        round.published, 0,
        "the newer event waits while the older transaction runs"
    );
    assert!(round.unsettled, "and the relay knows it is waiting");

    store::write_events(&mut first, &[created(&older)]).await?;
    first.commit().await?;
    let mut third = pool.begin().await?;
    store::write_events(&mut third, &[created(&abandoned)]).await?;
    third.rollback().await?;

    assert_eq!(relay_at_least(&pool, &bus, 2).await?, 2);
    assert_eq!(
        relay::relay_once(&pool, &bus).await?.published,
        0,
        "nothing goes out twice"
    );

    let js = async_nats::jetstream::new(closedloop_e2e::nats(&nats.url()).await?);
    let stream = js.get_stream(WORK_ORDERS_STREAM).await?;
    let mut relayed = Vec::new();
    for sequence in 1..=2 {
        let message = stream.get_raw_message(sequence).await?;
        let event: WorkOrderEvent = prost::Message::decode(message.payload.as_ref())?;
        relayed.push(event.work_order.map(|w| w.work_order_id).unwrap_or_default());
    }
    assert_eq!(relayed, [older.work_order_id, newer.work_order_id]);
    assert_eq!(stream.get_raw_message(3).await.ok().map(|m| m.sequence), None);
    let unpublished: i64 = sqlx::query_scalar("SELECT events FROM unpublished_events")
        .fetch_one(&pool)
        .await?;
    assert_eq!(unpublished, 0);

    // During an upgrade, a dispatch from before migration 0008 writes history rows without
    // events (it sends them through the outbox): the relay steps over them.
    sqlx::query(
        "INSERT INTO work_order_history (work_order_id, version, kind, actor, occurred_at) \
         VALUES (gen_random_uuid(), 1, 'created', 'older dispatch', now())",
    )
    .execute(&pool)
    .await?;
    let after_upgrade = bare_work_order(1);
    let mut fourth = pool.begin().await?;
    store::write_events(&mut fourth, &[created(&after_upgrade)]).await?;
    fourth.commit().await?;
    assert_eq!(
        relay_at_least(&pool, &bus, 1).await?,
        1,
        "the bare row published nothing"
    );
    let message = stream.get_raw_message(3).await?;
    let event: WorkOrderEvent = prost::Message::decode(message.payload.as_ref())?;
    assert_eq!(
        event.work_order.map(|w| w.work_order_id),
        Some(after_upgrade.work_order_id)
    );
    let unpublished: i64 = sqlx::query_scalar("SELECT events FROM unpublished_events")
        .fetch_one(&pool)
        .await?;
    assert_eq!(unpublished, 0, "the cursor is past the bare row");
    pool.close().await;
    Ok(())
}

/// WatchWorkOrders is bounded: a caller past its streams gets RESOURCE_EXHAUSTED, another
/// caller still gets one, and a stream closed by its reader frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_bounded_per_caller() -> anyhow::Result<()> {
    let env = TestEnv::start_with(|options| {
        options
            .dispatch_args
            .extend(["--watch-max-per-caller".into(), "2".into()]);
    })
    .await?;
    let mut client = env.work_orders().await?;
    let watch = |token: &str| authed(token, WatchWorkOrdersRequest::default());
    let first = client.watch_work_orders(watch(&env.tokens.agent)).await?;
    let _second = client.watch_work_orders(watch(&env.tokens.agent)).await?;
    let third = client
        .watch_work_orders(watch(&env.tokens.agent))
        .await
        .expect_err("a third stream for one caller");
    assert_eq!(third.code(), tonic::Code::ResourceExhausted, "{third:?}");
    let _supervisor = client.watch_work_orders(watch(&env.tokens.supervisor)).await?;
    drop(first);
    wait_until("the closed stream's place to be free", WAIT, || {
        let mut client = client.clone();
        let request = watch(&env.tokens.agent);
        async move { client.watch_work_orders(request).await.is_ok() }
    })
    .await?;
    env.shutdown().await
}

/// The first event a watch stream carries, within the deadline.
async fn first_event(
    stream: &mut tonic::Streaming<WatchWorkOrdersResponse>,
) -> anyhow::Result<WorkOrderEvent> {
    tokio::time::timeout(WAIT, stream.message())
        .await??
        .and_then(|response| response.event)
        .ok_or_else(|| anyhow::anyhow!("the watch ended"))
}

fn complaint_of(event: &WorkOrderEvent) -> (&str, &str) {
    event
        .work_order
        .as_ref()
        .map_or(("", ""), |wo| (wo.tenant.as_str(), wo.complaint_id.as_str()))
}

/// A tenant's watch streams share one subscription: each stream still gets its own
/// tenant's events (filtered by team when it asks), never another tenant's, and the
/// tenant's events reach streams opened after every earlier one has closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_share_their_tenants_events() -> anyhow::Result<()> {
    let env = TestEnv::start().await?;
    let mut client = env.work_orders().await?;
    let mut ingest = IngestServiceClient::new(TestEnv::channel(env.system.ingest).await?);
    let submit_beta = |n: usize| {
        authed(
            &env.tokens.other_tenant,
            SubmitComplaintRequest {
                complaint: Some(outage(&format!("beta-watch-{n}"), "beta-poster", "宽带断网了")),
            },
        )
    };
    let first = env.submit(outage("watch-0", "poster-w0", "宽带断网了")).await?;
    let team = env.work_order_for(&first.complaint_id).await?.team;
    env.wait_idle().await?;

    let watch = |token: &str, team: &str| {
        authed(
            token,
            WatchWorkOrdersRequest {
                team: team.to_owned(),
                assignee: String::new(),
            },
        )
    };
    let mut by_team = client
        .watch_work_orders(watch(&env.tokens.agent, &team))
        .await?
        .into_inner();
    let mut whole_tenant = client
        .watch_work_orders(watch(&env.tokens.supervisor, ""))
        .await?
        .into_inner();
    let mut beta = client
        .watch_work_orders(watch(&env.tokens.other_tenant, ""))
        .await?
        .into_inner();
    let second = env.submit(outage("watch-1", "poster-w1", "宽带断网了")).await?;
    let beta_complaint = ingest.submit_complaint(submit_beta(1)).await?.into_inner();
    for stream in [&mut by_team, &mut whole_tenant] {
        let event = first_event(stream).await?;
        assert_eq!(
            complaint_of(&event),
            ("acme", second.complaint_id.as_str()),
            "{event:?}"
        );
    }
    // Acme's complaint went first: a stream that saw other tenants would see it first.
    let event = first_event(&mut beta).await?;
    assert_eq!(
        complaint_of(&event),
        ("beta", beta_complaint.complaint_id.as_str()),
        "{event:?}"
    );

    // Every acme stream closes; the tenant's next events find no stream. A new one gets
    // what follows.
    drop((by_team, whole_tenant));
    let unwatched = env.submit(outage("watch-2", "poster-w2", "宽带断网了")).await?;
    env.work_order_for(&unwatched.complaint_id).await?;
    env.wait_idle().await?;
    let mut later = client
        .watch_work_orders(watch(&env.tokens.agent, ""))
        .await?
        .into_inner();
    let third = env.submit(outage("watch-3", "poster-w3", "宽带断网了")).await?;
    let event = first_event(&mut later).await?;
    assert_eq!(
        complaint_of(&event),
        ("acme", third.complaint_id.as_str()),
        "{event:?}"
    );
    drop(beta);
    env.shutdown().await
}

/// The second line of defence behind ingest's validation: a classified complaint carrying a
/// value PostgreSQL refuses (a NUL in the poster's id, as an older ingest let through)
/// fails alone. The batch it came with is placed complaint by complaint, its neighbours get
/// their work orders, and it is parked with the reason, by dispatch and by notify's
/// delivery log alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_complaint_does_not_hold_up_its_batch() -> anyhow::Result<()> {
    use closedloop_runtime::bus::{self, Bus, OutgoingEvent};
    let env = TestEnv::start().await?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = Bus::connect(&NatsConnectArgs::url(env.nats.url()), "test", &cancel).await?;
    let classified = |n: usize, poster: &str| {
        let complaint_id = uuid::Uuid::new_v4().to_string();
        let event = ComplaintClassified {
            complaint: Some(Complaint {
                complaint_id: complaint_id.clone(),
                tenant: "acme".into(),
                channel: Channel::Wechat as i32,
                channel_message_id: format!("batch-{n}"),
                poster: Some(Poster {
                    poster_id: poster.to_owned(),
                    ..Default::default()
                }),
                text: "话费被多扣了".into(),
                ..Default::default()
            }),
            classification: Some(Classification {
                intent: Intent::Complaint as i32,
                category: "billing".into(),
                priority: Priority::P3 as i32,
                ..Default::default()
            }),
        };
        (
            complaint_id.clone(),
            OutgoingEvent::new(
                bus::COMPLAINT_CLASSIFIED,
                "acme",
                format!("classified:{complaint_id}"),
                &event,
            ),
        )
    };
    let mut good = Vec::new();
    let mut events = Vec::new();
    for n in 0..6 {
        let poster = if n == 3 {
            "poster-\u{0}-bad".to_owned()
        } else {
            format!("poster-{n}")
        };
        let (complaint_id, event) = classified(n, &poster);
        if n != 3 {
            good.push(complaint_id);
        }
        events.push(event);
    }
    for published in publisher.publish_all(events).await {
        published?;
    }
    for complaint_id in &good {
        env.work_order_for(complaint_id).await?;
    }
    let js = async_nats::jetstream::new(closedloop_e2e::nats(&env.nats.url()).await?);
    for consumer in [
        closedloop_dispatch::CLASSIFIED_CONSUMER,
        closedloop_notify::LOG_CONSUMER,
    ] {
        let parked = closedloop_e2e::dead_letter_of(&env.nats.url(), consumer).await?;
        assert!(parked.reason.contains("refused"), "{consumer}: {}", parked.reason);
        assert_eq!(
            parked.deliveries, "1",
            "{consumer}: parked at once, not after retrying with its neighbours"
        );
    }
    let placing = js
        .get_stream(bus::COMPLAINTS_STREAM)
        .await?
        .consumer_info(closedloop_dispatch::CLASSIFIED_CONSUMER)
        .await?;
    assert_eq!(placing.num_redelivered, 0, "no complaint had to come back");
    env.wait_idle().await?;
    let parked = closedloop_e2e::dead_letter_count(&env.nats.url()).await?;
    assert_eq!(
        parked, 2,
        "the bad complaint alone, once by each consumer that writes it"
    );
    cancel.cancel();
    env.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committing_a_recording_wakes_the_relay_and_a_rollback_does_not() -> anyhow::Result<()> {
    let postgres = closedloop_e2e::servers::Postgres::shared()?;
    let pool = sqlx::PgPool::connect(&postgres.create_database().await?).await?;
    let db = closedloop_dispatch::store::Db::new(pool);
    let wake = db.relay_wake();

    let rolled_back = db.begin().await?;
    drop(rolled_back);
    let woken = tokio::time::timeout(Duration::from_millis(300), wake.notified()).await;
    assert!(woken.is_err(), "a rollback records nothing and wakes nobody");

    let mut recording = db.begin().await?;
    sqlx::query("SELECT 1").execute(&mut **recording).await?;
    recording.commit().await?;
    // The permit waits for the relay even if it was not waiting at the commit.
    tokio::time::timeout(WAIT, wake.notified())
        .await
        .map_err(|_| anyhow::anyhow!("the commit did not wake the relay"))?;
    Ok(())
}
