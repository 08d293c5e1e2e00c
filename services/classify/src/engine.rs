//! The classification itself: a plain function from text and poster to a verdict with the
//! reasons that produced it.

use closedloop_proto::v1::{
    Channel, Classification, InfluenceTier, Intent, PersonalDataKind, Poster, Priority, Sentiment,
};
use closedloop_runtime::pii::PiiKind;

use crate::model::{Prediction, RiskLists, Scan, TextModels};
use crate::region;
use crate::rules::{Found, List, Rules, fold};

/// What classify needs to know about a contact.
pub struct Contact<'a> {
    pub text: &'a str,
    pub channel: Channel,
    pub poster: Option<&'a Poster>,
    /// The gateway's region hint, if any (e.g. "广东 深圳").
    pub region_hint: &'a str,
}

/// A poster's reach, from followers and verification.
pub fn influence_tier(rules: &Rules, poster: Option<&Poster>) -> InfluenceTier {
    let (followers, verified) = poster.map_or((0, false), |p| (p.followers, p.verified));
    if followers >= rules.key_opinion_leader_followers {
        InfluenceTier::KeyOpinionLeader
    } else if followers >= rules.influence_followers {
        InfluenceTier::Influencer
    } else if followers >= rules.notable_followers || verified {
        InfluenceTier::Notable
    } else {
        InfluenceTier::Regular
    }
}

fn personal_data_kind(kind: PiiKind) -> PersonalDataKind {
    match kind {
        PiiKind::Mobile => PersonalDataKind::Mobile,
        PiiKind::Landline => PersonalDataKind::Landline,
        PiiKind::IdNumber => PersonalDataKind::IdNumber,
        PiiKind::BankCard => PersonalDataKind::BankCard,
        PiiKind::Email => PersonalDataKind::Email,
    }
}

/// The category with the most keyword hits (and those keywords), and all category hits.
fn keyword_category<'r>(rules: &'r Rules, found: &Found<'r>) -> (Option<(&'r str, Vec<&'r str>)>, usize) {
    let mut best: Option<(&str, Vec<&str>)> = None;
    let mut total_hits = 0usize;
    for (i, category) in rules.categories.iter().enumerate() {
        let keywords = found.of(List::Category(i));
        total_hits += keywords.len();
        if !keywords.is_empty() && best.as_ref().is_none_or(|(_, b)| keywords.len() > b.len()) {
            best = Some((category.name.as_str(), keywords));
        }
    }
    (best, total_hits)
}

/// Keywords as the reasons list them, `["a", "b"]`: what `{:?}` prints for plain words,
/// without escaping each character (they come from the rules' lists and patterns, which
/// hold no quotes or control characters).
struct Words<'a>(&'a [&'a str]);

impl std::fmt::Display for Words<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, word) in self.0.iter().enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            write!(f, "{separator}\"{word}\"")?;
        }
        f.write_str("]")
    }
}

/// Whether the rules have any ground for an intent: a category keyword, sentiment, a
/// question word or a threat (to go to the media, a regulator or court). Without one their
/// "complaint" is only a default.
fn has_intent_signal(found: &Found<'_>, category_found: bool) -> bool {
    category_found
        || !found.of(List::Negative).is_empty()
        || !found.of(List::Positive).is_empty()
        || !found.of(List::Question).is_empty()
        || !found.of(List::Escalation).is_empty()
}

/// The words of the rules' escalation-risk lists in a folded text.
struct RiskWords<'a> {
    threats: Vec<&'a str>,
    /// Repeat-contact words and counted contacts ("打了三次").
    repeated: Vec<&'a str>,
    vulnerable: Vec<&'a str>,
}

impl<'a> RiskWords<'a> {
    fn of(found: &Found<'a>, text: &'a str) -> Self {
        let mut repeated = found.of(List::Repeat);
        repeated.extend(crate::rules::counted_contacts(text));
        Self {
            threats: found.of(List::Escalation),
            repeated,
            vulnerable: found.of(List::Vulnerable),
        }
    }

    /// The words that speak of risk in a text of `intent`. Asking about a service for an
    /// elderly or disabled person is no risk by the words alone ("家里有老人，想办个亲情号");
    /// in an inquiry the risk model decides, as where the lists found nothing.
    /// Also returns the words set aside.
    fn in_intent(mut self, intent: Intent) -> (Self, Vec<&'a str>) {
        let set_aside = if intent == Intent::Inquiry {
            std::mem::take(&mut self.vulnerable)
        } else {
            Vec::new()
        };
        (self, set_aside)
    }

