//! The keyword table classify matches against. Defaults are built in (`default_rules.json`);
//! operators replace them with `CLOSEDLOOP_CLASSIFY_RULES=/path/rules.json`.

use serde::Deserialize;

/// How text and keywords are compared: Traditional folded to Simplified, lower case.
pub fn fold(text: &str) -> String {
    let mut text = closedloop_runtime::chinese::fold_to_simplified(text);
    if text.chars().all(is_caseless_or_ascii) {
        // Lower case in place: no second string, and no case table for each ideograph.
        text.make_ascii_lowercase();
        text
    } else {
        text.to_lowercase()
    }
}

/// ASCII, or a character without case: CJK punctuation, kana and ideographs, and
/// full-width punctuation and digits.
fn is_caseless_or_ascii(c: char) -> bool {
    c.is_ascii() || matches!(c, '\u{3000}'..='\u{9FFF}' | '\u{FF01}'..='\u{FF20}')
}

/// A number of two or more, as people write it: digits, Chinese numerals, or a vague count
/// ("几", "好几", "七八").
const COUNT: &str = "(?:[2-9]|[1-9][0-9]|两|[二三四五六七八九]十?[一二三四五六七八九]?|十[一二三四五六七八九]?|几十|十几|好几|几|两三|三四|四五|五六|七八|三五)";

/// Repeated contact said with a count or a time, which no word list can enumerate:
/// "打了七八个电话", "第四张工单", "三番五次", "called four times", "the third ticket".
/// Matched on folded text.
static COUNTED_CONTACT: std::sync::LazyLock<Option<regex::Regex>> = std::sync::LazyLock::new(|| {
    let chinese = [
        format!(
            "(?:打|找|联系|投诉|反映|报修|催|问|跑|来|去|提交|申请)了?(?:不下|至少|快|将近|差不多|前后)?{COUNT}多?(?:次|遍|趟|回|通)"
        ),
        format!("{COUNT}多?(?:个|通)(?:电话|工单)"),
        format!("{COUNT}趟"),
        format!("第?{COUNT}张工单"),
        format!("{COUNT}个第"),
        "三番五次|屡次|一再|再三|反反复复".to_owned(),
    ];
    // ASCII word boundaries: a Unicode one keeps the regex off its DFA, which made
    // classification a hundred times slower on CJK text.
    let english = [
        r"(?-u:\b)(?:called|phoned|rang|contacted|emailed|complained|reported|chased|written)(?-u:\b)[a-z ,]{0,30}?(?-u:\b)(?:twice|(?:two|three|four|five|six|seven|eight|nine|ten|several|many|multiple|[2-9]|[1-9][0-9]) times)",
        r"(?-u:\b)(?:second|third|fourth|fifth|sixth|seventh|\d+(?:nd|rd|th)) (?:time|call|ticket|complaint|visit)",
        r"(?-u:\b)(?:two|three|four|five|several|multiple|[2-9]) (?:tickets|complaints|calls)(?-u:\b)",
        r"(?-u:\b)every day this week(?-u:\b)",
    ];
    let pattern = chinese
        .iter()
        .map(String::as_str)
        .chain(english)
        .collect::<Vec<_>>()
        .join("|");
    regex::Regex::new(&pattern).ok()
});

/// Where a folded text speaks of contacting more than once, in counts or times.
pub fn counted_contacts(text: &str) -> Vec<&str> {
    COUNTED_CONTACT
        .as_ref()
        .map(|pattern| pattern.find_iter(text).map(|m| m.as_str()).collect())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Deserialize)]
pub struct CategoryRule {
    pub name: String,
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rules {
    /// Every keyword of every list in one automaton, built at load.
    #[serde(skip)]
    pub matcher: Matcher,
    /// Reported as `classifier_version`, so a verdict can be traced to its rules.
    pub version: String,
    pub categories: Vec<CategoryRule>,
    pub fallback_category: String,
    pub negative_words: Vec<String>,
    pub positive_words: Vec<String>,
    pub question_words: Vec<String>,
    /// Threats to go to the media, a regulator or court.
    pub escalation_words: Vec<String>,
    /// Categories that start one priority higher.
    pub urgent_categories: Vec<String>,
    /// "Third time", "still not fixed": the customer has been here before.
    #[serde(default)]
    pub repeat_contact_words: Vec<String>,
    /// The elderly, the ill, the disabled: handled with more care and sooner.
    #[serde(default)]
    pub vulnerable_words: Vec<String>,
    #[serde(default)]
    pub anger_words: Vec<String>,
    /// Insults; without a concrete problem named, the contact is abuse rather than a fault.
    #[serde(default)]
    pub abuse_words: Vec<String>,
    /// Followers from which a poster is notable (verified accounts are too).
    pub notable_followers: i64,
    /// Followers from which a poster is an influencer: one priority higher.
    pub influence_followers: i64,
    /// Followers from which a poster gets a named account manager: two priorities higher.
    pub key_opinion_leader_followers: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rules are not valid JSON: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("rules are unusable: {0}")]
    Invalid(String),
    #[error("cannot build the keyword matcher: {0}")]
    Matcher(#[from] aho_corasick::BuildError),
}

/// Which list a keyword belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    Category(usize),
    Negative,
    Positive,
    Question,
    Escalation,
    Repeat,
    Vulnerable,
    Anger,
    Abuse,
}

