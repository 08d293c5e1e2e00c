//! Validation and normalisation of submissions: plain functions, no I/O.

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::{Channel, Complaint, ComplaintSubmission, Poster};
use closedloop_runtime::grpc::Violation;
use closedloop_runtime::{ids, time};

/// Bounds on what a gateway may send.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_text_chars: usize,
    pub max_id_chars: usize,
    pub max_batch: usize,
    pub max_attachments: usize,
    /// How far in the future a `posted_at` may be (clock skew between systems).
    pub max_clock_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_text_chars: 20_000,
            max_id_chars: 128,
            max_batch: 500,
            max_attachments: 9,
            max_clock_skew: Duration::minutes(5),
        }
    }
}

/// Collapses whitespace runs to one space and drops control characters, so the same words
/// compare equal whatever the channel did to layout.
pub fn normalise_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
        } else if !c.is_control() {
            if pending_space {
                out.push(' ');
                pending_space = false;
            }
            out.push(c);
        }
    }
    out
}

/// The stable id of a contact: retries of one channel message get the same id.
pub fn complaint_id(tenant: &str, channel: Channel, channel_message_id: &str) -> String {
    ids::derive("complaint", &[tenant, channel.as_str_name(), channel_message_id]).to_string()
}

fn check_id(violations: &mut Vec<Violation>, field: &str, value: &str, required: bool, limits: &Limits) {
    if required && value.trim().is_empty() {
        violations.push(Violation::new(field, "must not be empty"));
    } else if value.chars().count() > limits.max_id_chars {
        violations.push(Violation::new(
            field,
            format!("must be at most {} characters", limits.max_id_chars),
        ));
    }
}

