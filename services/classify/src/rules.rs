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
