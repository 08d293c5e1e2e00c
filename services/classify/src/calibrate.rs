//! Chooses how far the engine trusts each model over the keyword rules (`Trust`) by k-fold
//! cross-validation on the training examples alone, so the held-out part stays unseen
//! until `classify-eval`. The search itself is a plain function over recorded verdicts.

use closedloop_proto::v1::Channel;

use crate::engine::{self, Contact, rule_signals};
use crate::model::{Example, Learner, NEVER, TextModels, Trust, is_held_out, stable_hash};
use crate::rules::{Rules, fold};

/// Folds of the cross-validation.
pub const FOLDS: u64 = 5;

/// The bars tried, from "the model always decides" to "never".
const BARS: [f32; 11] = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999, NEVER];

/// One example's verdicts, from the rules and from a model that never saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdicts {
    pub truth: String,
    pub by_rules: String,
    pub rules_found: bool,
    pub by_model: String,
    pub confidence: f32,
}

impl Verdicts {
    fn decided(&self, trust: Trust) -> &str {
        if trust.model_decides(self.rules_found, self.confidence) {
            &self.by_model
        } else {
            &self.by_rules
        }
    }
}

/// The trust that gets the most verdicts right, and its accuracy. Ties go to the higher
/// bars: where the model adds nothing, the rules' reasons are easier to read.
pub fn best_trust(verdicts: &[Verdicts]) -> (Trust, f64) {
    let right = |trust: Trust| verdicts.iter().filter(|v| v.decided(trust) == v.truth).count();
    let rules_only = Trust {
        over_rules: NEVER,
        without_rules: NEVER,
    };
    let (mut best, mut best_right) = (rules_only, right(rules_only));
    // From the highest bars down, so a lower bar wins only by getting more right.
    for over_rules in BARS.iter().rev() {
        for without_rules in BARS.iter().rev() {
            let trust = Trust {
                over_rules: *over_rules,
                without_rules: *without_rules,
            };
            let right = right(trust);
            if right > best_right {
                (best, best_right) = (trust, right);
            }
        }
    }
    (best, best_right as f64 / verdicts.len().max(1) as f64)
}

/// What cross-validation found: the chosen trust per model, and the accuracy of the rules
/// alone and of the engine with that trust, over all folds.
#[derive(Debug, Clone)]
pub struct CrossValidation {
    pub intent: Trust,
    pub intent_accuracy: f64,
    pub rules_intent_accuracy: f64,
    pub category: Trust,
    pub category_accuracy: f64,
    pub rules_category_accuracy: f64,
    pub examples: usize,
}

fn rules_accuracy(verdicts: &[Verdicts]) -> f64 {
    let right = verdicts.iter().filter(|v| v.by_rules == v.truth).count();
    right as f64 / verdicts.len().max(1) as f64
}

/// Cross-validates on the training part of `examples` (the held-out part is skipped).
pub fn cross_validate(examples: &[Example], rules: &Rules, learner: Learner) -> CrossValidation {
    let training: Vec<&Example> = examples.iter().filter(|e| !is_held_out(&e.text)).collect();
    // The held-out split took hash % 5 == 0; the folds use the next digit of the hash.
    let fold_of = |e: &Example| (stable_hash(&e.text) / 5) % FOLDS;
    let mut intents = Vec::new();
    let mut categories = Vec::new();
    for part in 0..FOLDS {
        let train: Vec<Example> = training
            .iter()
            .filter(|e| fold_of(e) != part)
            .map(|e| (*e).clone())
            .collect();
        let models = TextModels::train(learner, &train);
        for example in training.iter().filter(|e| fold_of(e) == part) {
            let folded = fold(&example.text);
            let signals = rule_signals(rules, &example.text);
            let by_rules = engine::classify(
                rules,
                None,
                &Contact {
                    text: &example.text,
                    channel: Channel::Wechat,
                    poster: None,
                    region_hint: "",
                },
            );
            let intent = models.intent.predict(&folded);
            intents.push(Verdicts {
                truth: example.intent.clone(),
                by_rules: by_rules.intent().label(),
                rules_found: signals.intent_signal,
                by_model: intent.class,
                confidence: intent.confidence,
            });
            if example.intent == "complaint" || example.intent == "inquiry" {
                let category = models.category.predict(&folded);
                categories.push(Verdicts {
                    truth: example.category.clone(),
                    by_rules: by_rules.category.clone(),
                    rules_found: signals.category_found,
                    by_model: category.class,
                    confidence: category.confidence,
                });
            }
        }
    }
    let (intent, intent_accuracy) = best_trust(&intents);
    let (category, category_accuracy) = best_trust(&categories);
    CrossValidation {
        intent,
        intent_accuracy,
        rules_intent_accuracy: rules_accuracy(&intents),
        category,
        category_accuracy,
        rules_category_accuracy: rules_accuracy(&categories),
        examples: training.len(),
    }
}

