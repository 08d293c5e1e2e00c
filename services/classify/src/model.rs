//! A statistical text model beside the keyword rules: a linear model over character
//! n-grams (1..=3) of folded text (Traditional→Simplified, lower case), fitted by
//! multinomial logistic regression or naive Bayes, one model for intent and one for
//! category. Character n-grams need no word segmentation and carry over
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

/// Parses the labelled examples (`#` lines are comments). Texts are normalised as ingest
/// normalises every contact (NFKC: full-width punctuation and digits become ASCII), so the
/// models learn from what they will be shown.
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
                    text: closedloop_runtime::text::normalise(text),
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

fn never() -> f32 {
    NEVER
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

/// How a model weighs a text's n-grams before adding their rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Each occurrence adds its row (naive Bayes: the rows are log likelihoods).
    #[default]
    Counts,
    /// The sum is divided by the square root of the text's n-gram count, so a long
    /// transcript is not more certain than a short post for its length alone (logistic
    /// regression trains on the same features).
    SqrtLength,
}

impl Scale {
    fn factor(self, grams: usize) -> f32 {
        match self {
            Scale::Counts => 1.0,
            Scale::SqrtLength => 1.0 / (grams.max(1) as f32).sqrt(),
        }
    }
}

/// Which learner fits a model's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Learner {
    /// Multinomial naive Bayes with add-one smoothing.
    Bayes,
    /// Multinomial logistic regression (softmax), L2-regularised, fitted by AdaGrad.
    Logistic,
}

/// A linear model over character n-grams: a text's score for a class is the class's bias
/// plus the rows of its n-grams, scaled by [`Scale`]; a softmax turns scores into
/// confidences. [`Learner`] decides what the rows are.
///
/// In memory the n-grams are keyed by their 64-bit `stable_hash` and their rows lie in one
/// table: a lookup hashes a few bytes and compares one integer, which keeps the model cheap
/// enough to consult on every text. (With some ten thousand n-grams, a 64-bit collision is
/// vanishingly unlikely.) On file it is a plain map from n-gram to row, sorted so that
/// retraining gives readable diffs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "NgramModelFile", into = "NgramModelFile")]
pub struct NgramModel {
    pub classes: Vec<String>,
    pub bias: Vec<f32>,
    pub scale: Scale,
    /// The seen n-grams, in table order.
    grams: Vec<String>,
    /// Row of each seen n-gram in `table`, by its hash.
    rows: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
    /// The weight of each seen n-gram per class: `classes.len()` values per row.
    table: Vec<f32>,
}

#[derive(Serialize, Deserialize)]
struct NgramModelFile {
    classes: Vec<String>,
    #[serde(alias = "log_priors")]
    bias: Vec<f32>,
    #[serde(default)]
    scale: Scale,
    /// The weight of each seen n-gram, per class.
    #[serde(alias = "log_likelihoods")]
    weights: BTreeMap<String, Vec<f32>>,
}

impl From<NgramModelFile> for NgramModel {
    fn from(file: NgramModelFile) -> Self {
        let width = file.classes.len();
        let mut grams = Vec::with_capacity(file.weights.len());
        let mut rows = HashMap::default();
        let mut table = Vec::with_capacity(file.weights.len() * width);
        for (gram, mut row) in file.weights {
            // A malformed row must not shift the others; missing classes get nothing.
            row.resize(width, 0.0);
            rows.insert(stable_hash(&gram), grams.len() as u32);
            grams.push(gram);
            table.extend(row);
        }
        Self {
            classes: file.classes,
            bias: file.bias,
            scale: file.scale,
            grams,
            rows,
            table,
        }
    }
}