/// Checks a submission from a caller of `caller_tenant` and turns it into a complaint.
/// `prefix` names the submission's place in the request (e.g. `complaint` or `complaints[3]`).
pub fn validate_submission(
    submission: &ComplaintSubmission,
    caller_tenant: &str,
    limits: &Limits,
    now: DateTime<Utc>,
    prefix: &str,
) -> Result<Complaint, Vec<Violation>> {
    let mut violations = Vec::new();
    let field = |name: &str| format!("{prefix}.{name}");

    if !submission.tenant.is_empty() && submission.tenant != caller_tenant {
        violations.push(Violation::new(
            field("tenant"),
            "does not match the caller's tenant",
        ));
    }
    let channel = Channel::try_from(submission.channel).unwrap_or(Channel::Unspecified);
    if channel == Channel::Unspecified {
        violations.push(Violation::new(field("channel"), "must name a known channel"));
    }
    check_id(
        &mut violations,
        &field("channel_message_id"),
        &submission.channel_message_id,
        true,
        limits,
    );
    check_id(
        &mut violations,
        &field("thread_id"),
        &submission.thread_id,
        false,
        limits,
    );
    check_id(
        &mut violations,
        &field("in_reply_to"),
        &submission.in_reply_to,
        false,
        limits,
    );
    let default_poster = Poster::default();
    let poster = submission.poster.as_ref().unwrap_or(&default_poster);
    check_id(
        &mut violations,
        &field("poster.poster_id"),
        &poster.poster_id,
        true,
        limits,
    );
    if poster.followers < 0 {
        violations.push(Violation::new(field("poster.followers"), "must not be negative"));
    }
    let text = normalise_text(&submission.text);
    if text.is_empty() {
        violations.push(Violation::new(field("text"), "must not be empty"));
    } else if submission.text.chars().count() > limits.max_text_chars {
        violations.push(Violation::new(
            field("text"),
            format!("must be at most {} characters", limits.max_text_chars),
        ));
    }
    if submission.attachment_urls.len() > limits.max_attachments {
        violations.push(Violation::new(
            field("attachment_urls"),
            format!("at most {} attachments", limits.max_attachments),
        ));
    }
    for (i, url) in submission.attachment_urls.iter().enumerate() {
        if !url.starts_with("https://") || url.len() > 2048 || url.chars().any(char::is_whitespace) {
            violations.push(Violation::new(
                format!("{prefix}.attachment_urls[{i}]"),
                "must be an https URL",
            ));
        }
    }
    let posted_at = match &submission.posted_at {
        None => None,
        Some(ts) => match time::from_timestamp(ts) {
            Some(at) if at > now + limits.max_clock_skew => {
                violations.push(Violation::new(field("posted_at"), "is in the future"));
                None
            }
            Some(_) => Some(*ts),
            None => {
                violations.push(Violation::new(field("posted_at"), "is not a valid time"));
                None
            }
        },
    };
    if submission.locale.len() > 35 {
        violations.push(Violation::new(field("locale"), "must be a BCP 47 tag"));
    }
    if submission.region_hint.chars().count() > 128 {
        violations.push(Violation::new(
            field("region_hint"),
            "must be at most 128 characters",
        ));
    }
    if !violations.is_empty() {
        return Err(violations);
    }
    Ok(Complaint {
        complaint_id: complaint_id(caller_tenant, channel, &submission.channel_message_id),
        tenant: caller_tenant.to_owned(),
        channel: channel as i32,
        channel_message_id: submission.channel_message_id.clone(),
        poster: Some(poster.clone()),
        text,
        original_text: submission.text.clone(),
        posted_at,
        received_at: Some(time::to_timestamp(now)),
        thread_id: submission.thread_id.clone(),
        in_reply_to: submission.in_reply_to.clone(),
        attachment_urls: submission.attachment_urls.clone(),
        locale: submission.locale.clone(),
        region_hint: submission.region_hint.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission() -> ComplaintSubmission {
        ComplaintSubmission {
            channel: Channel::WeiboPost as i32,
            channel_message_id: "m-1".into(),
            poster: Some(Poster {
                poster_id: "u-1".into(),
                followers: 10,
                ..Default::default()
            }),
            text: "  宽带\t又断网了\n\n三天了 ".into(),
            ..Default::default()
        }
    }

    fn fields(result: Result<Complaint, Vec<Violation>>) -> Vec<String> {
        result
            .expect_err("should be invalid")
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn accepts_and_normalises_a_valid_submission() {
        let complaint =
            validate_submission(&submission(), "acme", &Limits::default(), Utc::now(), "complaint")
                .expect("valid");
        assert_eq!(complaint.text, "宽带 又断网了 三天了");
        assert_eq!(complaint.original_text, submission().text);
        assert_eq!(complaint.tenant, "acme");
        assert_eq!(
            complaint.complaint_id,
            complaint_id("acme", Channel::WeiboPost, "m-1")
        );
    }

    #[test]
    fn ids_are_stable_and_scoped_by_tenant_and_channel() {
        let a = complaint_id("acme", Channel::WeiboPost, "m-1");
        assert_eq!(a, complaint_id("acme", Channel::WeiboPost, "m-1"));
        assert_ne!(a, complaint_id("beta", Channel::WeiboPost, "m-1"));
        assert_ne!(a, complaint_id("acme", Channel::Wechat, "m-1"));
    }

    #[test]
    fn names_every_offending_field() {
        let bad = ComplaintSubmission {
            tenant: "other".into(),
            text: " \n ".into(),
            attachment_urls: vec!["http://x".into()],
            ..Default::default()
        };
        let got = fields(validate_submission(
            &bad,
            "acme",
            &Limits::default(),
            Utc::now(),
            "complaint",
        ));
        for expected in [
            "complaint.tenant",
            "complaint.channel",
            "complaint.channel_message_id",
            "complaint.poster.poster_id",
            "complaint.text",
            "complaint.attachment_urls[0]",
        ] {
            assert!(got.iter().any(|f| f == expected), "missing {expected} in {got:?}");
        }
    }

    #[test]
    fn rejects_long_text_future_times_and_negative_followers() {
        let limits = Limits {
            max_text_chars: 5,
            ..Limits::default()
        };
        let mut s = submission();
        s.text = "一二三四五六".into();
        s.posted_at = Some(time::to_timestamp(Utc::now() + Duration::hours(1)));
        if let Some(p) = s.poster.as_mut() {
            p.followers = -1;
        }
        let got = fields(validate_submission(&s, "acme", &limits, Utc::now(), "c"));
        assert_eq!(got, vec!["c.poster.followers", "c.text", "c.posted_at"]);
    }
}