/// Finds the keywords of every list in one pass over the text.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    automaton: Option<aho_corasick::AhoCorasick>,
    /// For each pattern: its list and the keyword.
    owners: Vec<(List, String)>,
}

/// The keywords found in a text, by list, each once, in list order.
#[derive(Debug, Default)]
pub struct Found<'r> {
    hits: Vec<(List, &'r str)>,
}

impl<'r> Found<'r> {
    pub fn of(&self, list: List) -> Vec<&'r str> {
        self.hits
            .iter()
            .filter(|(l, _)| *l == list)
            .map(|(_, w)| *w)
            .collect()
    }
}

impl Matcher {
    fn build(rules: &Rules) -> Result<Self, aho_corasick::BuildError> {
        let mut owners: Vec<(List, String)> = Vec::new();
        for (i, category) in rules.categories.iter().enumerate() {
            owners.extend(category.keywords.iter().map(|w| (List::Category(i), w.clone())));
        }
        for (list, words) in [
            (List::Negative, &rules.negative_words),
            (List::Positive, &rules.positive_words),
            (List::Question, &rules.question_words),
            (List::Escalation, &rules.escalation_words),
            (List::Repeat, &rules.repeat_contact_words),
            (List::Vulnerable, &rules.vulnerable_words),
            (List::Anger, &rules.anger_words),
            (List::Abuse, &rules.abuse_words),
        ] {
            owners.extend(words.iter().map(|w| (list, w.clone())));
        }
        owners.retain(|(_, w)| !w.is_empty());
        // A DFA: some hundred keywords make a table of a few hundred kilobytes, and every
        // text classified is scanned with it.
        let automaton = aho_corasick::AhoCorasick::builder()
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(owners.iter().map(|(_, w)| w.as_str()))?;
        Ok(Self {
            automaton: Some(automaton),
            owners,
        })
    }

    /// Every keyword occurring in the (folded) text; overlapping ones too.
    pub fn scan(&self, text: &str) -> Found<'_> {
        let Some(automaton) = &self.automaton else {
            return Found::default();
        };
        let mut seen = vec![false; self.owners.len()];
        for hit in automaton.find_overlapping_iter(text) {
            seen[hit.pattern().as_usize()] = true;
        }
        let hits = seen
            .iter()
            .zip(&self.owners)
            .filter(|(seen, _)| **seen)
            .map(|(_, (list, word))| (*list, word.as_str()))
            .collect();
        Found { hits }
    }
}

impl Rules {
    pub fn builtin() -> Result<Self, RulesError> {
        Self::from_json(include_str!("default_rules.json"))
    }

    pub fn from_json(json: &str) -> Result<Self, RulesError> {
        let mut rules: Rules = serde_json::from_str(json)?;
        if rules.categories.is_empty() {
            return Err(RulesError::Invalid("no categories".into()));
        }
        // Matching folds Traditional to Simplified and Latin to lower case; fold the keywords
        // the same way once.
        for list in [
            &mut rules.negative_words,
            &mut rules.positive_words,
            &mut rules.question_words,
            &mut rules.escalation_words,
            &mut rules.repeat_contact_words,
            &mut rules.vulnerable_words,
            &mut rules.anger_words,
            &mut rules.abuse_words,
        ] {
            list.iter_mut().for_each(|w| *w = fold(w));
        }
        for category in &mut rules.categories {
            category.keywords.iter_mut().for_each(|w| *w = fold(w));
        }
        rules.matcher = Matcher::build(&rules)?;
        Ok(rules)
    }

    pub fn load(path: Option<&str>) -> Result<Self, RulesError> {
        match path {
            None => Self::builtin(),
            Some(path) => {
                let json = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_json(&json)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_contacts_are_found_and_single_ones_are_not() {
        assert!(COUNTED_CONTACT.is_some(), "the pattern compiles");
        for text in [
            "打了七八个电话没有一个有用",
            "打了不下十次电话",
            "来回跑了营业厅三趟",
            "第四张工单了",
            "说了第二天上门,我等了三个第二天",
            "三番五次地反映",
            "already called four times this week",
            "this is the fifth time i'm reporting it",
            "i've opened three tickets",
        ] {
            assert!(!counted_contacts(&fold(text)).is_empty(), "{text}");
        }
        for text in [
            "打了一次电话就解决了",
            "我要办两张卡",
            "买了三个路由器",
            "called once, fixed",
        ] {
            assert!(counted_contacts(&fold(text)).is_empty(), "{text}");
        }
    }

    #[test]
    fn characters_the_fold_treats_as_caseless_have_no_lower_case() {
        let caseless = ('\u{3000}'..='\u{9FFF}').chain('\u{FF01}'..='\u{FF20}');
        for c in caseless.filter(|c| is_caseless_or_ascii(*c)) {
            assert!(c.to_lowercase().eq([c]), "{c:?}");
        }
    }

    #[test]
    fn fold_matches_lower_casing_the_simplified_text() {
        for text in [
            "寬頻斷網 WiFi OK",
            "ÉCRAN cassé",
            "ΣΟΦΊΑ",
            "ＡＢＣ１２３",
            "已经3天",
        ] {
            let simplified = closedloop_runtime::chinese::fold_to_simplified(text);
            assert_eq!(fold(text), simplified.to_lowercase(), "{text}");
        }
    }
}