    fn lists(&self) -> RiskLists {
        RiskLists {
            threat: !self.threats.is_empty(),
            repeat: !self.repeated.is_empty(),
            vulnerable: !self.vulnerable.is_empty(),
        }
    }
}

/// What the engine concludes about escalation risk.
struct RiskOutcome<'a> {
    /// The intent, a complaint where the risk model is sure of risk in praise or noise.
    intent: Intent,
    escalation_risk: bool,
    /// Whether the model flagged risk where the lists found none.
    by_model: bool,
    /// The list words that stand: none where they were overruled.
    words: RiskWords<'a>,
}

/// Weighs the lists' `words` and the risk model's `verdict` on a text the engine took for
/// `intent` (`corrected`: an agent's), saying why in `reasons`.
fn weigh_risk<'a>(
    mut intent: Intent,
    words: RiskWords<'a>,
    verdict: Option<(&Prediction, &TextModels, &Scan<'_>)>,
    corrected: bool,
    reasons: &mut Vec<String>,
) -> RiskOutcome<'a> {
    // Praise and noise are what the intent model calls most short threats ("這件事我會投稿
    // 給新聞台"): where the risk model is sure enough, the text is a complaint with that risk.
    let mut sure_of_risk = false;
    if matches!(intent, Intent::Praise | Intent::Noise)
        && !corrected
        && let Some((p, m, scan)) = verdict.filter(|(p, m, _)| m.overrules_intent(p))
    {
        let (kind, evidence) = m.risk_evidence(scan, p).unwrap_or_default();
        reasons.push(format!(
            "intent complaint, not {}: the risk model is sure of escalation risk ({:.2}, likeliest {kind}, evidence {})",
            intent.label(),
            m.risk_of(p),
            evidence.join(" ")
        ));
        intent = Intent::Complaint;
        sure_of_risk = true;
    }
    // Praise and noise carry no escalation risk, whatever words they use ("third time in
    // this shop, staff as kind as ever", "I posted your good service on my feed").
    let risk_possible = matches!(intent, Intent::Complaint | Intent::Inquiry);
    let (mut words, set_aside) = words.in_intent(intent);
    if !set_aside.is_empty() {
        reasons.push(format!(
            "no escalation risk from the words {} alone: an inquiry",
            Words(&set_aside)
        ));
    }
    let lists = words.lists();
    let rules_risk = lists.any();
    let lists_overruled = if !rules_risk || sure_of_risk {
        None
    } else if !risk_possible {
        Some(format!("{} carries none", intent.label()))
    } else {
        verdict
            .filter(|(p, m, _)| m.vetoes_risk(p, lists))
            .map(|(p, m, _)| format!("the model ({:.2}) overrules them", m.risk_of(p)))
    };
    if let Some(why) = &lists_overruled {
        let all: Vec<&str> = [&words.threats, &words.repeated, &words.vulnerable]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        reasons.push(format!(
            "no escalation risk from the words {}: {why}",
            Words(&all)
        ));
        (words.threats, words.repeated, words.vulnerable) = (Vec::new(), Vec::new(), Vec::new());
    }
    let model_risk =
        verdict.filter(|(p, m, _)| risk_possible && !rules_risk && (sure_of_risk || m.flags_risk(p)));
    if let Some((p, m, scan)) = &model_risk {
        let (kind, evidence) = m.risk_evidence(scan, p).unwrap_or_default();
        reasons.push(format!(
            "escalation risk by the model ({:.2}, likeliest {kind}, evidence {})",
            m.risk_of(p),
            evidence.join(" ")
        ));
    }
    RiskOutcome {
        intent,
        escalation_risk: (rules_risk && lists_overruled.is_none()) || model_risk.is_some(),
        by_model: model_risk.is_some(),
        words,
    }
}

/// Which escalation-risk lists find words in a text of `intent`, as the engine reads them.
pub fn risk_lists(rules: &Rules, text: &str, intent: Intent) -> RiskLists {
    let text = fold(text);
    RiskWords::of(&rules.matcher.scan(&text), &text)
        .in_intent(intent)
        .0
        .lists()
}

/// What the keyword rules alone found in a text, for weighing them against the model
/// (see `classify-train`).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSignals {
    pub category_found: bool,
    pub intent_signal: bool,
}

