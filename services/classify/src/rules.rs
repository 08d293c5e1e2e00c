//! The keyword table classify matches against. Defaults are built in (`default_rules.json`);
//! operators replace them with `CLOSEDLOOP_CLASSIFY_RULES=/path/rules.json`.

use serde::Deserialize;

/// How text and keywords are compared: Traditional folded to Simplified, lower case.
pub fn fold(text: &str) -> String {
    closedloop_runtime::chinese::fold_to_simplified(text).to_lowercase()
}

#[derive(Debug, Clone, Deserialize)]
pub struct CategoryRule {
    pub name: String,
    pub keywords: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rules {
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
