//! `closedloop-admin`: operators' commands. `dead-letters list|show|replay` works with the
//! dead-letter stream (see `closedloop_runtime::dead_letters`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use closedloop_runtime::bus::Bus;
use closedloop_runtime::config::{NatsConnectArgs, redact_urls};
use closedloop_runtime::dead_letters::{DeadLetters, Selection, group};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "closedloop-admin", about = "Closedloop operators' commands")]
struct Admin {
    #[command(flatten)]
    nats: NatsConnectArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Events parked in the dead-letter stream.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

#[derive(Debug, clap::Args)]
struct Filters {
    /// Only those parked by this consumer (e.g. `notify-classified`).
    #[arg(long)]
    consumer: Option<String>,
    /// Only those whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DeadLetterCommand {
    /// Counts by consumer and reason, with each group's sequences.
    List {
        #[command(flatten)]
        filters: Filters,
    },
    /// One dead letter: where it came from, why it was parked, and the event decoded.
    Show {
        /// Its sequence in the dead-letter stream (as `list` prints).
        sequence: u64,
    },
    /// Publishes dead letters to the subject they came from and removes them from the
    /// stream. Name what to replay: sequences, a consumer, a reason, or `--all`.
    Replay {
        /// Dead-letter sequences (repeatable).
        #[arg(long = "seq")]
        sequences: Vec<u64>,
        #[command(flatten)]
        filters: Filters,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Print what would be replayed, and replay nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let admin = Admin::parse();
    match run(admin).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("closedloop-admin: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(admin: Admin) -> anyhow::Result<()> {
    let Command::DeadLetters(command) = admin.command;
    // Connecting retries until NATS answers; an operator would rather hear it is away.
    let cancel = CancellationToken::new();
    let connecting = Bus::connect(&admin.nats, "admin", &cancel);
    let bus = match tokio::time::timeout(std::time::Duration::from_secs(10), connecting).await {
        Ok(bus) => bus?,
        Err(_) => anyhow::bail!(
            "NATS at {} did not answer within 10 s",
            redact_urls(&admin.nats.nats_url)
        ),
    };
    let letters = DeadLetters::new(bus.jetstream().clone());
    match command {
        DeadLetterCommand::List { filters } => {
            let selection = Selection {
                consumer: filters.consumer,
                reason: filters.reason,
                ..Default::default()
            };
            let listed = letters.list(&selection).await?;
            if listed.is_empty() {
                println!("no dead letters");
            }
            for found in group(&listed) {
                let sequences: Vec<String> = found.sequences.iter().map(u64::to_string).collect();
                println!(
                    "{count:>6}  {consumer}  {reason}\n        sequences: {sequences}",
                    count = found.sequences.len(),
                    consumer = found.consumer,
                    reason = found.reason,
                    sequences = sequences.join(" ")
                );
            }
        }
        DeadLetterCommand::Show { sequence } => {
            let letter = letters.get(sequence).await?;
            println!("sequence:          {}", letter.sequence);
            println!("consumer:          {}", letter.consumer);
            println!("reason:            {}", letter.reason);
            println!("original subject:  {}", letter.subject);
            println!("original sequence: {}", letter.original_sequence);
            println!("deliveries:        {}", letter.deliveries);
            for (name, values) in letter.headers.iter() {
                let name: &str = name.as_ref();
                if name.starts_with("ce-") || name == "traceparent" {
                    for value in values {
                        println!("{name}: {}", value.as_str());
                    }
                }
            }
            println!("{}", letter.decoded());
        }
        DeadLetterCommand::Replay {
            sequences,
            filters,
            all,
            dry_run,
        } => {
            let selection = Selection {
                all,
                sequences,
                consumer: filters.consumer,
                reason: filters.reason,
            };
            anyhow::ensure!(
                !selection.is_empty(),
                "name what to replay: --seq, --consumer, --reason or --all"
            );
            let chosen = letters.list(&selection).await?;
            for letter in &chosen {
                if dry_run {
                    println!("would replay {} to {}", letter.sequence, letter.subject);
                } else {
                    letters.replay(letter).await?;
                    println!("replayed {} to {}", letter.sequence, letter.subject);
                }
            }
            println!(
                "{} {} dead letter(s)",
                if dry_run { "would replay" } else { "replayed" },
                chosen.len()
            );
        }
    }
    Ok(())
}
