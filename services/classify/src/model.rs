//! A statistical text model beside the keyword rules: character n-gram (1..=3) multinomial
//! naive Bayes over folded text (Traditional→Simplified, lower case), one model for intent
//! and one for category. Character n-grams need no word segmentation and carry over
//! between scripts once folded. Trained from the team's labelled examples by
//! `classify-train`, shipped as `model/model.json`, loaded at start; `classify-eval`
//! measures it on the held-out part.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// FNV-1a: n-gram keys are short and trusted (from our own model file), so a fast hash
/// beats the DoS-resistant default here.
#[derive(Default)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type FnvMap<V> = HashMap<String, V, BuildHasherDefault<Fnv>>;

use serde::{Deserialize, Serialize};

/// Longest n-gram.
pub const MAX_N: usize = 3;

/// One labelled example.
#[derive(Debug, Clone)]
pub struct Example {
    pub intent: String,
    pub category: String,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("line {line}: expected `intent<TAB>category<TAB>text`")]
    Malformed { line: usize },
    #[error("model is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses the labelled examples (`#` lines are comments).
pub fn parse_examples(tsv: &str) -> Result<Vec<Example>, ModelError> {
    tsv.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|(i, line)| {
            let mut fields = line.splitn(3, '\t');
            match (fields.next(), fields.next(), fields.next()) {
                (Some(intent), Some(category), Some(text)) if !text.trim().is_empty() => Ok(Example {
                    intent: intent.trim().to_owned(),
                    category: category.trim().to_owned(),
                    text: text.trim().to_owned(),
                }),
                _ => Err(ModelError::Malformed { line: i + 1 }),
            }
        })
        .collect()
}

/// Whether an example belongs to the held-out part: a fifth of them, chosen by a stable
/// hash of the text, so the split never changes as examples are added.
pub fn is_held_out(text: &str) -> bool {
    // FNV-1a: stable across platforms and releases, unlike the std hasher.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash % 5 == 0
}

/// Calls `f` with every character n-gram (1..=MAX_N) of `text`, as slices of it; n-grams
/// that are only whitespace or punctuation are skipped.
pub fn for_each_ngram<'t>(text: &'t str, mut f: impl FnMut(&'t str)) {
    let starts: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let chars = starts.len() - 1;
    for n in 1..=MAX_N {
        for i in 0..chars.saturating_sub(n - 1) {
            let gram = &text[starts[i]..starts[i + n]];
            if gram.chars().any(char::is_alphanumeric) {
                f(gram);
            }
        }
    }
}

/// Multinomial naive Bayes over n-grams, with add-one smoothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NaiveBayes {
    pub classes: Vec<String>,
    pub log_priors: Vec<f32>,
    /// Log probability of an n-gram never seen with a class.
    pub log_unseen: Vec<f32>,
    /// Log probability of each seen n-gram, per class.
    pub log_likelihoods: FnvMap<Vec<f32>>,
}

/// A model's verdict on a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class: String,
    /// Posterior probability of `class`, 0..1.
    pub confidence: f32,
    /// The n-grams that pulled most towards `class`.
    pub evidence: Vec<String>,
}

impl NaiveBayes {
    /// Trains on (text, label) pairs; texts must already be folded.
    pub fn train<'a>(examples: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut classes: Vec<String> = Vec::new();
        let mut documents: Vec<f64> = Vec::new();
        let mut counts: HashMap<String, Vec<f64>> = HashMap::new();
        let mut totals: Vec<f64> = Vec::new();
        for (text, label) in examples {
            let class = classes.iter().position(|c| c == label).unwrap_or_else(|| {
                classes.push(label.to_owned());
                documents.push(0.0);
                totals.push(0.0);
                for row in counts.values_mut() {
                    row.push(0.0);
                }
                classes.len() - 1
            });
            documents[class] += 1.0;
            let width = classes.len();
            for_each_ngram(text, |gram| {
                let row = counts.entry(gram.to_owned()).or_insert_with(|| vec![0.0; width]);
                row[class] += 1.0;
                totals[class] += 1.0;
            });
        }
        let vocabulary = counts.len() as f64;
        let all_documents: f64 = documents.iter().sum();
        let log_priors = documents
            .iter()
            .map(|d| (d / all_documents.max(1.0)).ln() as f32)
            .collect();
        let log_unseen = totals
            .iter()
            .map(|t| (1.0 / (t + vocabulary)).ln() as f32)
            .collect();
        let log_likelihoods = counts
            .into_iter()
            .map(|(gram, row)| {
                let logs = row
                    .iter()
                    .zip(&totals)
                    .map(|(c, t)| ((c + 1.0) / (t + vocabulary)).ln() as f32)
                    .collect();
                (gram, logs)
            })
            .collect();
        Self {
            classes,
            log_priors,
            log_unseen,
            log_likelihoods,
        }
    }

    /// The most probable class of a folded text.
    pub fn predict(&self, text: &str) -> Prediction {
        let mut scores: Vec<f32> = self.log_priors.clone();
        // N-grams no class has seen carry no evidence; scoring them with each class's
        // smoothed "unseen" probability would favour the classes with the least text.
        for_each_ngram(text, |gram| {
            if let Some(row) = self.log_likelihoods.get(gram) {
                for (score, log) in scores.iter_mut().zip(row) {
                    *score += log;
                }
            }
        });
        let (best, top) =
            scores.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |(bi, bs), (i, s)| if *s > bs { (i, *s) } else { (bi, bs) },
            );
        let normaliser: f32 = scores.iter().map(|s| (s - top).exp()).sum();
        let mut evidence: Vec<(f32, &str)> = Vec::new();
        for_each_ngram(text, |gram| {
            if let Some(row) = self.log_likelihoods.get(gram) {
                let others = row
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != best)
                    .map(|(_, l)| *l)
                    .fold(f32::MIN, f32::max);
                let pull = row[best] - others;
                if pull > 0.0 && gram.chars().count() > 1 && !evidence.iter().any(|(_, g)| *g == gram) {
                    evidence.push((pull, gram));
                }
            }
        });
        evidence.sort_by(|a, b| b.0.total_cmp(&a.0));
        Prediction {
            class: self.classes.get(best).cloned().unwrap_or_default(),
            confidence: 1.0 / normaliser,
            evidence: evidence.into_iter().take(3).map(|(_, g)| g.to_owned()).collect(),
        }
    }
}

