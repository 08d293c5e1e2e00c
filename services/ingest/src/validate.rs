//! Validation and normalisation of submissions: plain functions, no I/O.

use chrono::{DateTime, Duration, Utc};
use closedloop_proto::v1::{Channel, Complaint, ComplaintSubmission, Poster};
use closedloop_runtime::grpc::Violation;
use closedloop_runtime::{chinese, ids, time};

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

pub use closedloop_runtime::text::normalise as normalise_text;

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

/// Whether `value` holds a control character (NUL, escape, line breaks, ...): none belongs
/// in an id or a name, and PostgreSQL refuses NUL in text.
fn has_control(value: &str) -> bool {
    value.chars().any(char::is_control)
}

/// Checks a short string field: required or not, at most `max_chars`, no control characters.
/// The field's name (`{prefix}.{name}`) is built only for a violation: this runs several
/// times for every complaint accepted.
fn check_field(
    violations: &mut Vec<Violation>,
    (prefix, name): (&str, &str),
    value: &str,
    required: bool,
    max_chars: usize,
) {
    let field = || format!("{prefix}.{name}");
    if required && value.trim().is_empty() {
        violations.push(Violation::new(field(), "must not be empty"));
    } else if value.chars().count() > max_chars {
        violations.push(Violation::new(
            field(),
            format!("must be at most {max_chars} characters"),
        ));
    } else if has_control(value) {
        violations.push(Violation::new(field(), "must not contain control characters"));
    }
}