impl From<NgramModel> for NgramModelFile {
    fn from(model: NgramModel) -> Self {
        let width = model.classes.len();
        let weights = model
            .grams
            .iter()
            .enumerate()
            .map(|(i, gram)| (gram.clone(), model.table[i * width..(i + 1) * width].to_vec()))
            .collect();
        Self {
            classes: model.classes,
            bias: model.bias,
            scale: model.scale,
            weights,
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

/// The classes of `labels` in order of first appearance, and each label's index.
fn index_classes<'a>(labels: impl IntoIterator<Item = &'a str>) -> (Vec<String>, Vec<usize>) {
    let mut classes: Vec<String> = Vec::new();
    let indexes = labels
        .into_iter()
        .map(|label| {
            classes.iter().position(|c| c == label).unwrap_or_else(|| {
                classes.push(label.to_owned());
                classes.len() - 1
            })
        })
        .collect();
    (classes, indexes)
}

impl NgramModel {
    /// Trains on (text, label) pairs with `learner`; texts must already be folded.
    pub fn train<'a>(learner: Learner, examples: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let (texts, labels): (Vec<&str>, Vec<&str>) = examples.into_iter().unzip();
        let (classes, targets) = index_classes(labels);
        match learner {
            Learner::Bayes => Self::naive_bayes(&texts, classes, &targets),
            Learner::Logistic => Self::logistic(&texts, classes, &targets),
        }
    }

    fn naive_bayes(texts: &[&str], classes: Vec<String>, targets: &[usize]) -> Self {
        let width = classes.len();
        let mut documents = vec![0.0f64; width];
        let mut counts: HashMap<String, Vec<f64>> = HashMap::new();
        let mut totals = vec![0.0f64; width];
        for (text, class) in texts.iter().zip(targets) {
            documents[*class] += 1.0;
            for_each_ngram(text, |gram, _| {
                let row = counts.entry(gram.to_owned()).or_insert_with(|| vec![0.0; width]);
                row[*class] += 1.0;
                totals[*class] += 1.0;
            });
        }
        let vocabulary = counts.len() as f64;
        let all_documents: f64 = documents.iter().sum();
        let bias = documents
            .iter()
            .map(|d| (d / all_documents.max(1.0)).ln() as f32)
            .collect();
        let weights = counts
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
        NgramModelFile {
            classes,
            bias,
            scale: Scale::Counts,
            weights,
        }
        .into()
    }

    /// Softmax regression on the features `predict` reads (n-gram counts over the square
    /// root of the text's n-gram count). AdaGrad over the examples in a fixed shuffled
    /// order, so training is deterministic; the L2 penalty is applied to the weights an
    /// example touches, as is usual for sparse features.
    fn logistic(texts: &[&str], classes: Vec<String>, targets: &[usize]) -> Self {
        const EPOCHS: usize = 40;
        const RATE: f32 = 0.5;
        const L2: f32 = 1e-4;
        let width = classes.len();
        let mut vocabulary: HashMap<String, usize> = HashMap::new();
        let features: Vec<Vec<(usize, f32)>> = texts
            .iter()
            .map(|text| {
                let mut counts: HashMap<usize, f32> = HashMap::new();
                let mut grams = 0;
                for_each_ngram(text, |gram, _| {
                    let next = vocabulary.len();
                    let id = *vocabulary.entry(gram.to_owned()).or_insert(next);
                    *counts.entry(id).or_default() += 1.0;
                    grams += 1;
                });
                let factor = Scale::SqrtLength.factor(grams);
                let mut row: Vec<(usize, f32)> = counts.into_iter().map(|(id, c)| (id, c * factor)).collect();
                row.sort_unstable_by_key(|(id, _)| *id);
                row
            })
            .collect();
        let mut weights = vec![0.0f32; vocabulary.len() * width];
        let mut weight_steps = vec![1e-8f32; vocabulary.len() * width];
        let mut bias = vec![0.0f32; width];
        let mut bias_steps = vec![1e-8f32; width];
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|i| stable_hash(texts[*i]));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut scores = vec![0.0f32; width];
        for _ in 0..EPOCHS {
            // Fisher–Yates with a fixed xorshift stream.
            for i in (1..order.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                order.swap(i, (seed % (i as u64 + 1)) as usize);
            }
            for &example in &order {
                scores.copy_from_slice(&bias);
                for (id, x) in &features[example] {
                    add_scaled(&mut scores, &weights[id * width..(id + 1) * width], *x);
                }
                softmax(&mut scores);
                // The gradient of the loss by each class's score: p - 1 for the truth.
                scores[targets[example]] -= 1.0;
                for ((b, step), g) in bias.iter_mut().zip(&mut bias_steps).zip(&scores) {
                    *step += g * g;
                    *b -= RATE * g / step.sqrt();
                }
                for (id, x) in &features[example] {
                    let span = id * width..(id + 1) * width;
                    for ((w, step), g) in weights[span.clone()]
                        .iter_mut()
                        .zip(&mut weight_steps[span])
                        .zip(&scores)
                    {
                        let g = g * x + L2 * *w;
                        *step += g * g;
                        *w -= RATE * g / step.sqrt();
                    }
                }
            }
        }
        let mut by_id: Vec<(String, usize)> = vocabulary.into_iter().collect();
        by_id.sort_unstable_by_key(|(_, id)| *id);
        NgramModelFile {
            classes,
            bias,
            scale: Scale::SqrtLength,
            weights: by_id
                .into_iter()
                .map(|(gram, id)| (gram, weights[id * width..(id + 1) * width].to_vec()))
                .collect(),
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
        let mut sums = vec![0.0; self.classes.len()];
        let mut grams = 0;
        // N-grams no class has seen carry no evidence; scoring them with each class's
        // smoothed "unseen" probability would favour the classes with the least text.
        for_each_ngram(text, |_, hash| {
            grams += 1;
            if let Some(row) = self.row(hash) {
                add_scaled(&mut sums, row, 1.0);
            }
        });
        self.verdict(sums, grams)
    }

    /// The prediction from the summed rows of a text's `grams` n-grams.
    fn verdict(&self, mut scores: Vec<f32>, grams: usize) -> Prediction {
        let factor = self.scale.factor(grams);
        for (score, bias) in scores.iter_mut().zip(&self.bias) {
            *score = bias + *score * factor;
        }
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
        let mut seen = Vec::new();
        for_each_ngram(text, |gram, hash| {
            if let Some(row) = self.rows.get(&hash)
                && !is_one_char(gram)
            {
                seen.push((gram, *row));
            }
        });
        self.strongest(seen.into_iter(), prediction)
    }

    /// The (up to three) n-grams among `seen`, each with its row, that pulled most towards
    /// the predicted class.
    fn strongest<'t>(
        &self,
        seen: impl Iterator<Item = (&'t str, u32)>,
        prediction: &Prediction,
    ) -> Vec<String> {
        const SHOWN: usize = 3;
        let best = prediction.best;
        // The strongest few, kept in order: no list of every n-gram.
        let mut strongest: Vec<(f32, &str)> = Vec::with_capacity(SHOWN + 1);
        for (gram, row) in seen {
            let Some(row) = self.row_at(row) else { continue };
            let others = row
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != best)
                .map(|(_, l)| *l)
                .fold(f32::MIN, f32::max);
            let pull = row.get(best).map_or(0.0, |l| l - others);
            let weaker = strongest.len() == SHOWN && strongest.last().is_some_and(|(p, _)| pull <= *p);
            if pull <= 0.0 || weaker || strongest.iter().any(|(_, g)| *g == gram) {
                continue;
            }
            let at = strongest.partition_point(|(p, _)| *p >= pull);
            strongest.insert(at, (pull, gram));
            strongest.truncate(SHOWN);
        }
        strongest.into_iter().map(|(_, g)| g.to_owned()).collect()
    }
}

