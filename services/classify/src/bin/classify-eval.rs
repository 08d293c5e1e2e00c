//! `classify-eval`: per-class precision, recall and F1 and a confusion matrix, on the
//! held-out labelled examples, for the model alone, the rules alone and the engine (both).
//!
//! `cargo run -p closedloop-classify --bin classify-eval`

use std::collections::BTreeSet;

use clap::Parser;
use closedloop_classify::calibrate::{RISK_FALSE_ALARMS, RISK_RECALL, RiskScore, RiskTruth, risk_figures};
use closedloop_classify::engine::{self, Contact};
use closedloop_classify::model::{Example, TextModels, is_held_out, parse_examples, risk_corpus};
use closedloop_classify::rules::{Rules, fold};
use closedloop_proto::v1::Channel;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/labelled.tsv"))]
    examples: String,
    /// A model file other than the shipped one.
    #[arg(long)]
    model: Option<String>,
    /// Texts labelled "risk" or "none" (with a kind), as classify-train reads them (with the
    /// labelled examples they do not list as "none").
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/risk.tsv"))]
    risk_examples: String,
    /// Also list the held-out risk texts the engine missed or flagged wrongly, to see what
    /// examples would help.
    #[arg(long)]
    show_risk_errors: bool,
    /// Also score every text of a risk check set written apart from the corpus (as
    /// `data/risk-check.tsv`), which nothing is trained on.
    #[arg(long)]
    risk_check: Option<String>,
}