pub fn rule_signals(rules: &Rules, text: &str) -> RuleSignals {
    let text = fold(text);
    let found = rules.matcher.scan(&text);
    let category_found = keyword_category(rules, &found).0.is_some();
    RuleSignals {
        category_found,
        intent_signal: has_intent_signal(&found, category_found),
    }
}

/// Classifies a contact with the keyword rules and, when given, the statistical models:
/// the models decide intent and category when confident, the rules otherwise.
pub fn classify(rules: &Rules, models: Option<&TextModels>, contact: &Contact<'_>) -> Classification {
    // Traditional and Simplified texts match the same rules.
    let text = fold(contact.text);
    let found = rules.matcher.scan(&text);
    let mut reasons = Vec::new();

    let (best, total_hits) = keyword_category(rules, &found);
    let (category, confidence) = match &best {
        Some((name, found)) => {
            reasons.push(format!("category {name}: keywords {}", Words(found)));
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

    // A text an agent corrected keeps the agent's labels; the models are not asked.
    let (masked_text, personal_data) = closedloop_runtime::pii::mask_all(contact.text);
    let corrected = models.and_then(|m| m.corrected(&masked_text));

    // How far the model may overrule the keywords was chosen by cross-validation when it
    // was trained; it is consulted only where it could decide.
    let keywords_found = best.is_some();
    let rules_had_signal = has_intent_signal(&found, keywords_found);
    let risk_words = RiskWords::of(&found, &text);
    let scan = models.filter(|_| corrected.is_none()).map(|m| {
        let scan = m.scan(
            &text,
            m.intent_trust.could_decide(rules_had_signal),
            m.category_trust.could_decide(keywords_found),
            // Where the word lists found nothing, the risk model may find risk (indirect
            // threats, people the lists do not name); where they found some, it may
            // overrule them (a phone for the elderly is no elderly customer).
            true,
        );
        (scan, m)
    });
    let model_category = scan
        .as_ref()
        .and_then(|(s, m)| Some((s.category.as_ref()?, *m, s)));
    let (category, confidence) = match (model_category, corrected) {
        (_, Some(labels)) => {
            reasons.push(format!(
                "category {}: as an agent corrected this text",
                labels.category
            ));
            (labels.category.clone(), 1.0)
        }
        (Some((p, m, scan)), _) if m.category_trust.model_decides(keywords_found, p.confidence) => {
            let over = if keywords_found && p.class == category {
                "as the keywords said".to_owned()
            } else if keywords_found {
                format!("overruling the keywords' {category}")
            } else {
                "no keyword matched".to_owned()
            };
            reasons.push(format!(
                "category {} by the model ({:.2}, evidence {}): {over}",
                p.class,
                p.confidence,
                m.category_evidence(scan, p).join(" ")
            ));
            (p.class.clone(), f64::from(p.confidence))
        }
        _ => (category, confidence),
    };

    let negative = found.of(List::Negative);
    let positive = found.of(List::Positive);
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
            "sentiment {score:.2}: negative {}, positive {}",
            Words(&negative),
            Words(&positive)
        ));
    }

    let questions = found.of(List::Question);
    let intent = if best.is_none() && negative.is_empty() && !positive.is_empty() {
        reasons.push("intent praise: positive words, no problem named".into());
        Intent::Praise
    } else if best.is_none() && negative.is_empty() && questions.is_empty() && text.chars().count() < 6 {
        reasons.push("intent noise: short text without a problem or a question".into());
        Intent::Noise
    } else if negative.is_empty() && !questions.is_empty() {
        reasons.push(format!("intent inquiry: question words {}", Words(&questions)));
        Intent::Inquiry
    } else {
        reasons.push("intent complaint".into());
        Intent::Complaint
    };

    let anger_hits = found.of(List::Anger);
    let exclamations = text.matches(['!', '！']).count();
    let anger = !anger_hits.is_empty() || exclamations >= 3;
    if anger {
        reasons.push(format!(
            "anger: {}, {exclamations} exclamation marks",
            Words(&anger_hits)
        ));
    }
    let abuse = found.of(List::Abuse);
    let abuse_without_problem = !abuse.is_empty() && best.is_none();
    if abuse_without_problem {
        reasons.push(format!("abuse without a concrete problem: {}", Words(&abuse)));
    }

    let tier = influence_tier(rules, contact.poster);
    // Likewise for intent.
    let model_intent = scan.as_ref().and_then(|(s, m)| Some((s.intent.as_ref()?, *m, s)));
    let intent = match (model_intent, corrected) {
        (_, Some(labels)) => {
            reasons.push(format!(
                "intent {}: as an agent corrected this text",
                labels.intent
            ));
            intent_of(&labels.intent)
        }
        (Some((p, m, scan)), _) if m.intent_trust.model_decides(rules_had_signal, p.confidence) => {
            let by_model = intent_of(&p.class);
            let over = if rules_had_signal && by_model == intent {
                "as the rules said"
            } else if rules_had_signal {
                "overruling the rules"
            } else {
                "no rule signal"
            };
            reasons.push(format!(
                "intent {} by the model ({:.2}, evidence {}): {over}",
                p.class,
                p.confidence,
                m.intent_evidence(scan, p).join(" ")
            ));
            by_model
        }
        _ => intent,
    };
    let risk_verdict = scan.as_ref().and_then(|(s, m)| Some((s.risk.as_ref()?, *m, s)));
    let RiskOutcome {
        intent,
        escalation_risk,
        by_model: model_risk,
        words: RiskWords {
            threats,
            repeated,
            vulnerable,
        },
    } = weigh_risk(
        intent,
        risk_words,
        risk_verdict,
        corrected.is_some(),
        &mut reasons,
    );
    let mut priority = match intent {
        Intent::Praise | Intent::Noise => Priority::P4,
        _ if abuse_without_problem => Priority::P4,
        _ => Priority::P3,
    };
    if matches!(intent, Intent::Complaint | Intent::Inquiry) && !abuse_without_problem {
        if rules.urgent_categories.contains(&category) {
            priority = priority.raised();
            reasons.push(format!("priority raised: {category} is urgent"));
        }
        if sentiment == Sentiment::Negative || anger {
            priority = priority.raised();
            reasons.push("priority raised: negative or angry".into());
        }
        if !repeated.is_empty() {
            priority = priority.raised();
            reasons.push(format!("priority raised: repeated contact {}", Words(&repeated)));
        }
        if !vulnerable.is_empty() {
            priority = priority.raised();
            reasons.push(format!(
                "priority raised: vulnerable customer {}",
                Words(&vulnerable)
            ));
        }
        if model_risk {
            priority = priority.raised();
            reasons.push("priority raised: escalation risk".into());
        }
        match tier {
            InfluenceTier::KeyOpinionLeader => {
                priority = priority.raised().raised();
                reasons.push("priority raised twice: key opinion leader".into());
            }
            InfluenceTier::Influencer => {
                priority = priority.raised();
                reasons.push("priority raised: influencer".into());
            }
            _ => {}
        }
        if !threats.is_empty() {
            priority = Priority::P1;
            reasons.push(format!("priority P1: escalation risk {}", Words(&threats)));
        }
    }

    let needs_private_channel =
        !personal_data.is_empty() && closedloop_runtime::pii::is_public_channel(contact.channel);
    if needs_private_channel {
        reasons.push(format!(
            "personal data {personal_data:?} on a public channel: move to a private channel"
        ));
    }
    let (mut province, mut city) = region::locate(&text);
    if province.is_empty() && !contact.region_hint.is_empty() {
        (province, city) = region::locate(&fold(contact.region_hint));
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
        anger,
        abuse_without_problem,
        escalation_risk,
        influence_tier: tier as i32,
        province,
        city,
        personal_data: personal_data
            .into_iter()
            .map(|k| personal_data_kind(k) as i32)
            .collect(),
    }
}