/// Single characters explain little, so evidence leaves them out.
fn is_one_char(gram: &str) -> bool {
    gram.len() == gram.chars().next().map_or(0, char::len_utf8)
}

fn add_scaled(scores: &mut [f32], row: &[f32], factor: f32) {
    for (score, weight) in scores.iter_mut().zip(row) {
        *score += weight * factor;
    }
}

/// Scores to probabilities, in place.
fn softmax(scores: &mut [f32]) {
    let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for score in scores.iter_mut() {
        *score = (*score - top).exp();
        total += *score;
    }
    for score in scores.iter_mut() {
        *score /= total;
    }
}

/// No row: the n-gram is unknown to that model.
const ABSENT: u32 = u32::MAX;

/// One pass of the models over a text: their predictions, and the text's known n-grams of
/// more than one character with their rows in the intent, category and risk models.
#[derive(Debug, Default)]
pub struct Scan<'t> {
    pub intent: Option<Prediction>,
    pub category: Option<Prediction>,
    pub risk: Option<Prediction>,
    seen: Vec<(&'t str, [u32; 3])>,
}

impl<'t> Scan<'t> {
    /// The seen n-grams that model `at` (0 intent, 1 category, 2 risk) knows, with its rows.
    fn rows(&self, at: usize) -> impl Iterator<Item = (&'t str, u32)> + '_ {
        self.seen
            .iter()
            .filter(move |(_, rows)| rows[at] != ABSENT)
            .map(move |(gram, rows)| (*gram, rows[at]))
    }
}

/// How many times a correction counts in training: an agent's label outweighs a line of
/// the shipped corpus.
pub const CORRECTION_WEIGHT: usize = 3;

/// The intent and category agents gave a text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corrected {
    pub intent: String,
    pub category: String,
}

