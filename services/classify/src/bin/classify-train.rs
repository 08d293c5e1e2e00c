//! `classify-train`: trains the intent and category models on the training part of the
//! labelled examples and writes the model classify ships and loads at start.
//!
//! `cargo run -p closedloop-classify --bin classify-train` (defaults to the repo's files).

use clap::Parser;
use closedloop_classify::model::{TextModels, is_held_out, parse_examples};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/data/labelled.tsv"))]
    examples: String,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/model/model.json"))]
    out: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let examples = parse_examples(&std::fs::read_to_string(&args.examples)?)?;
    let held_out = examples.iter().filter(|e| is_held_out(&e.text)).count();
    let models = TextModels::train(&examples);
    std::fs::write(&args.out, serde_json::to_string(&models)?)?;
    println!(
        "trained on {} examples ({} held out for classify-eval): {} intents, {} categories, {} n-grams -> {}",
        examples.len() - held_out,
        held_out,
        models.intent.classes.len(),
        models.category.classes.len(),
        models.intent.log_likelihoods.len(),
        args.out
    );
    Ok(())
}
