//! `classify-train`: trains the intent and category models on the training part of the
//! labelled examples, chooses by cross-validation how far each may overrule the keyword
//! rules, and writes the model classify ships and loads at start.
//!
//! `cargo run -p closedloop-classify --bin classify-train` (defaults to the repo's files).
//!
//! With `--corrections` (a tenant's, as `dispatch-corrections` exports them) the agents'
//! labels train too and their texts keep them; it prints the engine's held-out accuracy
//! before (the model in use, `--current`) and after. Write the result where classify's
//! `CLOSEDLOOP_CLASSIFY_MODEL` points and send classify SIGHUP.

use clap::Parser;
use closedloop_classify::calibrate::{self, FOLDS};
use closedloop_classify::model::{Learner, TextModels, Trust, is_held_out, parse_examples, risk_corpus};
use closedloop_classify::rules::Rules;

/// The model classify ships, trained on the shipped examples alone.
const SHIPPED_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/model/model.json");

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/labelled.tsv"))]
    examples: String,
    #[arg(long, default_value = SHIPPED_MODEL)]
    out: String,
    /// The keyword rules the engine will run beside the model (default: the built-in ones).
    #[arg(long)]
    rules: Option<String>,
    /// What fits the models.
    #[arg(long, value_enum, default_value = "logistic")]
    learner: Learner,
    /// Agents' corrections (`intent<TAB>category<TAB>text` lines), e.g. from
    /// `dispatch-corrections`; may be given more than once.
    #[arg(long)]
    corrections: Vec<String>,
    /// The model file in use, to compare with (default: the shipped one).
    #[arg(long)]
    current: Option<String>,
    /// Texts labelled "risk" or "none" (with a kind) for the escalation-risk model; the
    /// labelled examples they do not list train it as "none" too.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/risk.tsv"))]
    risk_examples: String,
}

fn describe(trust: Trust) -> String {
    let bar = |b: f32| {
        if b > 1.0 {
            "never".to_owned()
        } else {
            format!("at ≥ {b}")
        }
    };
    format!(
        "overrules the rules {}, decides where they found nothing {}",
        bar(trust.over_rules),
        bar(trust.without_rules)
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let examples = parse_examples(&std::fs::read_to_string(&args.examples)?)?;
    let rules = Rules::load(args.rules.as_deref())?;
    let held_out = examples.iter().filter(|e| is_held_out(&e.text)).count();
    // A tenant's corrections belong in the tenant's model file, never in the shipped one.
    anyhow::ensure!(
        args.corrections.is_empty() || args.out != SHIPPED_MODEL,
        "with --corrections, name the tenant's model file with --out"
    );
    let mut corrections = Vec::new();
    for path in &args.corrections {
        corrections.extend(parse_examples(&std::fs::read_to_string(path)?)?);
    }
    let risk_examples = risk_corpus(
        parse_examples(&std::fs::read_to_string(&args.risk_examples)?)?,
        &examples,
    );
    let cv = calibrate::cross_validate(&examples, &rules, args.learner);
    let risk = calibrate::risk_bars(&risk_examples, &examples, &rules, args.learner, cv.intent);
    let mut models = TextModels::train_with_corrections(args.learner, &examples, &corrections).with_risk(
        args.learner,
        &risk_examples,
        risk.flag,
        risk.vetoes,
        risk.over_intent,
    );
    models.intent_trust = cv.intent;
    models.category_trust = cv.category;
    std::fs::write(&args.out, serde_json::to_string(&models)?)?;
    println!(
        "  escalation risk: the model flags at ≥ {} where the lists found none, and overrules them below {} \
         (threats), {} (repeated contact), {} (vulnerable people), and makes praise or noise a complaint at ≥ {} \
         (recall {:.3}; false alarms {:.3} among ordinary contacts, {:.3} among written texts; over {} texts)",
        risk.flag,
        risk.vetoes.threat,
        risk.vetoes.repeat,
        risk.vetoes.vulnerable,
        risk.over_intent,
        risk.score.recall,
        risk.score.ordinary_false_alarms,
        risk.score.written_false_alarms,
        risk_examples.iter().filter(|e| !is_held_out(&e.text)).count()
    );
    if !args.corrections.is_empty() {
        let current = TextModels::load(args.current.as_deref())?;
        let (intent_before, category_before) = calibrate::held_out_accuracy(&examples, &rules, &current);
        let (intent_after, category_after) = calibrate::held_out_accuracy(&examples, &rules, &models);
        println!(
            "{} corrections ({} texts kept as corrected); held-out engine accuracy, before -> after: \
             intent {intent_before:.3} -> {intent_after:.3}, category {category_before:.3} -> {category_after:.3}",
            corrections.len(),
            models.corrected.len()
        );
    }
    println!(
        "{:?} trained on {} examples ({} held out for classify-eval): {} intents, {} categories, {} n-grams -> {}",
        args.learner,
        examples.len() - held_out,
        held_out,
        models.intent.classes.len(),
        models.category.classes.len(),
        models.intent.vocabulary(),
        args.out
    );
    println!(
        "{FOLDS}-fold cross-validation on the {} training examples:",
        cv.examples
    );
    println!(
        "  intent:   rules alone {:.3}, engine {:.3}; the model {}",
        cv.rules_intent_accuracy,
        cv.intent_accuracy,
        describe(cv.intent)
    );
    println!(
        "  category: rules alone {:.3}, engine {:.3}; the model {}",
        cv.rules_category_accuracy,
        cv.category_accuracy,
        describe(cv.category)
    );
    Ok(())
}
