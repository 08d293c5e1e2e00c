//! The linear n-gram model: features, the two learners, prediction and its evidence.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;

use serde::{Deserialize, Serialize};

use super::{FNV_OFFSET, MAX_N, Prehashed, fnv_extend, stable_hash};

/// Calls `f` with every character n-gram (1..=MAX_N) of `text`, as a slice of it with its
/// `stable_hash`, by start position then length, and then with every whole word of a
/// spaced script (see `walk_ngrams`); n-grams that are only whitespace or punctuation are
/// skipped. Hashes grow one character at a time (FNV is sequential), and
/// each character is classified once, because this runs for every text classified.
pub fn for_each_ngram<'t>(text: &'t str, mut f: impl FnMut(&'t str, u64)) {
    walk_ngrams(text, |gram, hash| {
        f(gram, hash);
        true
    });
}

/// As [`for_each_ngram`], but when `f` returns false the longer n-grams at the same start
/// are not visited (a model's vocabulary holds every prefix of its n-grams, so once one is
/// unknown the longer ones are too). Returns how many n-grams `text` has, visited or not,
/// which is what [`Scale`] divides by.
pub fn walk_ngrams<'t>(text: &'t str, mut f: impl FnMut(&'t str, u64) -> bool) -> usize {
    let mut chars: Vec<(usize, WordChar)> = text.char_indices().map(|(at, c)| (at, word_char(c))).collect();
    let count = chars.len();
    chars.push((text.len(), WordChar::None));
    let mut grams = 0;
    for i in 0..count {
        let mut hash = FNV_OFFSET;
        let mut any_alphanumeric = false;
        let longest = MAX_N.min(count - i);
        for n in 1..=longest {
            let (from, to) = (chars[i + n - 1].0, chars[i + n].0);
            hash = fnv_extend(hash, &text.as_bytes()[from..to]);
            any_alphanumeric |= chars[i + n - 1].1 != WordChar::None;
            if any_alphanumeric {
                grams += 1;
                if !f(&text[chars[i].0..to], hash) {
                    // Every longer n-gram here is counted too: they all hold this one's
                    // letter or digit.
                    grams += longest - n;
                    break;
                }
            }
        }
    }
    // Whole words of scripts written with spaces (and runs of digits, such as 12315):
    // character pairs say little about "refund" or "lawyer". A word longer than MAX_N
    // characters cannot be mistaken for a character n-gram, so it is its own key.
    let mut start = 0;
    while start < count {
        if chars[start].1 != WordChar::Spaced {
            start += 1;
            continue;
        }
        let end = (start..count)
            .find(|&j| chars[j].1 != WordChar::Spaced)
            .unwrap_or(count);
        if (MAX_N + 1..=MAX_WORD).contains(&(end - start)) {
            let word = &text[chars[start].0..chars[end].0];
            grams += 1;
            f(word, stable_hash(word));
        }
        start = end;
    }
    grams
}

/// Longest word taken whole, in characters: longer runs are identifiers and numbers that
/// would each be seen once.
const MAX_WORD: usize = 16;

/// What a character is to the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WordChar {
    /// Whitespace or punctuation.
    None,
    /// A CJK ideograph: its own word, as far as the features go.
    Ideograph,
    /// A letter or digit of a script written with spaces between words.
    Spaced,
}

