//! A statistical text model beside the keyword rules: character n-gram (1..=3) multinomial
//! naive Bayes over folded text (Traditional→Simplified, lower case), one model for intent
//! and one for category. Character n-grams need no word segmentation and carry over
//! between scripts once folded. Trained from the team's labelled examples by
//! `classify-train`, shipped as `model/model.json`, loaded at start; `classify-eval`
//! measures it on the held-out part.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that already are hashes (`stable_hash` of an n-gram).
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are used; fold anything else in so the hasher stays correct.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

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

/// FNV-1a of a text: stable across platforms and releases, unlike the std hasher, so
/// splits made with it never change as examples are added.
pub fn stable_hash(text: &str) -> u64 {
    fnv_extend(FNV_OFFSET, text.as_bytes())
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv_extend(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// Whether an example belongs to the held-out part: a fifth of them, chosen by a stable
/// hash of the text.
pub fn is_held_out(text: &str) -> bool {
    stable_hash(text).is_multiple_of(5)
}

/// A bar no confidence reaches (confidences are at most 1); JSON has no infinity.
pub const NEVER: f32 = 2.0;

/// How far the engine lets a model overrule the keyword rules: the model decides when it
/// is at least this sure, with one bar for when the rules found something and one for when
/// they found nothing. `classify-train` chooses both by cross-validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Trust {
    pub over_rules: f32,
    pub without_rules: f32,
}

impl Trust {
    /// Never overrule the rules, and decide alone only when nearly certain: what the
    /// engine did before the bars were cross-validated (and model files without them get).
    pub const CAUTIOUS: Trust = Trust {
        over_rules: NEVER,
        without_rules: 0.99,
    };

    fn bar(&self, rules_found: bool) -> f32 {
        if rules_found {
            self.over_rules
        } else {
            self.without_rules
        }
    }

    /// Whether the model can decide at all here (otherwise it need not run).
    pub fn could_decide(&self, rules_found: bool) -> bool {
        self.bar(rules_found) <= 1.0
    }

    pub fn model_decides(&self, rules_found: bool, confidence: f32) -> bool {
        confidence >= self.bar(rules_found)
    }
}

fn cautious() -> Trust {
    Trust::CAUTIOUS
}

/// Calls `f` with every character n-gram (1..=MAX_N) of `text`, as a slice of it with its
/// `stable_hash`, by start position then length; n-grams that are only whitespace or
/// punctuation are skipped. Hashes grow one character at a time (FNV is sequential), and
/// each character is classified once, because this runs for every text classified.
pub fn for_each_ngram<'t>(text: &'t str, mut f: impl FnMut(&'t str, u64)) {
    let mut chars: Vec<(usize, bool)> = text
        .char_indices()
        .map(|(at, c)| (at, c.is_alphanumeric()))
        .collect();
    let count = chars.len();
    chars.push((text.len(), false));
    for i in 0..count {
        let mut hash = FNV_OFFSET;
        let mut any_alphanumeric = false;
        for n in 1..=MAX_N.min(count - i) {
            let (from, to) = (chars[i + n - 1].0, chars[i + n].0);
            hash = fnv_extend(hash, &text.as_bytes()[from..to]);
            any_alphanumeric |= chars[i + n - 1].1;
            if any_alphanumeric {
                f(&text[chars[i].0..to], hash);
            }
        }
    }
}

/// Multinomial naive Bayes over n-grams, with add-one smoothing.
///
/// In memory the n-grams are keyed by their 64-bit `stable_hash` and their rows of log
/// likelihoods lie in one table: a lookup hashes a few bytes and compares one integer,
/// which keeps the model cheap enough to consult on every text. (With some ten thousand
/// n-grams, a 64-bit collision is vanishingly unlikely.) On file it is a plain map from
/// n-gram to row, sorted so that retraining gives readable diffs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "NaiveBayesFile", into = "NaiveBayesFile")]
pub struct NaiveBayes {
    pub classes: Vec<String>,
    pub log_priors: Vec<f32>,
    /// Log probability of an n-gram never seen with a class.
    pub log_unseen: Vec<f32>,
    /// The seen n-grams, in table order.
    grams: Vec<String>,
    /// Row of each seen n-gram in `table`, by its hash.
    rows: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    /// Log probability of each seen n-gram per class: `classes.len()` values per row.
    table: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct NaiveBayesFile {
    classes: Vec<String>,
    log_priors: Vec<f32>,
    log_unseen: Vec<f32>,
    /// Log probability of each seen n-gram, per class.
    log_likelihoods: BTreeMap<String, Vec<f32>>,
}

impl From<NaiveBayesFile> for NaiveBayes {
    fn from(file: NaiveBayesFile) -> Self {
        let width = file.classes.len();
        let mut grams = Vec::with_capacity(file.log_likelihoods.len());
        let mut rows = HashMap::default();
        let mut table = Vec::with_capacity(file.log_likelihoods.len() * width);
        for (gram, mut row) in file.log_likelihoods {
            // A malformed row must not shift the others; missing classes get the floor.
            row.resize(width, f32::MIN);
            rows.insert(stable_hash(&gram), grams.len() as u32);
            grams.push(gram);
            table.extend(row);
        }
        Self {
            classes: file.classes,
            log_priors: file.log_priors,
            log_unseen: file.log_unseen,
            grams,
            rows,
            table,
        }
    }
}

impl From<NaiveBayes> for NaiveBayesFile {
    fn from(model: NaiveBayes) -> Self {
        let width = model.classes.len();
        let log_likelihoods = model
            .grams
            .iter()
            .enumerate()
            .map(|(i, gram)| (gram.clone(), model.table[i * width..(i + 1) * width].to_vec()))
            .collect();
        Self {
            classes: model.classes,
            log_priors: model.log_priors,
            log_unseen: model.log_unseen,
            log_likelihoods,
        }
    }
}

/// A model's verdict on a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub class: String,
    /// Posterior probability of `class`, 0..1.
    pub confidence: f32,
    best: usize,
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
            for_each_ngram(text, |gram, _| {
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
        NaiveBayesFile {
            classes,
            log_priors,
            log_unseen,
            log_likelihoods,
        }
        .into()
    }

    /// How many distinct n-grams the model has seen.
    pub fn vocabulary(&self) -> usize {
        self.grams.len()
    }

    /// The log likelihoods of a seen n-gram, one per class.
    fn row(&self, gram_hash: u64) -> Option<&[f32]> {
        self.row_at(*self.rows.get(&gram_hash)?)
    }

    fn row_at(&self, row: u32) -> Option<&[f32]> {
        let (width, row) = (self.classes.len(), row as usize);
        self.table.get(row * width..(row + 1) * width)
    }

    /// The most probable class of a folded text.
    pub fn predict(&self, text: &str) -> Prediction {
        let mut scores: Vec<f32> = self.log_priors.clone();
        // N-grams no class has seen carry no evidence; scoring them with each class's
        // smoothed "unseen" probability would favour the classes with the least text.
        for_each_ngram(text, |_, hash| {
            if let Some(row) = self.row(hash) {
                add(&mut scores, row);
            }
        });
        self.verdict(&scores)
    }

    /// The prediction from summed log scores (priors included).
    fn verdict(&self, scores: &[f32]) -> Prediction {
        let (best, top) =
            scores.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |(bi, bs), (i, s)| if *s > bs { (i, *s) } else { (bi, bs) },
            );
        let normaliser: f32 = scores.iter().map(|s| (s - top).exp()).sum();
        Prediction {
            class: self.classes.get(best).cloned().unwrap_or_default(),
            confidence: 1.0 / normaliser,
            best,
        }
    }

    /// The (up to three) n-grams of `text` that pulled most towards the predicted class,
    /// for the reasons. Apart from `predict` because it is needed only when the model
    /// decides.
    pub fn evidence(&self, text: &str, prediction: &Prediction) -> Vec<String> {
        const SHOWN: usize = 3;
        let best = prediction.best;
        // The strongest few, kept in order as the text is scanned: no list of every n-gram.
        let mut strongest: Vec<(f32, &str)> = Vec::with_capacity(SHOWN + 1);
        for_each_ngram(text, |gram, hash| {
            // Single characters explain little.
            if gram.len() == gram.chars().next().map_or(0, char::len_utf8) {
                return;
            }
            let Some(row) = self.row(hash) else { return };
            let others = row
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != best)
                .map(|(_, l)| *l)
                .fold(f32::MIN, f32::max);
            let pull = row.get(best).map_or(0.0, |l| l - others);
            let weaker = strongest.len() == SHOWN && strongest.last().is_some_and(|(p, _)| pull <= *p);
            if pull <= 0.0 || weaker || strongest.iter().any(|(_, g)| *g == gram) {
                return;
            }
            let at = strongest.partition_point(|(p, _)| *p >= pull);
            strongest.insert(at, (pull, gram));
            strongest.truncate(SHOWN);
        });
        strongest.into_iter().map(|(_, g)| g.to_owned()).collect()
    }
}