/// The shipped pair of models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "TextModelsFile")]
pub struct TextModels {
    /// Which examples (count and split) trained them.
    pub trained_on: String,
    pub intent: NgramModel,
    pub category: NgramModel,
    pub intent_trust: Trust,
    pub category_trust: Trust,
    /// Agents' corrections by folded (masked) text: the same text gets the same labels
    /// again, whatever the models say.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub corrected: BTreeMap<String, Corrected>,
    /// Escalation risk ("risk" or "none") where the rules' word lists found none, trained
    /// on `data/risk.tsv`; it flags a text when it is at least `risk_bar` sure.
    #[serde(default)]
    pub risk: Option<NgramModel>,
    #[serde(default = "never")]
    pub risk_bar: f32,
    /// Each n-gram's rows in the intent and the category model, so that one lookup per
    /// n-gram serves both when the engine needs both.
    #[serde(skip_serializing)]
    joint: HashMap<u64, [u32; 3], BuildHasherDefault<Prehashed>>,
}

#[derive(Deserialize)]
struct TextModelsFile {
    trained_on: String,
    intent: NgramModel,
    category: NgramModel,
    #[serde(default = "cautious")]
    intent_trust: Trust,
    #[serde(default = "cautious")]
    category_trust: Trust,
    #[serde(default)]
    corrected: BTreeMap<String, Corrected>,
    #[serde(default)]
    risk: Option<NgramModel>,
    #[serde(default = "never")]
    risk_bar: f32,
}

impl From<TextModelsFile> for TextModels {
    fn from(file: TextModelsFile) -> Self {
        let mut models = Self {
            trained_on: file.trained_on,
            intent: file.intent,
            category: file.category,
            intent_trust: file.intent_trust,
            category_trust: file.category_trust,
            corrected: file.corrected,
            risk: file.risk,
            risk_bar: file.risk_bar,
            joint: HashMap::default(),
        };
        models.index();
        models
    }
}

impl TextModels {
    /// Trains both models with `learner` on the training part of `examples` (never the
    /// held-out part).
    pub fn train(learner: Learner, examples: &[Example]) -> Self {
        Self::train_with_corrections(learner, examples, &[])
    }

    /// As [`TextModels::train`], with agents' `corrections` too: each trains
    /// [`CORRECTION_WEIGHT`] times (none is held out: they are not the shipped corpus), and
    /// each text's last correction is kept as its labels.
    pub fn train_with_corrections(learner: Learner, examples: &[Example], corrections: &[Example]) -> Self {
        let weighted = corrections
            .iter()
            .flat_map(|e| std::iter::repeat_n(e, CORRECTION_WEIGHT));
        let training: Vec<(String, &Example)> = examples
            .iter()
            .filter(|e| !is_held_out(&e.text))
            .chain(weighted)
            .map(|e| (crate::rules::fold(&e.text), e))
            .collect();
        let corrected = corrections
            .iter()
            .map(|e| {
                let labels = Corrected {
                    intent: e.intent.clone(),
                    category: e.category.clone(),
                };
                (crate::rules::fold(&e.text), labels)
            })
            .collect();
        let intent = NgramModel::train(
            learner,
            training.iter().map(|(t, e)| (t.as_str(), e.intent.as_str())),
        );
        // Category only where it means something: complaints and inquiries.
        let category = NgramModel::train(
            learner,
            training
                .iter()
                .filter(|(_, e)| e.intent == "complaint" || e.intent == "inquiry")
                .map(|(t, e)| (t.as_str(), e.category.as_str())),
        );
        let trained_on = if corrections.is_empty() {
            format!("{} of {} examples", training.len(), examples.len())
        } else {
            format!(
                "{} of {} examples and {} corrections",
                training.len() - corrections.len() * CORRECTION_WEIGHT,
                examples.len(),
                corrections.len()
            )
        };
        TextModelsFile {
            trained_on,
            intent,
            category,
            intent_trust: Trust::CAUTIOUS,
            category_trust: Trust::CAUTIOUS,
            corrected,
            risk: None,
            risk_bar: NEVER,
        }
        .into()
    }

