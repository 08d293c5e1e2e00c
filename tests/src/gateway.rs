//! What a channel gateway does, for tests and checks that drive Closedloop from outside:
//! complaints that each need a work order, and submission that keeps trying until ingest
//! accepts (as the README asks of gateways).

use std::time::{Duration, Instant};

use closedloop_proto::v1::ingest_service_client::IngestServiceClient;
use closedloop_proto::v1::{Channel, ComplaintSubmission, Poster, SubmitComplaintRequest};
use tonic::transport::Channel as GrpcChannel;

use crate::system::authed;

/// Complaint `n` of a run: a clear complaint (it needs a work order) from a poster of its own,
/// on one of three channels, without personal data.
pub fn complaint(run: &str, n: usize) -> ComplaintSubmission {
    const TEXTS: [&str; 4] = [
        "家里宽带又断网了，三天了还没解决！",
        "话费被多扣了五十元，要求退款",
        "My internet has been down since yesterday and nobody fixed it",
        "快递一直没送到，客服也不回复，太差了",
    ];
    const CHANNELS: [Channel; 3] = [Channel::WeiboPost, Channel::Wechat, Channel::WebForm];
    ComplaintSubmission {
        channel: CHANNELS[n % CHANNELS.len()] as i32,
        channel_message_id: format!("{run}-{n}"),
        poster: Some(Poster {
            poster_id: format!("{run}-poster-{n}"),
            ..Default::default()
        }),
        text: TEXTS[n % TEXTS.len()].to_owned(),
        locale: "zh-CN".into(),
        ..Default::default()
    }
}

/// When a submission was first tried, by the monotonic clock and the wall clock (Unix ms,
/// to compare with another process's records).
#[derive(Debug, Clone, Copy)]
pub struct FirstAttempt {
    pub at: Instant,
    pub unix_ms: i64,
}

/// Submits `submission` until ingest accepts it (a duplicate answer carries the same id),
/// waiting a little longer after each failure, for up to `give_up_after`. Returns the
/// complaint id and when the first attempt was made.
pub async fn submit_until_accepted(
    client: IngestServiceClient<GrpcChannel>,
    token: &str,
    submission: ComplaintSubmission,
    give_up_after: Duration,
) -> anyhow::Result<(String, FirstAttempt)> {
    let first = FirstAttempt {
        at: Instant::now(),
        unix_ms: chrono::Utc::now().timestamp_millis(),
    };
    let mut wait = Duration::from_millis(100);
    loop {
        let request = authed(
            token,
            SubmitComplaintRequest {
                complaint: Some(submission.clone()),
            },
        );
        let mut client = client.clone();
        let error = match tokio::time::timeout(Duration::from_secs(5), client.submit_complaint(request)).await
        {
            Ok(Ok(response)) => return Ok((response.into_inner().complaint_id, first)),
            Ok(Err(status)) => status.to_string(),
            Err(_) => "no answer within 5 s".to_owned(),
        };
        anyhow::ensure!(
            first.at.elapsed() < give_up_after,
            "{} not accepted within {give_up_after:?}: {error}",
            submission.channel_message_id
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}