/// Per-class precision, recall, F1 and the confusion matrix of (truth, prediction) pairs.
fn report(title: &str, pairs: &[(String, String)]) {
    let classes: Vec<&str> = pairs
        .iter()
        .flat_map(|(t, p)| [t.as_str(), p.as_str()])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let correct = pairs.iter().filter(|(t, p)| t == p).count();
    println!(
        "\n{title}: accuracy {:.3} ({correct}/{})",
        correct as f64 / pairs.len().max(1) as f64,
        pairs.len()
    );
    println!(
        "  {:<18} {:>9} {:>7} {:>7} {:>7}",
        "class", "precision", "recall", "f1", "support"
    );
    let mut f1_sum = 0.0;
    let mut f1_classes = 0;
    for class in &classes {
        let tp = pairs.iter().filter(|(t, p)| t == class && p == class).count() as f64;
        let predicted = pairs.iter().filter(|(_, p)| p == class).count() as f64;
        let actual = pairs.iter().filter(|(t, _)| t == class).count() as f64;
        let precision = if predicted > 0.0 { tp / predicted } else { 0.0 };
        let recall = if actual > 0.0 { tp / actual } else { 0.0 };
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        println!("  {class:<18} {precision:>9.3} {recall:>7.3} {f1:>7.3} {actual:>7}");
        // Macro-F1 over the classes the truth has: a class only ever predicted has no recall
        // to average.
        if actual > 0.0 {
            f1_sum += f1;
            f1_classes += 1;
        }
    }
    println!("  macro-F1 {:.3}", f1_sum / f64::from(f1_classes.max(1)));
    println!("  confusion (rows: truth, columns: prediction)");
    let short = |c: &str| c.chars().take(6).collect::<String>();
    print!("  {:<18}", "");
    for class in &classes {
        print!(" {:>6}", short(class));
    }
    println!();
    for truth in &classes {
        print!("  {truth:<18}");
        for predicted in &classes {
            let n = pairs.iter().filter(|(t, p)| t == truth && p == predicted).count();
            print!(" {n:>6}");
        }
        println!();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let examples = parse_examples(&std::fs::read_to_string(&args.examples)?)?;
    let held_out: Vec<_> = examples.iter().filter(|e| is_held_out(&e.text)).collect();
    let models = TextModels::load(args.model.as_deref())?;
    let rules = Rules::builtin()?;
    println!(
        "held-out examples: {} of {}; model {}",
        held_out.len(),
        examples.len(),
        models.trained_on
    );

    let label = |intent: closedloop_proto::v1::Intent| intent.label();
    let needs_category = |e: &&&Example| e.intent == "complaint" || e.intent == "inquiry";
    let mut model_intent = Vec::new();
    let mut rules_intent = Vec::new();
    let mut engine_intent = Vec::new();
    let mut model_category = Vec::new();
    let mut rules_category = Vec::new();
    let mut engine_category = Vec::new();
    for example in &held_out {
        let folded = fold(&example.text);
        let contact = Contact {
            text: &example.text,
            channel: Channel::Wechat,
            poster: None,
            region_hint: "",
        };
        let by_rules = engine::classify(&rules, None, &contact);
        let by_engine = engine::classify(&rules, Some(&models), &contact);
        model_intent.push((example.intent.clone(), models.intent.predict(&folded).class));
        rules_intent.push((example.intent.clone(), label(by_rules.intent())));
        engine_intent.push((example.intent.clone(), label(by_engine.intent())));
        if needs_category(&example) {
            model_category.push((example.category.clone(), models.category.predict(&folded).class));
            rules_category.push((example.category.clone(), by_rules.category.clone()));
            engine_category.push((example.category.clone(), by_engine.category.clone()));
        }
    }
    report("intent — model", &model_intent);
    report("intent — rules", &rules_intent);
    report(
        "intent — engine (model when confident, else rules)",
        &engine_intent,
    );
    report("category — model", &model_category);
    report("category — rules", &rules_category);
    report(
        "category — engine (model when confident, else rules)",
        &engine_category,
    );
    let corpus = risk_corpus(
        parse_examples(&std::fs::read_to_string(&args.risk_examples)?)?,
        &examples,
    );
    let held_out: Vec<&Example> = corpus.iter().filter(|e| is_held_out(&e.text)).collect();
    risk_report("held-out", &held_out, &rules, &models, args.show_risk_errors);
    if let Some(path) = &args.risk_check {
        let check = parse_examples(&std::fs::read_to_string(path)?)?;
        // A text the corpus also has would be scored on what the model was trained on.
        let in_corpus: BTreeSet<String> = corpus.iter().map(|e| fold(&e.text)).collect();
        let (seen, apart): (Vec<&Example>, Vec<&Example>) =
            check.iter().partition(|e| in_corpus.contains(&fold(&e.text)));
        if !seen.is_empty() {
            println!(
                "\n{} texts of {path} are in the corpus too and are left out",
                seen.len()
            );
        }
        risk_report("check-set", &apart, &rules, &models, args.show_risk_errors);
    }
    Ok(())
}

/// Escalation-risk recall and false alarms on risk texts nothing was trained on (`what`:
/// the held-out part of the risk corpus, or a check set), for the rules' word lists alone
/// and for the engine (lists, then the risk model), with recall by kind and false alarms
/// among ordinary contacts and among written texts apart.
fn risk_report(what: &str, held_out: &[&Example], rules: &Rules, models: &TextModels, show_errors: bool) {
    let flagged = |with_models: bool, text: &str| {
        let contact = Contact {
            text,
            channel: Channel::Wechat,
            poster: None,
            region_hint: "",
        };
        engine::classify(rules, with_models.then_some(models), &contact).escalation_risk
    };
    let count = |truth: RiskTruth| held_out.iter().filter(|e| RiskTruth::of(e) == truth).count();
    println!(
        "\nescalation risk: {} {what} texts ({} risky, {} ordinary contacts and {} written texts without risk); \
         aims: recall ≥ {RISK_RECALL}, false alarms ≤ {RISK_FALSE_ALARMS} among each",
        held_out.len(),
        count(RiskTruth::Risky),
        count(RiskTruth::Ordinary),
        count(RiskTruth::Written),
    );
    for (name, with_models) in [("rules", false), ("engine", true)] {
        let verdicts: Vec<(RiskTruth, bool)> = held_out
            .iter()
            .map(|e| (RiskTruth::of(e), flagged(with_models, &e.text)))
            .collect();
        let score = RiskScore::of(verdicts.iter().copied());
        // The share over every text without risk, as a set that does not tell the two
        // apart would count it.
        let pooled = risk_figures(verdicts.iter().map(|(t, f)| (*t == RiskTruth::Risky, *f)));
        let kinds: BTreeSet<&str> = held_out
            .iter()
            .filter(|e| e.intent == "risk")
            .map(|e| e.category.as_str())
            .collect();
        let by_kind: Vec<String> = kinds
            .iter()
            .map(|kind| {
                let of_kind = held_out
                    .iter()
                    .filter(|e| e.intent == "risk" && e.category == *kind);
                let kind_figures = risk_figures(of_kind.map(|e| (true, flagged(with_models, &e.text))));
                format!("{kind} {:.2}", kind_figures.recall)
            })
            .collect();
        println!(
            "  {name:<7} recall {:.3}; false alarms {:.3} among ordinary contacts, {:.3} among written texts \
             ({:.3} among all without risk); recall by kind: {}",
            score.recall,
            score.ordinary_false_alarms,
            score.written_false_alarms,
            pooled.false_alarms,
            by_kind.join(", ")
        );
    }
    if show_errors {
        for example in held_out {
            let risky = example.intent == "risk";
            if flagged(true, &example.text) != risky {
                let verdict = if risky { "missed" } else { "false alarm" };
                println!("  {verdict} ({}): {}", example.category, example.text);
            }
        }
    }
}