/// Bytes a text may take, for every character it may hold: four, the most UTF-8 needs.
const BYTES_PER_CHAR: usize = 4;

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
    let id = limits.max_id_chars;
    check_field(
        &mut violations,
        (prefix, "channel_message_id"),
        &submission.channel_message_id,
        true,
        id,
    );
    check_field(
        &mut violations,
        (prefix, "thread_id"),
        &submission.thread_id,
        false,
        id,
    );
    check_field(
        &mut violations,
        (prefix, "in_reply_to"),
        &submission.in_reply_to,
        false,
        id,
    );
    let default_poster = Poster::default();
    let poster = submission.poster.as_ref().unwrap_or(&default_poster);
    check_field(
        &mut violations,
        (prefix, "poster.poster_id"),
        &poster.poster_id,
        true,
        id,
    );
    if !(0..=MAX_FOLLOWERS).contains(&poster.followers) {
        violations.push(Violation::new(
            field("poster.followers"),
            format!("must be 0 to {MAX_FOLLOWERS}"),
        ));
    }
    check_field(
        &mut violations,
        (prefix, "poster.display_name"),
        &poster.display_name,
        false,
        id,
    );
    let max_chars = if is_transcript(channel) {
        limits.max_transcript_chars
    } else {
        limits.max_text_chars
    };
    // Counted before normalising, so nobody pays to normalise an oversized text, and after,
    // since normalising may expand a text many times over (U+FDFA becomes 18 characters).
    let max_bytes = max_chars.saturating_mul(BYTES_PER_CHAR);
    let too_long = |text: &str| text.len() > max_bytes || text.chars().count() > max_chars;
    let text = if too_long(&submission.text) {
        None
    } else {
        Some(normalise_text(&submission.text)).filter(|text| !too_long(text))
    };
    let text = match text {
        None => {
            violations.push(Violation::new(
                field("text"),
                format!("must be at most {max_chars} characters ({max_bytes} bytes), also once normalised"),
            ));
            String::new()
        }
        Some(text) if text.is_empty() => {
            violations.push(Violation::new(field("text"), "must not be empty"));
            text
        }
        Some(text) => text,
    };
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
    if submission.locale.len() > 35
        || !submission
            .locale
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        violations.push(Violation::new(field("locale"), "must be a BCP 47 tag"));
    }
    check_field(
        &mut violations,
        (prefix, "region_hint"),
        &submission.region_hint,
        false,
        128,
    );
    if has_control(&submission.tenant) {
        violations.push(Violation::new(
            field("tenant"),
            "must not contain control characters",
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

    /// The fields a submission's violations name, under `prefix`, with the default limits.
    fn offending(submission: &ComplaintSubmission, prefix: &str) -> Vec<String> {
        fields(validate_submission(
            submission,
            "acme",
            &Limits::default(),
            Utc::now(),
            prefix,
        ))
    }

    fn assert_names(got: &[String], expected: &[&str]) {
        for expected in expected {
            assert!(got.iter().any(|f| f == expected), "missing {expected} in {got:?}");
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
        assert_eq!(
            normalise_text("退\u{200b}款\u{202e}"),
            "退款",
            "format characters go"
        );
    }

    #[test]
    fn control_characters_are_refused_in_every_string_field() {
        let mut s = submission();
        s.channel_message_id = "m\u{0}1".into();
        s.thread_id = "t\u{0}".into();
        s.in_reply_to = "r\u{1b}".into();
        s.region_hint = "北京\u{0}".into();
        s.tenant = "acme\u{0}".into();
        if let Some(p) = s.poster.as_mut() {
            p.poster_id = "u\u{0}".into();
            p.display_name = "name\n".into();
        }
        let got = offending(&s, "c");
        assert_names(
            &got,
            &[
                "c.channel_message_id",
                "c.thread_id",
                "c.in_reply_to",
                "c.poster.poster_id",
                "c.poster.display_name",
                "c.region_hint",
                "c.tenant",
            ],
        );
        s = submission();
        s.locale = "zh\u{0}".into();
        assert_eq!(offending(&s, "c"), ["c.locale"]);
    }

    #[test]
    fn invisible_text_is_empty() {
        let mut s = submission();
        s.text = "\u{200b}\u{200d}\u{2060}\u{202e}  \u{feff}".into();
        assert_eq!(offending(&s, "c"), ["c.text"]);
    }

    #[test]
    fn the_length_limit_holds_after_normalisation() {
        let mut s = submission();
        // 2,000 characters that NFKC expands to 36,000.
        s.text = "\u{fdfa}".repeat(2_000);
        assert_eq!(offending(&s, "c"), ["c.text"]);
        s.text = "好".repeat(5_000);
        assert!(validate_submission(&s, "acme", &Limits::default(), Utc::now(), "c").is_ok());
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
        let got = offending(&s, "c");
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
        let got = offending(&bad, "complaint");
        assert_names(
            &got,
            &[
                "complaint.tenant",
                "complaint.channel",
                "complaint.channel_message_id",
                "complaint.poster.poster_id",
                "complaint.text",
                "complaint.attachment_urls[0]",
            ],
        )
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

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Short strings of anything, weighted toward what trips normalisation: controls,
        /// format characters, full-width and expanding compatibility characters.
        fn hostile() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,40}",
                "[\\x00-\\x1f a-z\u{200b}-\u{200f}\u{202a}-\u{202e}\u{2060}\u{feff}\u{fdfa}\u{ff10}-\u{ff19}宽带断网]{0,40}",
            ]
        }

        fn limits() -> Limits {
            Limits {
                max_text_chars: 50,
                max_id_chars: 20,
                ..Limits::default()
            }
        }

        proptest! {
            /// Nothing panics, and whatever is accepted is clean: no control characters in a
            /// field, a visible text within its limit once normalised.
            #[test]
            fn what_validation_accepts_is_clean(
                id in hostile(),
                poster in hostile(),
                thread in hostile(),
                region in hostile(),
                text in hostile(),
            ) {
                let submission = ComplaintSubmission {
                    channel: Channel::Wechat as i32,
                    channel_message_id: id,
                    thread_id: thread,
                    region_hint: region,
                    text,
                    poster: Some(Poster {
                        poster_id: poster,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                if let Ok(complaint) = validate_submission(&submission, "acme", &limits(), Utc::now(), "c") {
                    let poster_id = complaint.poster.as_ref().map(|p| p.poster_id.clone()).unwrap_or_default();
                    for field in [&complaint.channel_message_id, &complaint.thread_id, &complaint.region_hint, &poster_id] {
                        prop_assert!(!field.chars().any(char::is_control), "{field:?}");
                    }
                    prop_assert!(!complaint.text.is_empty());
                    prop_assert!(
                        !complaint.text.chars().any(|c| c.is_control() || closedloop_runtime::text::is_format(c)),
                        "{:?}", complaint.text
                    );
                    prop_assert!(complaint.text.chars().count() <= limits().max_text_chars);
                }
            }

            /// Normalising a normalised text changes nothing.
            #[test]
            fn normalising_twice_changes_nothing(text in hostile()) {
                let once = normalise_text(&text);
                prop_assert_eq!(normalise_text(&once), once);
            }
        }
    }
}
