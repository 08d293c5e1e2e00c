//! The classification itself: a plain function from text and poster to a verdict with the
//! reasons that produced it.

use closedloop_proto::v1::{Channel, Classification, Intent, Poster, Priority, Sentiment};

use closedloop_runtime::pii;

use crate::rules::Rules;

/// What classify needs to know about a contact.
pub struct Contact<'a> {
    pub text: &'a str,
    pub channel: Channel,
    pub poster: Option<&'a Poster>,
}

fn hits<'w>(text: &str, words: &'w [String]) -> Vec<&'w str> {
    words
        .iter()
        .filter(|w| text.contains(w.as_str()))
        .map(String::as_str)
        .collect()
}

/// Public channels, where personal data must never be discussed.
fn is_public(channel: Channel) -> bool {
    matches!(
        channel,
        Channel::WeiboPost | Channel::WeiboComment | Channel::ComplaintPlatform
    )
}

fn raise(priority: Priority) -> Priority {
    match priority {
        Priority::P4 => Priority::P3,
        Priority::P3 => Priority::P2,
        _ => Priority::P1,
    }
}

pub fn classify(rules: &Rules, contact: &Contact<'_>) -> Classification {
    let text = contact.text.to_lowercase();
    let mut reasons = Vec::new();

    let mut best: Option<(&str, Vec<&str>)> = None;
    let mut total_hits = 0usize;
    for category in &rules.categories {
        let found = hits(&text, &category.keywords);
        total_hits += found.len();
        if !found.is_empty() && best.as_ref().is_none_or(|(_, b)| found.len() > b.len()) {
            best = Some((category.name.as_str(), found));
        }
    }
    let (category, confidence) = match &best {
        Some((name, found)) => {
            reasons.push(format!("category {name}: keywords {found:?}"));
            (name.to_string(), found.len() as f64 / total_hits.max(1) as f64)
        }
        None => {
            reasons.push(format!(
                "category {}: no keyword matched",
                rules.fallback_category
            ));
            (rules.fallback_category.clone(), 0.3)
        }
    };

    let negative = hits(&text, &rules.negative_words);
    let positive = hits(&text, &rules.positive_words);
    let polar = (negative.len() + positive.len()) as f64;
    let score = if polar == 0.0 {
        0.0
    } else {
        (positive.len() as f64 - negative.len() as f64) / polar
    };
    let sentiment = if score < -0.2 {
        Sentiment::Negative
    } else if score > 0.2 {
        Sentiment::Positive
    } else {
        Sentiment::Neutral
    };
    if !negative.is_empty() || !positive.is_empty() {
        reasons.push(format!(
            "sentiment {score:.2}: negative {negative:?}, positive {positive:?}"
        ));
    }

    let questions = hits(&text, &rules.question_words);
    let intent = if best.is_none() && negative.is_empty() && !positive.is_empty() {
        reasons.push("intent praise: positive words, no problem named".into());
        Intent::Praise
    } else if best.is_none() && negative.is_empty() && questions.is_empty() && text.chars().count() < 6 {
        reasons.push("intent noise: short text without a problem or a question".into());
        Intent::Noise
    } else if negative.is_empty() && !questions.is_empty() {
        reasons.push(format!("intent inquiry: question words {questions:?}"));
        Intent::Inquiry
    } else {
        reasons.push("intent complaint".into());
        Intent::Complaint
    };

    let mut priority = match intent {
        Intent::Praise | Intent::Noise => Priority::P4,
        _ => Priority::P3,
    };
    if matches!(intent, Intent::Complaint | Intent::Inquiry) {
        if rules.urgent_categories.contains(&category) {
            priority = raise(priority);
            reasons.push(format!("priority raised: {category} is urgent"));
        }
        if sentiment == Sentiment::Negative {
            priority = raise(priority);
            reasons.push("priority raised: negative sentiment".into());
        }
        let followers = contact.poster.map_or(0, |p| p.followers);
        if followers >= rules.influence_followers {
            priority = raise(priority);
            reasons.push(format!("priority raised: poster has {followers} followers"));
        }
        let threats = hits(&text, &rules.escalation_words);
        if !threats.is_empty() {
            priority = Priority::P1;
            reasons.push(format!("priority P1: escalation risk {threats:?}"));
        }
    }

    let (masked_text, has_personal_data) = pii::mask(contact.text);
    let needs_private_channel = has_personal_data && is_public(contact.channel);
    if needs_private_channel {
        reasons.push("personal data on a public channel: move to a private channel".into());
    }

    Classification {
        intent: intent as i32,
        category,
        category_confidence: confidence,
        sentiment: sentiment as i32,
        sentiment_score: score,
        priority: priority as i32,
        reasons,
        masked_text,
        needs_private_channel,
        classifier_version: rules.version.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, followers: i64) -> Classification {
        let rules = Rules::builtin().expect("builtin rules");
        let poster = Poster {
            followers,
            ..Default::default()
        };
        classify(
            &rules,
            &Contact {
                text,
                channel: Channel::WeiboPost,
                poster: Some(&poster),
            },
        )
    }

    #[test]
    fn an_angry_outage_report_is_an_urgent_complaint() {
        let c = run("家里宽带又断网了，三天了还没解决，太差了！", 10);
        assert_eq!(c.intent(), Intent::Complaint);
        assert_eq!(c.category, "outage");
        assert_eq!(c.sentiment(), Sentiment::Negative);
        assert_eq!(c.priority(), Priority::P1);
        assert!(!c.reasons.is_empty());
    }

    #[test]
    fn billing_question_is_an_inquiry() {
        let c = run("请问这个月的话费账单怎么查？", 10);
        assert_eq!(c.intent(), Intent::Inquiry);
        assert_eq!(c.category, "billing");
        assert_eq!(c.priority(), Priority::P3);
    }

    #[test]
    fn thanks_is_praise_and_low_priority() {
        let c = run("谢谢客服小王，服务很好", 10);
        assert_eq!(c.intent(), Intent::Praise);
        assert_eq!(c.priority(), Priority::P4);
    }

    #[test]
    fn media_threat_and_reach_raise_priority() {
        assert_eq!(
            run("多扣我话费，再不处理我就找媒体曝光", 10).priority(),
            Priority::P1
        );
        assert_eq!(run("账单好像不对", 10).priority(), Priority::P3);
        assert_eq!(run("账单好像不对", 2_000_000).priority(), Priority::P2);
    }

    #[test]
    fn personal_data_is_masked_and_moves_public_posts_private() {
        let c = run("我的号码13812345678一直没信号，邮箱 zhang.san@example.com", 10);
        assert_eq!(
            c.masked_text,
            "我的号码138****5678一直没信号，邮箱 *********@example.com"
        );
        assert!(c.needs_private_channel);
    }
}