/// The intent a label names; anything else is a complaint, the safe side.
fn intent_of(label: &str) -> Intent {
    match label {
        "inquiry" => Intent::Inquiry,
        "praise" => Intent::Praise,
        "noise" => Intent::Noise,
        _ => Intent::Complaint,
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
            None,
            &Contact {
                text,
                channel: Channel::WeiboPost,
                poster: Some(&poster),
                region_hint: "",
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
        assert_eq!(run("账单好像不对", 200_000).priority(), Priority::P2);
        assert_eq!(
            run("账单好像不对", 2_000_000).priority(),
            Priority::P1,
            "a key opinion leader"
        );
    }

    #[test]
    fn traditional_text_matches_the_same_rules() {
        let simplified = run("家里宽带又断网了，太差了", 10);
        let traditional = run("家裡寬頻又斷網了，太差了", 10);
        assert_eq!(traditional.category, simplified.category);
        assert_eq!(traditional.priority(), simplified.priority());
        assert_eq!(run("話費帳單亂扣", 10).category, "billing");
        // Mixed script, as people type when their input method switches mid-sentence.
        let mixed = run("宽带斷網了，第三次反映还没解决", 10);
        assert_eq!(mixed.category, "outage");
        assert!(mixed.escalation_risk);
    }

    #[test]
    fn influence_tiers_follow_followers_and_verification() {
        let rules = Rules::builtin().expect("builtin rules");
        let tier = |followers, verified| {
            influence_tier(
                &rules,
                Some(&Poster {
                    followers,
                    verified,
                    ..Default::default()
                }),
            )
        };
        assert_eq!(tier(10, false), InfluenceTier::Regular);
        assert_eq!(tier(10, true), InfluenceTier::Notable);
        assert_eq!(tier(50_000, false), InfluenceTier::Notable);
        assert_eq!(tier(500_000, false), InfluenceTier::Influencer);
        assert_eq!(tier(3_000_000, false), InfluenceTier::KeyOpinionLeader);
        assert_eq!(influence_tier(&rules, None), InfluenceTier::Regular);
    }

    #[test]
    fn escalation_risk_anger_and_abuse() {
        let repeated = run("第三次反映了，网速还是很慢", 10);
        assert!(repeated.escalation_risk && !repeated.anger);
        let elderly = run("家里老人一个人住，停电一天了", 10);
        assert!(elderly.escalation_risk);
        assert_eq!(elderly.priority(), Priority::P1, "outage, vulnerable: urgent");
        let angry = run("气死了！！！话费又乱扣", 10);
        assert!(angry.anger);
        let abuse = run("你们这帮混蛋，滚", 10);
        assert!(abuse.abuse_without_problem);
        assert_eq!(
            abuse.priority(),
            Priority::P4,
            "abuse without a problem is not urgent"
        );
        let abusive_fault = run("混蛋，宽带断网三天了", 10);
        assert!(
            !abusive_fault.abuse_without_problem,
            "a concrete fault is a fault"
        );
    }

    #[test]
    fn region_from_text_or_hint() {
        let rules = Rules::builtin().expect("builtin rules");
        let found = classify(
            &rules,
            None,
            &Contact {
                text: "深圳南山停电了",
                channel: Channel::Wechat,
                poster: None,
                region_hint: "",
            },
        );
        assert_eq!((found.province.as_str(), found.city.as_str()), ("广东", "深圳"));
        let hinted = classify(
            &rules,
            None,
            &Contact {
                text: "停电了",
                channel: Channel::Wechat,
                poster: None,
                region_hint: "浙江 杭州",
            },
        );
        assert_eq!((hinted.province.as_str(), hinted.city.as_str()), ("浙江", "杭州"));
    }

    fn with_models(text: &str, models: &TextModels) -> Classification {
        let rules = Rules::builtin().expect("builtin rules");
        classify(
            &rules,
            Some(models),
            &Contact {
                text,
                channel: Channel::Wechat,
                poster: None,
                region_hint: "",
            },
        )
    }

    #[test]
    fn the_model_names_a_category_the_keywords_missed_and_says_why() {
        // No category keyword here; the shipped model is trusted where keywords are silent.
        let text = "寄给我的新卡被别人签收了";
        assert_eq!(run(text, 10).category, "other");
        let models = TextModels::builtin().expect("shipped model");
        let c = with_models(text, &models);
        assert_eq!(c.category, "delivery");
        assert!(
            c.reasons
                .iter()
                .any(|r| r.starts_with("category delivery by the model")),
            "{:?}",
            c.reasons
        );
        // A model that is never trusted changes nothing.
        let mut distrusted = models.clone();
        distrusted.category_trust = crate::model::Trust {
            over_rules: crate::model::NEVER,
            without_rules: crate::model::NEVER,
        };
        assert_eq!(with_models(text, &distrusted).category, "other");
    }

    #[test]
    fn the_risk_model_flags_what_the_word_lists_miss() {
        let risk_examples = crate::model::parse_examples(
            "risk\tmedia\t我要让全网都知道你们的所作所为\nrisk\tmedia\t全网都会知道这件事\n\
             none\t-\t宽带断网了\nnone\t-\t话费多扣了\n",
        )
        .expect("examples");
        let text = "让全网都知道";
        let mut models = TextModels::builtin().expect("shipped model");
        models.risk = None;
        assert!(
            !with_models(text, &models).escalation_risk,
            "no word of the lists"
        );
        let training: Vec<_> = risk_examples
            .into_iter()
            .filter(|e| !crate::model::is_held_out(&e.text))
            .collect();
        let models = models.with_risk(
            crate::model::Learner::Logistic,
            &training,
            0.5,
            crate::model::RiskVetoes::all(0.0),
            crate::model::NEVER,
        );
        let c = with_models(text, &models);
        assert!(c.escalation_risk, "{:?}", c.reasons);
        assert!(
            c.reasons
                .iter()
                .any(|r| r.starts_with("escalation risk by the model") && r.contains("likeliest media")),
            "the reasons name the kind: {:?}",
            c.reasons
        );
        let calm = with_models("宽带断网了", &models);
        assert!(!calm.escalation_risk, "{:?}", calm.reasons);
    }

    #[test]
    fn the_risk_model_overrules_each_list_at_its_own_bar() {
        let risk_examples = crate::model::parse_examples(
            "none\t-\t老人机怎么设置大字体\nnone\t-\t给我爸买的老人机能办副卡吗\n\
             none\t-\t老人机的电池不耐用\nrisk\tvulnerable\t家里老人一个人住，停电了很危险\n\
             risk\tvulnerable\t老人卧床，不能没电\n",
        )
        .expect("examples");
        let text = "老人机的字太小了";
        let mut models = TextModels::builtin().expect("shipped model");
        models.risk = None;
        assert!(
            with_models(text, &models).escalation_risk,
            "\"老人\" is on the list"
        );
        let models = models.with_risk(
            crate::model::Learner::Logistic,
            &risk_examples,
            crate::model::NEVER,
            crate::model::RiskVetoes {
                threat: 0.0,
                repeat: 0.0,
                vulnerable: 0.5,
            },
            crate::model::NEVER,
        );
        let c = with_models(text, &models);
        assert!(!c.escalation_risk, "{:?}", c.reasons);
        assert!(
            c.reasons
                .iter()
                .any(|r| r.starts_with("no escalation risk from the words [\"老人\"]: the model")),
            "{:?}",
            c.reasons
        );
        let risky = with_models("家里老人一个人住，停电了很危险", &models);
        assert!(risky.escalation_risk, "{:?}", risky.reasons);
        // The threat list's bar is 0: the model, which has seen no threat, cannot
        // overrule it, even beside a vulnerable-list word it would overrule alone.
        let threat = with_models("老人机的字太小了，我要找记者曝光", &models);
        assert!(threat.escalation_risk, "{:?}", threat.reasons);
    }

    #[test]
    fn an_inquiry_for_an_elderly_person_is_no_risk_by_the_word_alone() {
        let inquiry = run("家里有老人，想办个亲情号，怎么办理？", 10);
        assert_eq!(inquiry.intent(), Intent::Inquiry, "{:?}", inquiry.reasons);
        assert!(!inquiry.escalation_risk, "{:?}", inquiry.reasons);
        assert!(
            inquiry
                .reasons
                .iter()
                .any(|r| r == "no escalation risk from the words [\"老人\"] alone: an inquiry"),
            "{:?}",
            inquiry.reasons
        );
        let complaint = run("家里有老人，停电三天了还没人管", 10);
        assert_eq!(complaint.intent(), Intent::Complaint, "{:?}", complaint.reasons);
        assert!(complaint.escalation_risk, "{:?}", complaint.reasons);
    }

    #[test]
    fn a_risk_model_sure_of_risk_makes_noise_a_complaint() {
        let risk_examples = crate::model::parse_examples(
            "risk\tmedia\t这件事我会投稿新闻台\nrisk\tmedia\t我要投稿新闻台\n\
             none\t-\t宽带断网了\nnone\t-\t话费多扣了\n",
        )
        .expect("examples");
        // Five characters without a problem or a question: the rules call it noise, and the
        // intent model is kept out of it.
        let text = "投稿新闻台";
        let mut models = TextModels::builtin().expect("shipped model").with_risk(
            crate::model::Learner::Logistic,
            &risk_examples,
            crate::model::NEVER,
            crate::model::RiskVetoes::all(0.0),
            crate::model::NEVER,
        );
        models.intent_trust = crate::model::Trust {
            over_rules: crate::model::NEVER,
            without_rules: crate::model::NEVER,
        };
        let noise = with_models(text, &models);
        assert_eq!(noise.intent(), Intent::Noise, "{:?}", noise.reasons);
        assert!(!noise.escalation_risk, "{:?}", noise.reasons);

        models.risk_over_intent = 0.5;
        let c = with_models(text, &models);
        assert_eq!(c.intent(), Intent::Complaint, "{:?}", c.reasons);
        assert!(c.escalation_risk, "{:?}", c.reasons);
        assert!(
            c.reasons
                .iter()
                .any(|r| r.starts_with("intent complaint, not noise: the risk model")
                    && r.contains("likeliest media")),
            "{:?}",
            c.reasons
        );
    }

    #[test]
    fn a_threat_is_a_sign_of_intent() {
        let rules = Rules::builtin().expect("rules");
        assert!(rule_signals(&rules, "找媒体来评评理").intent_signal);
        assert!(!rule_signals(&rules, "来评评理").intent_signal);
    }

    #[test]
    fn praise_and_noise_carry_no_escalation_risk_whatever_their_words() {
        let praise = run("第三次来这家营业厅了，店员一样亲切，谢谢", 10);
        assert_eq!(praise.intent(), Intent::Praise, "{:?}", praise.reasons);
        assert!(!praise.escalation_risk, "{:?}", praise.reasons);
        assert!(
            praise
                .reasons
                .iter()
                .any(|r| r.starts_with("no escalation risk from the words [\"第三次\"]: praise carries none")),
            "{:?}",
            praise.reasons
        );
        let complaint = run("第三次来这家营业厅了，问题还是没解决", 10);
        assert!(complaint.escalation_risk, "{:?}", complaint.reasons);
    }

    #[test]
    fn a_text_agents_corrected_keeps_their_labels() {
        let mut models = TextModels::builtin().expect("shipped model");
        let text = "家里宽带又断网了";
        assert_eq!(with_models(text, &models).category, "outage");
        models.corrected.insert(
            crate::rules::fold(text),
            crate::model::Corrected {
                intent: "inquiry".into(),
                category: "plan_change".into(),
            },
        );
        let c = with_models(text, &models);
        assert_eq!(
            (c.intent(), c.category.as_str()),
            (Intent::Inquiry, "plan_change")
        );
        assert!(
            c.reasons.iter().any(|r| r.contains("as an agent corrected")),
            "{:?}",
            c.reasons
        );
        assert_eq!(
            with_models("家里宽带断网三天了", &models).category,
            "outage",
            "only that text"
        );
    }

    #[test]
    fn a_model_that_agrees_with_the_keywords_says_so() {
        let mut models = TextModels::builtin().expect("shipped model");
        models.category_trust = crate::model::Trust {
            over_rules: 0.0,
            without_rules: 0.0,
        };
        let c = with_models("家里宽带又断网了", &models);
        assert_eq!(c.category, "outage");
        let reason = c
            .reasons
            .iter()
            .find(|r| r.starts_with("category outage by the model"))
            .unwrap_or_else(|| panic!("{:?}", c.reasons));
        assert!(reason.ends_with("as the keywords said"), "{reason}");
    }

    #[test]
    fn keywords_keep_their_category_when_the_model_may_not_overrule() {
        let mut models = TextModels::builtin().expect("shipped model");
        models.category_trust = crate::model::Trust {
            over_rules: crate::model::NEVER,
            without_rules: 0.0,
        };
        assert!(!models.category_trust.could_decide(true));
        let c = with_models("家里宽带又断网了", &models);
        assert_eq!(c.category, "outage");
        assert!(
            c.reasons
                .iter()
                .all(|r| !(r.starts_with("category") && r.contains("by the model"))),
            "{:?}",
            c.reasons
        );
    }

    #[test]
    fn personal_data_is_masked_and_moves_public_posts_private() {
        let c = run("我的号码13812345678一直没信号，邮箱 zhang.san@example.com", 10);
        // Masked in its folded form (ingest hands classify folded text anyway).
        assert_eq!(
            c.masked_text,
            "我的号码138****5678一直没信号,邮箱 *********@example.com"
        );
        assert!(c.needs_private_channel);
        assert_eq!(
            c.personal_data().collect::<Vec<_>>(),
            vec![PersonalDataKind::Mobile, PersonalDataKind::Email]
        );
    }
}
