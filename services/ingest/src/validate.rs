//! Validation and normalisation of submissions: plain functions, no I/O.

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::{Channel, Complaint, ComplaintSubmission, Poster};
use closedloop_runtime::grpc::Violation;
use closedloop_runtime::{chinese, ids, time};
use unicode_normalization::UnicodeNormalization;

/// Bounds on what a gateway may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest text on social and messaging channels (a Weibo post is up to 2,000).
    pub max_text_chars: usize,
    /// Longest text on transcript channels (hotline, e-mail), which run longer.
    pub max_transcript_chars: usize,
    pub max_id_chars: usize,
    pub max_batch: usize,
    pub max_attachments: usize,
    /// How far in the future a `posted_at` may be (clock skew between systems).
    pub max_clock_skew: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_text_chars: 5_000,
            max_transcript_chars: 100_000,
            max_id_chars: 128,
            max_batch: 500,
            max_attachments: 9,
            max_clock_skew: Duration::minutes(5),
        }
    }
}

/// The most followers any account has; more is a gateway bug.
pub const MAX_FOLLOWERS: i64 = 10_000_000_000;

/// Unicode NFKC (which also turns full-width letters, digits and punctuation into their
/// half-width forms), control characters dropped, whitespace runs collapsed to one space:
/// the same words compare equal whatever the channel or input method did to them.
pub fn normalise_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.nfkc() {
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

/// Channels whose texts are transcripts rather than posts.
fn is_transcript(channel: Channel) -> bool {
    matches!(channel, Channel::Hotline | Channel::Email)
}

/// An absolute https URL with a host, no whitespace, at most 2 KiB.
fn valid_attachment_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    url.len() <= 2048
        && !host.is_empty()
        && !host.starts_with(['.', '-', ':'])
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The field's name (`{prefix}.{name}`) is built only for a violation: this runs four
/// times for every complaint accepted.
fn check_id(
    violations: &mut Vec<Violation>,
    (prefix, name): (&str, &str),
    value: &str,
    required: bool,
    limits: &Limits,
) {
    let field = || format!("{prefix}.{name}");
    if required && value.trim().is_empty() {
        violations.push(Violation::new(field(), "must not be empty"));
    } else if value.chars().count() > limits.max_id_chars {
        violations.push(Violation::new(
            field(),
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
        (prefix, "channel_message_id"),
        &submission.channel_message_id,
        true,
        limits,
    );
    check_id(
        &mut violations,
        (prefix, "thread_id"),
        &submission.thread_id,
        false,
        limits,
    );
    check_id(
        &mut violations,
        (prefix, "in_reply_to"),
        &submission.in_reply_to,
        false,
        limits,
    );
    let default_poster = Poster::default();
    let poster = submission.poster.as_ref().unwrap_or(&default_poster);
    check_id(
        &mut violations,
        (prefix, "poster.poster_id"),
        &poster.poster_id,
        true,
        limits,
    );
    if !(0..=MAX_FOLLOWERS).contains(&poster.followers) {
        violations.push(Violation::new(
            field("poster.followers"),
            format!("must be 0 to {MAX_FOLLOWERS}"),
        ));
    }
    if poster.display_name.chars().count() > limits.max_id_chars {
        violations.push(Violation::new(
            field("poster.display_name"),
            format!("must be at most {} characters", limits.max_id_chars),
        ));
    }
    let max_chars = if is_transcript(channel) {
        limits.max_transcript_chars
    } else {
        limits.max_text_chars
    };
    // Count before normalising, so nobody pays to normalise an oversized text.
    let too_long = submission.text.chars().count() > max_chars;
    let text = if too_long {
        String::new()
    } else {
        normalise_text(&submission.text)
    };
    if too_long {
        violations.push(Violation::new(
            field("text"),
            format!("must be at most {max_chars} characters"),
        ));
    } else if text.is_empty() {
        violations.push(Violation::new(field("text"), "must not be empty"));
    }
    if submission.attachment_urls.len() > limits.max_attachments {
        violations.push(Violation::new(
            field("attachment_urls"),
            format!("at most {} attachments", limits.max_attachments),
        ));
    }
    for (i, url) in submission.attachment_urls.iter().enumerate() {
        if !valid_attachment_url(url) {
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
        script: chinese::detect_script(&text) as i32,
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
        assert_eq!(complaint.script(), closedloop_proto::v1::Script::Simplified);
        assert_eq!(complaint.original_text, submission().text);
        assert_eq!(complaint.tenant, "acme");
        assert_eq!(
            complaint.complaint_id,
            complaint_id("acme", Channel::WeiboPost, "m-1")
        );
    }

    #[test]
    fn normalisation_folds_width_and_compatibility_forms() {
        assert_eq!(normalise_text("ＡＢＣ１２３！　网速"), "ABC123! 网速");
        assert_eq!(normalise_text("a\u{0007}b\r\n\tc"), "ab c");
        assert_eq!(normalise_text("①号楼"), "1号楼");
    }

    #[test]
    fn attachment_urls_must_be_https_with_a_host() {
        assert!(valid_attachment_url("https://wx.qlogo.cn/a/b.png?x=1"));
        for bad in [
            "http://x.cn/a.png",
            "https:///a.png",
            "https://a b.cn/",
            "https://",
            "ftp://x",
        ] {
            assert!(!valid_attachment_url(bad), "{bad}");
        }
    }

    #[test]
    fn transcripts_may_be_longer_than_posts() {
        let limits = Limits {
            max_text_chars: 10,
            max_transcript_chars: 50,
            ..Limits::default()
        };
        let mut s = submission();
        s.text = "字".repeat(20);
        assert!(validate_submission(&s, "acme", &limits, Utc::now(), "c").is_err());
        s.channel = Channel::Hotline as i32;
        assert!(validate_submission(&s, "acme", &limits, Utc::now(), "c").is_ok());
    }

    #[test]
    fn at_most_nine_attachments_and_sane_followers() {
        let mut s = submission();
        s.attachment_urls = vec!["https://img.example.cn/1.png".into(); 10];
        if let Some(p) = s.poster.as_mut() {
            p.followers = MAX_FOLLOWERS + 1;
        }
        let got = fields(validate_submission(
            &s,
            "acme",
            &Limits::default(),
            Utc::now(),
            "c",
        ));
        assert_eq!(got, vec!["c.poster.followers", "c.attachment_urls"]);
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