fn add(scores: &mut [f32], row: &[f32]) {
    for (score, log) in scores.iter_mut().zip(row) {
        *score += log;
    }
}

/// No row: the n-gram is unknown to that model.
const ABSENT: u32 = u32::MAX;

/// The shipped pair of models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "TextModelsFile")]
pub struct TextModels {
    /// Which examples (count and split) trained them.
    pub trained_on: String,
    pub intent: NaiveBayes,
    pub category: NaiveBayes,
    pub intent_trust: Trust,
    pub category_trust: Trust,
    /// Each n-gram's rows in the intent and the category model, so that one lookup per
    /// n-gram serves both when the engine needs both.
    #[serde(skip_serializing)]
    joint: HashMap<u64, (u32, u32), BuildHasherDefault<Prehashed>>,
}

#[derive(Deserialize)]
struct TextModelsFile {
    trained_on: String,
    intent: NaiveBayes,
    category: NaiveBayes,
    #[serde(default = "cautious")]
    intent_trust: Trust,
    #[serde(default = "cautious")]
    category_trust: Trust,
}

impl From<TextModelsFile> for TextModels {
    fn from(file: TextModelsFile) -> Self {
        let mut joint: HashMap<u64, (u32, u32), BuildHasherDefault<Prehashed>> = HashMap::default();
        for (hash, row) in &file.intent.rows {
            joint.entry(*hash).or_insert((ABSENT, ABSENT)).0 = *row;
        }
        for (hash, row) in &file.category.rows {
            joint.entry(*hash).or_insert((ABSENT, ABSENT)).1 = *row;
        }
        Self {
            trained_on: file.trained_on,
            intent: file.intent,
            category: file.category,
            intent_trust: file.intent_trust,
            category_trust: file.category_trust,
            joint,
        }
    }
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
        TextModelsFile {
            trained_on: format!("{} of {} examples", training.len(), examples.len()),
            intent,
            category,
            intent_trust: Trust::CAUTIOUS,
            category_trust: Trust::CAUTIOUS,
        }
        .into()
    }

    /// Intent and category predictions for a folded text, each only if asked for, in one
    /// pass over its n-grams. Same results as each model's `predict`.
    pub fn predict(
        &self,
        text: &str,
        intent: bool,
        category: bool,
    ) -> (Option<Prediction>, Option<Prediction>) {
        if !intent && !category {
            return (None, None);
        }
        let mut intent_scores = self.intent.log_priors.clone();
        let mut category_scores = self.category.log_priors.clone();
        for_each_ngram(text, |_, hash| {
            let Some((intent_row, category_row)) = self.joint.get(&hash) else {
                return;
            };
            if intent && let Some(row) = self.intent.row_at(*intent_row) {
                add(&mut intent_scores, row);
            }
            if category && let Some(row) = self.category.row_at(*category_row) {
                add(&mut category_scores, row);
            }
        });
        (
            intent.then(|| self.intent.verdict(&intent_scores)),
            category.then(|| self.category.verdict(&category_scores)),
        )
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
        for_each_ngram("断网了", |g, hash| {
            assert_eq!(hash, stable_hash(g));
            grams.push(g.to_owned());
        });
        assert_eq!(grams, vec!["断", "断网", "断网了", "网", "网了", "了"]);
        let mut none = Vec::new();
        for_each_ngram("，！", |g, _| none.push(g.to_owned()));
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
        let evidence = model.evidence("家里断网了", &outage);
        assert!(evidence.iter().any(|g| g.contains("断网")), "{evidence:?}");
        assert!(evidence.len() <= 3);
        assert_eq!(model.predict("又多扣了话费").class, "billing");
    }

    #[test]
    fn one_pass_for_both_models_agrees_with_each_model_alone() {
        let models = TextModels::builtin().expect("shipped model");
        for text in [
            "快递显示已签收，但我根本没收到货",
            "请问怎么查话费",
            "谢谢师傅",
            "lol",
        ] {
            let (intent, category) = models.predict(text, true, true);
            assert_eq!(intent, Some(models.intent.predict(text)), "{text}");
            assert_eq!(category, Some(models.category.predict(text)), "{text}");
            let (no_intent, only_category) = models.predict(text, false, true);
            assert_eq!(no_intent, None);
            assert_eq!(only_category, category);
        }
        assert_eq!(models.predict("断网了", false, false), (None, None));
    }

    #[test]
    fn a_model_survives_its_file_and_old_files_get_cautious_trust() {
        let mut models = TextModels::train(&parse_examples(
            "complaint\toutage\t宽带断网了\ncomplaint\tbilling\t话费多扣了\ninquiry\tbilling\t请问怎么查账单\n",
        )
        .expect("examples"));
        models.category_trust = Trust {
            over_rules: 0.9,
            without_rules: 0.5,
        };
        let json = serde_json::to_string(&models).expect("serialise");
        let back: TextModels = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back.category_trust, models.category_trust);
        for text in ["断网", "多扣话费", "怎么查"] {
            assert_eq!(
                back.predict(text, true, true),
                models.predict(text, true, true),
                "{text}"
            );
        }
        assert_eq!(back.category.vocabulary(), models.category.vocabulary());

        let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
        let fields = old.as_object_mut().expect("object");
        fields.remove("intent_trust");
        fields.remove("category_trust");
        let old: TextModels = serde_json::from_value(old).expect("old file");
        assert_eq!(old.intent_trust, Trust::CAUTIOUS);
        assert!(!old.category_trust.could_decide(true));
        assert!(old.category_trust.model_decides(false, 0.995));
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