/// The common CJK ideographs are answered without a table lookup.
fn word_char(c: char) -> WordChar {
    if matches!(c, '\u{4E00}'..='\u{9FFF}') {
        WordChar::Ideograph
    } else if c.is_alphanumeric() {
        // Other ideographs, kana and hangul are rare here; they count as spaced letters.
        WordChar::Spaced
    } else {
        WordChar::None
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
    pub(super) rows: HashMap<u64, u32, BuildHasherDefault<Prehashed>>,
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
    /// The class with the next highest score (`best` if there is only one).
    runner_up: usize,
    /// Every class's posterior probability, in the model's order of classes.
    probabilities: Vec<f32>,
}

impl Prediction {
    /// The posterior probability of the class at `index` (0 for no such class).
    pub fn probability(&self, index: usize) -> f32 {
        self.probabilities.get(index).copied().unwrap_or(0.0)
    }

    /// The likeliest class other than the one at `except`, with its index.
    pub fn likeliest_except(&self, except: usize) -> Option<usize> {
        (0..self.probabilities.len())
            .filter(|i| *i != except)
            .max_by(|a, b| self.probabilities[*a].total_cmp(&self.probabilities[*b]))
    }

    /// This prediction as a choice of the class at `class` over the one at `against`, for
    /// the evidence of a class that need not be the likeliest.
    pub fn as_choice(&self, class: usize, against: usize) -> Prediction {
        Prediction {
            best: class,
            runner_up: against,
            ..self.clone()
        }
    }
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

    /// The classes, in the order of a prediction's probabilities.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The index of `class` among the model's classes.
    pub fn class_index(&self, class: &str) -> Option<usize> {
        self.classes.iter().position(|c| c == class)
    }

    /// How many distinct n-grams the model has seen.
    pub fn vocabulary(&self) -> usize {
        self.grams.len()
    }

    /// The n-grams the model has seen.
    pub fn grams(&self) -> &[String] {
        &self.grams
    }

    /// The log likelihoods of a seen n-gram, one per class.
    pub(super) fn row(&self, gram_hash: u64) -> Option<&[f32]> {
        self.row_at(*self.rows.get(&gram_hash)?)
    }

    pub(super) fn row_at(&self, row: u32) -> Option<&[f32]> {
        let (width, row) = (self.classes.len(), row as usize);
        self.table.get(row * width..(row + 1) * width)
    }

    /// The most probable class of a folded text.
    pub fn predict(&self, text: &str) -> Prediction {
        let mut sums = vec![0.0; self.classes.len()];
        // N-grams no class has seen carry no evidence; scoring them with each class's
        // smoothed "unseen" probability would favour the classes with the least text.
        let grams = walk_ngrams(text, |_, hash| {
            let row = self.row(hash);
            if let Some(row) = row {
                add_scaled(&mut sums, row, 1.0);
            }
            row.is_some()
        });
        self.verdict(sums, grams)
    }

    /// The prediction from the summed rows of a text's `grams` n-grams.
    pub(super) fn verdict(&self, mut scores: Vec<f32>, grams: usize) -> Prediction {
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
        let runner_up = (0..scores.len())
            .filter(|i| *i != best)
            .max_by(|a, b| scores[*a].total_cmp(&scores[*b]))
            .unwrap_or(best);
        let probabilities = scores.iter().map(|s| (s - top).exp() / normaliser).collect();
        Prediction {
            class: self.classes.get(best).cloned().unwrap_or_default(),
            confidence: 1.0 / normaliser,
            best,
            runner_up,
            probabilities,
        }
    }

    /// The (up to three) n-grams of `text` that pulled most towards the predicted class,
    /// for the reasons. Apart from `predict` because it is needed only when the model
    /// decides.
    pub fn evidence(&self, text: &str, prediction: &Prediction) -> Vec<String> {
        let mut seen = Vec::new();
        for_each_ngram(text, |gram, hash| {
            if let Some(row) = self.row(hash)
                && !is_one_char(gram)
            {
                seen.push((gram, row));
            }
        });
        self.strongest(seen.into_iter(), prediction)
    }

    /// The (up to three) n-grams among `seen`, each with its row, that pulled most towards
    /// the predicted class.
    pub(super) fn strongest<'t>(
        &self,
        seen: impl Iterator<Item = (&'t str, &'t [f32])>,
        prediction: &Prediction,
    ) -> Vec<String> {
        const SHOWN: usize = 3;
        let best = prediction.best;
        // The strongest few, kept in order: no list of every n-gram.
        let mut strongest: Vec<(f32, &str)> = Vec::with_capacity(SHOWN + 1);
        for (gram, row) in seen {
            // The pull cannot exceed the lead over the runner-up: most n-grams are ruled
            // out by that before their whole row is read.
            let floor = if strongest.len() == SHOWN {
                strongest.last().map_or(0.0, |(p, _)| *p).max(0.0)
            } else {
                0.0
            };
            let lead = match (row.get(best), row.get(prediction.runner_up)) {
                (Some(b), Some(r)) if prediction.runner_up != best => b - r,
                _ => f32::INFINITY,
            };
            if lead <= floor {
                continue;
            }
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
pub(super) fn is_one_char(gram: &str) -> bool {
    gram.len() == gram.chars().next().map_or(0, char::len_utf8)
}

pub(super) fn add_scaled(scores: &mut [f32], row: &[f32], factor: f32) {
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