/// The shipped pair of models.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextModels {
    /// Which examples (count and split) trained them.
    pub trained_on: String,
    pub intent: NaiveBayes,
    pub category: NaiveBayes,
}

impl TextModels {
    /// Trains both models on the training part of `examples` (never the held-out part).
    pub fn train(examples: &[Example]) -> Self {
        let training: Vec<(String, &Example)> = examples
            .iter()
            .filter(|e| !is_held_out(&e.text))
            .map(|e| (crate::rules::fold(&e.text), e))
            .collect();
        let intent = NaiveBayes::train(training.iter().map(|(t, e)| (t.as_str(), e.intent.as_str())));
        // Category only where it means something: complaints and inquiries.
        let category = NaiveBayes::train(
            training
                .iter()
                .filter(|(_, e)| e.intent == "complaint" || e.intent == "inquiry")
                .map(|(t, e)| (t.as_str(), e.category.as_str())),
        );
        Self {
            trained_on: format!("{} of {} examples", training.len(), examples.len()),
            intent,
            category,
        }
    }

    pub fn builtin() -> Result<Self, ModelError> {
        Ok(serde_json::from_str(include_str!("../model/model.json"))?)
    }

    pub fn load(path: Option<&str>) -> Result<Self, ModelError> {
        match path {
            None => Self::builtin(),
            Some(path) => {
                let json = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Ok(serde_json::from_str(&json)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngrams_cover_one_to_three_characters() {
        let mut grams = Vec::new();
        for_each_ngram("断网了", |g| grams.push(g.to_owned()));
        assert_eq!(grams, vec!["断", "网", "了", "断网", "网了", "断网了"]);
        let mut none = Vec::new();
        for_each_ngram("，！", |g| none.push(g.to_owned()));
        assert!(none.is_empty());
    }

    #[test]
    fn learns_from_examples_and_explains() {
        let model = NaiveBayes::train([
            ("宽带断网了", "outage"),
            ("又停电了", "outage"),
            ("断网一整天", "outage"),
            ("话费多扣了", "billing"),
            ("账单不对多扣钱", "billing"),
        ]);
        let outage = model.predict("家里断网了");
        assert_eq!(outage.class, "outage");
        assert!(outage.confidence > 0.5 && outage.confidence <= 1.0);
        assert!(
            outage.evidence.iter().any(|g| g.contains("断网")),
            "{:?}",
            outage.evidence
        );
        assert_eq!(model.predict("又多扣了话费").class, "billing");
    }

    #[test]
    fn the_split_is_stable_and_about_a_fifth() {
        assert_eq!(is_held_out("宽带断网了"), is_held_out("宽带断网了"));
        let held = (0..1000).filter(|i| is_held_out(&format!("example {i}"))).count();
        assert!((150..250).contains(&held), "{held}");
    }

    #[test]
    fn examples_parse_and_reject_malformed_lines() {
        let examples = parse_examples("# comment\ncomplaint\toutage\t断网了\n\n").expect("valid");
        assert_eq!(examples.len(), 1);
        assert!(matches!(
            parse_examples("complaint\toutage"),
            Err(ModelError::Malformed { line: 1 })
        ));
    }
}
