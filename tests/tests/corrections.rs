//! Learning from agents, end to end on a real nats-server and PostgreSQL: an agent corrects
//! a work order's category, the correction is exported as a labelled example, the model is
//! retrained with it, classify reads the new model on SIGHUP, and the same text comes back
//! with the agent's category. Its own test binary, because it signals its own process.

use std::time::Duration;

use closedloop_e2e::processes::bin_dir;
use closedloop_e2e::system::{TestEnv, authed, contact, refused};
use closedloop_e2e::wait_for;
use closedloop_proto::v1::*;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

/// What classify says of `text` now.
async fn category_of(env: &TestEnv, text: &str) -> anyhow::Result<String> {
    let request = ClassifyRequest {
        text: text.to_owned(),
        ..Default::default()
    };
    Ok(env
        .classify()
        .await?
        .classify(authed(&env.tokens.agent, request))
        .await?
        .into_inner()
        .classification
        .ok_or_else(|| anyhow::anyhow!("no classification"))?
        .category)
}

/// Runs one of the workspace's binaries to completion; its stdout, or why it failed.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let output = std::process::Command::new(bin_dir()?.join(binary))
        .args(args)
        .envs(env.iter().copied())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "{binary} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_category_is_learned_and_applied_after_a_reload() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let model = scratch.path().join("model.json");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../services/classify/model/model.json"
        ),
        &model,
    )?;
    let model_arg = model.display().to_string();
    let env = TestEnv::start_with(|o| o.classify_args = vec!["--model-file".into(), model_arg]).await?;

    // No punctuation: the exported text is the work order's summary, as ingest normalised it.
    let text = "我家的东西到现在还没弄好麻烦你们看一下";
    let before = category_of(&env, text).await?;
    let corrected = if before == "delivery" {
        "refund"
    } else {
        "delivery"
    };
    let submitted = env
        .submit(contact(Channel::Wechat, "fix-1", "poster-fix", 10, text))
        .await?;
    let work_order = env.work_order_for(&submitted.complaint_id).await?;

    // Bad corrections change nothing.
    let mut client = env.work_orders().await?;
    let reclassify = |intent: Intent, category: &str| ReclassifyWorkOrderRequest {
        work_order_id: work_order.work_order_id.clone(),
        intent: intent as i32,
        category: category.to_owned(),
        expected_version: 0,
    };
    for (request, why) in [
        (reclassify(Intent::Unspecified, ""), "nothing to change"),
        (
            reclassify(Intent::Complaint, "Not A Category!"),
            "a malformed category",
        ),
    ] {
        refused(
            client
                .reclassify_work_order(authed(&env.tokens.agent, request))
                .await,
            Code::InvalidArgument,
            why,
        )?;
    }
    refused(
        client
            .reclassify_work_order(authed(
                &env.tokens.other_tenant,
                reclassify(Intent::Complaint, corrected),
            ))
            .await,
        Code::NotFound,
        "another tenant's work order",
    )?;

    let fixed = client
        .reclassify_work_order(authed(
            &env.tokens.agent,
            reclassify(Intent::Complaint, corrected),
        ))
        .await?
        .into_inner()
        .work_order
        .ok_or_else(|| anyhow::anyhow!("no work order"))?;
    assert_eq!(fixed.category, corrected);
    assert_eq!(
        fixed.state, work_order.state,
        "a correction leaves the work where it is"
    );
    let history = client
        .get_work_order_history(authed(
            &env.tokens.agent,
            GetWorkOrderHistoryRequest {
                work_order_id: work_order.work_order_id.clone(),
            },
        ))
        .await?
        .into_inner()
        .entries;
    let last = history.last().ok_or_else(|| anyhow::anyhow!("no history"))?;
    assert_eq!(last.kind(), WorkOrderEventKind::Reclassified);
    assert_eq!(last.actor, "agent-7");
    assert!(
        last.note.ends_with(&format!("-> complaint / {corrected}")),
        "{}",
        last.note
    );

    // Exported as a labelled example, only for its tenant.
    let exported = run(
        "dispatch-corrections",
        &["--tenant", "acme"],
        &[("CLOSEDLOOP_DATABASE_URL", &env.database_url)],
    )?;
    assert!(
        exported
            .lines()
            .any(|l| l == format!("complaint\t{corrected}\t{text}")),
        "{exported}"
    );
    let other = run(
        "dispatch-corrections",
        &["--tenant", "beta"],
        &[("CLOSEDLOOP_DATABASE_URL", &env.database_url)],
    )?;
    assert_eq!(
        other.lines().filter(|l| !l.starts_with('#')).count(),
        0,
        "{other}"
    );
    let corrections = scratch.path().join("acme.tsv");
    std::fs::write(&corrections, exported)?;

    // Retrained with it; classify keeps its models until told to read the file again.
    let trained = run(
        "classify-train",
        &[
            "--corrections",
            corrections.to_str().unwrap_or_default(),
            "--current",
            model.to_str().unwrap_or_default(),
            "--out",
            model.to_str().unwrap_or_default(),
        ],
        &[],
    )?;
    assert!(trained.contains("before -> after"), "{trained}");
    assert_eq!(category_of(&env, text).await?, before, "no reload yet");
    let hangup = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    anyhow::ensure!(hangup.success(), "kill -HUP failed");
    wait_for("classify to answer with the corrected category", WAIT, || async {
        category_of(&env, text)
            .await
            .ok()
            .filter(|category| category == corrected)
    })
    .await?;
    env.shutdown().await
}