/// The engine's accuracy with `models` on the held-out part of `examples`: intent, and
/// category over the complaints and inquiries.
pub fn held_out_accuracy(examples: &[Example], rules: &Rules, models: &TextModels) -> (f64, f64) {
    let (mut intents, mut intents_right, mut categories, mut categories_right) = (0, 0, 0, 0);
    for example in examples.iter().filter(|e| is_held_out(&e.text)) {
        let verdict = engine::classify(
            rules,
            Some(models),
            &Contact {
                text: &example.text,
                channel: Channel::Wechat,
                poster: None,
                region_hint: "",
            },
        );
        intents += 1;
        intents_right += usize::from(verdict.intent().label() == example.intent);
        if example.intent == "complaint" || example.intent == "inquiry" {
            categories += 1;
            categories_right += usize::from(verdict.category == example.category);
        }
    }
    let share = |right: usize, all: usize| right as f64 / all.max(1) as f64;
    (share(intents_right, intents), share(categories_right, categories))
}

#[cfg(test)]
mod tests {
    use closedloop_proto::v1::Intent;

    use super::*;

    fn verdict(truth: &str, by_rules: &str, rules_found: bool, by_model: &str, confidence: f32) -> Verdicts {
        Verdicts {
            truth: truth.into(),
            by_rules: by_rules.into(),
            rules_found,
            by_model: by_model.into(),
            confidence,
        }
    }

    #[test]
    fn a_model_that_is_right_when_sure_gets_to_overrule() {
        let verdicts = [
            // Sure and right against the rules.
            verdict("outage", "billing", true, "outage", 0.97),
            verdict("refund", "payment", true, "refund", 0.96),
            // Unsure and wrong: the rules should keep these.
            verdict("billing", "billing", true, "payment", 0.6),
            verdict("fraud", "fraud", true, "other", 0.7),
        ];
        let (trust, accuracy) = best_trust(&verdicts);
        assert!(trust.model_decides(true, 0.96), "{trust:?}");
        assert!(!trust.model_decides(true, 0.7), "{trust:?}");
        assert_eq!(accuracy, 1.0);
    }

    #[test]
    fn a_useless_model_never_decides() {
        let verdicts = [
            verdict("outage", "outage", true, "billing", 0.99),
            verdict("other", "other", false, "billing", 0.99),
        ];
        let (trust, accuracy) = best_trust(&verdicts);
        assert!(
            !trust.could_decide(true) && !trust.could_decide(false),
            "{trust:?}"
        );
        assert_eq!(accuracy, 1.0);
    }

    #[test]
    fn where_the_rules_found_nothing_the_model_fills_in() {
        let verdicts = [
            verdict("delivery", "other", false, "delivery", 0.55),
            verdict("billing", "billing", true, "payment", 0.99),
        ];
        let (trust, _) = best_trust(&verdicts);
        assert!(trust.model_decides(false, 0.55), "{trust:?}");
        assert!(!trust.model_decides(true, 0.99), "{trust:?}");
    }

    #[test]
    fn intent_labels_match_the_examples() {
        assert_eq!(Intent::Complaint.label(), "complaint");
        assert_eq!(Intent::Noise.label(), "noise");
    }
}