    /// Each n-gram's rows in the intent, category and risk models, for one lookup per
    /// n-gram.
    fn index(&mut self) {
        let mut joint: HashMap<u64, [u32; 3], BuildHasherDefault<Prehashed>> = HashMap::default();
        let models = [Some(&self.intent), Some(&self.category), self.risk.as_ref()];
        for (at, model) in models.into_iter().enumerate() {
            for (hash, row) in model.into_iter().flat_map(|m| &m.rows) {
                joint.entry(*hash).or_insert([ABSENT; 3])[at] = *row;
            }
        }
        self.joint = joint;
    }

    /// Intent and category predictions for a folded text, each only if asked for, in one
    /// pass over its n-grams. Same results as each model's `predict`.
    pub fn predict(
        &self,
        text: &str,
        intent: bool,
        category: bool,
    ) -> (Option<Prediction>, Option<Prediction>) {
        let scan = self.scan(text, intent, category, false);
        (scan.intent, scan.category)
    }

    /// As [`TextModels::predict`], with the risk model's verdict too when asked for (and
    /// there is one that can flag), keeping the known n-grams of the text with their rows so
    /// that the evidence for a prediction needs no second pass over the text.
    pub fn scan<'t>(&self, text: &'t str, intent: bool, category: bool, risk: bool) -> Scan<'t> {
        let risk_model = self.risk.as_ref().filter(|_| risk && self.risk_bar <= 1.0);
        if !intent && !category && risk_model.is_none() {
            return Scan::default();
        }
        let mut intent_sums = vec![0.0; self.intent.classes.len()];
        let mut category_sums = vec![0.0; self.category.classes.len()];
        let mut risk_sums = vec![0.0; risk_model.map_or(0, |m| m.classes.len())];
        let mut grams = 0;
        let mut seen = Vec::new();
        for_each_ngram(text, |gram, hash| {
            grams += 1;
            let Some(&rows) = self.joint.get(&hash) else {
                return;
            };
            if intent && let Some(row) = self.intent.row_at(rows[0]) {
                add_scaled(&mut intent_sums, row, 1.0);
            }
            if category && let Some(row) = self.category.row_at(rows[1]) {
                add_scaled(&mut category_sums, row, 1.0);
            }
            if let Some(row) = risk_model.and_then(|m| m.row_at(rows[2])) {
                add_scaled(&mut risk_sums, row, 1.0);
            }
            if !is_one_char(gram) {
                seen.push((gram, rows));
            }
        });
        Scan {
            intent: intent.then(|| self.intent.verdict(intent_sums, grams)),
            category: category.then(|| self.category.verdict(category_sums, grams)),
            risk: risk_model.map(|m| m.verdict(risk_sums, grams)),
            seen,
        }
    }

    /// The n-grams that weighed most for the intent `scan` predicted.
    pub fn intent_evidence(&self, scan: &Scan<'_>, prediction: &Prediction) -> Vec<String> {
        self.intent.strongest(scan.rows(0), prediction)
    }

    /// The n-grams that weighed most for the category `scan` predicted.
    pub fn category_evidence(&self, scan: &Scan<'_>, prediction: &Prediction) -> Vec<String> {
        self.category.strongest(scan.rows(1), prediction)
    }

    /// The n-grams that weighed most for the risk `scan` found.
    pub fn risk_evidence(&self, scan: &Scan<'_>, prediction: &Prediction) -> Vec<String> {
        self.risk
            .as_ref()
            .map(|m| m.strongest(scan.rows(2), prediction))
            .unwrap_or_default()
    }

    /// Adds the escalation-risk model, trained with `learner` on the training part of
    /// `examples` (labels "risk" and "none"); `bar` is where it flags (see
    /// `calibrate::risk_bar`).
    pub fn with_risk(mut self, learner: Learner, examples: &[Example], bar: f32) -> Self {
        let training: Vec<(String, &str)> = examples
            .iter()
            .filter(|e| !is_held_out(&e.text))
            .map(|e| (crate::rules::fold(&e.text), e.intent.as_str()))
            .collect();
        self.risk = Some(NgramModel::train(
            learner,
            training.iter().map(|(t, l)| (t.as_str(), *l)),
        ));
        self.risk_bar = bar;
        self.index();
        self
    }

    /// Whether a risk verdict flags the text.
    pub fn flags_risk(&self, prediction: &Prediction) -> bool {
        prediction.class == "risk" && prediction.confidence >= self.risk_bar
    }

    /// The labels agents gave `masked_text` (as classify masks a text), if they corrected it.
    pub fn corrected(&self, masked_text: &str) -> Option<&Corrected> {
        if self.corrected.is_empty() {
            return None;
        }
        self.corrected.get(&crate::rules::fold(masked_text))
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

/// The models classify runs with, from the shipped file or `file`, replaced whole when the
/// file is read again (on SIGHUP): a classification in progress keeps the models it began
/// with.
#[derive(Debug, Clone)]
pub struct SharedModels {
    current: std::sync::Arc<std::sync::RwLock<std::sync::Arc<TextModels>>>,
    file: Option<String>,
}

impl SharedModels {
    pub fn load(file: Option<String>) -> Result<Self, ModelError> {
        let models = TextModels::load(file.as_deref())?;
        Ok(Self {
            current: std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(models))),
            file,
        })
    }

    pub fn current(&self) -> std::sync::Arc<TextModels> {
        // A poisoned lock still holds whole models: replacing them is one assignment.
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the file again; if it cannot be read or parsed, the models in use stay and the
    /// error says why. Returns what the new models were trained on.
    pub fn reload(&self) -> Result<String, ModelError> {
        let models = TextModels::load(self.file.as_deref())?;
        let trained_on = models.trained_on.clone();
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = std::sync::Arc::new(models);
        Ok(trained_on)
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
    fn both_learners_learn_from_examples_and_explain() {
        for learner in [Learner::Bayes, Learner::Logistic] {
            let model = NgramModel::train(
                learner,
                [
                    ("宽带断网了", "outage"),
                    ("又停电了", "outage"),
                    ("断网一整天", "outage"),
                    ("话费多扣了", "billing"),
                    ("账单不对多扣钱", "billing"),
                ],
            );
            let outage = model.predict("家里断网了");
            assert_eq!(outage.class, "outage", "{learner:?}");
            assert!(outage.confidence > 0.5 && outage.confidence <= 1.0, "{learner:?}");
            let evidence = model.evidence("家里断网了", &outage);
            assert!(
                evidence.iter().any(|g| g.contains("断网")),
                "{learner:?}: {evidence:?}"
            );
            assert!(evidence.len() <= 3);
            assert_eq!(model.predict("又多扣了话费").class, "billing", "{learner:?}");
        }
    }

    #[test]
    fn logistic_confidence_does_not_grow_with_length_alone() {
        let model = NgramModel::train(
            Learner::Logistic,
            [("宽带断网了", "outage"), ("话费多扣了", "billing")],
        );
        let short = model.predict("断网了").confidence;
        let long = model.predict(&"断网了".repeat(20)).confidence;
        assert!((short - long).abs() < 0.05, "{short} vs {long}");
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
        let mut models = TextModels::train(Learner::Logistic, &parse_examples(
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
    fn a_reload_replaces_the_models_and_a_bad_file_keeps_them() {
        let dir = tempfile::tempdir().expect("scratch");
        let path = dir.path().join("model.json");
        let train = |text: &str| {
            let tsv = format!("complaint\toutage\t{text}\ninquiry\tbilling\t请问怎么查账单\n");
            TextModels::train(Learner::Logistic, &parse_examples(&tsv).expect("examples"))
        };
        std::fs::write(&path, serde_json::to_string(&train("宽带断网了")).expect("json")).expect("write");
        let shared = SharedModels::load(Some(path.display().to_string())).expect("load");
        let first = shared.current();
        std::fs::write(&path, serde_json::to_string(&train("又停电了")).expect("json")).expect("write");
        shared.reload().expect("reload");
        assert_ne!(shared.current().intent.vocabulary(), first.intent.vocabulary());
        let second = shared.current();
        std::fs::write(&path, "not json").expect("write");
        assert!(shared.reload().is_err());
        assert_eq!(shared.current().intent.vocabulary(), second.intent.vocabulary());
    }

    #[test]
    fn the_split_is_stable_and_about_a_fifth() {
        assert_eq!(is_held_out("宽带断网了"), is_held_out("宽带断网了"));
        let held = (0..1000).filter(|i| is_held_out(&format!("example {i}"))).count();
        assert!((150..250).contains(&held), "{held}");
    }

    #[test]
    fn examples_parse_and_reject_malformed_lines() {
        let examples = parse_examples("# comment\ncomplaint\toutage\t断网了？ \n\n").expect("valid");
        assert_eq!(examples.len(), 1);
        assert_eq!(examples[0].text, "断网了?", "normalised as ingest normalises");
        assert!(matches!(
            parse_examples("complaint\toutage"),
            Err(ModelError::Malformed { line: 1 })
        ));
    }
}
