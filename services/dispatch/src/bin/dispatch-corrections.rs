//! `dispatch-corrections`: prints a tenant's corrections of classify's verdicts as labelled
//! examples (`intent<TAB>category<TAB>text`), the format `classify-train --corrections`
//! reads:
//!
//! `dispatch-corrections --tenant acme > acme-corrections.tsv` (with `CLOSEDLOOP_DATABASE_URL`).

use std::io::Write;

use clap::Parser;
use closedloop_runtime::config::DatabaseArgs;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "Exports a tenant's classification corrections as labelled examples")]
struct Args {
    #[arg(long)]
    tenant: String,
    #[command(flatten)]
    database: DatabaseArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = closedloop_dispatch::connect_database(&args.database, &CancellationToken::new()).await?;
    let corrections = closedloop_dispatch::store::corrections(&pool, &args.tenant).await?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# intent\tcategory\ttext — corrections by {}'s agents",
        args.tenant
    )?;
    for (intent, category, text) in &corrections {
        // One example a line: tabs and line breaks inside the text become spaces.
        let text: String = text
            .chars()
            .map(|c| {
                if c == '\t' || c == '\n' || c == '\r' {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        writeln!(out, "{}\t{category}\t{}", intent.label(), text.trim())?;
    }
    eprintln!("{} corrections of tenant {}", corrections.len(), args.tenant);
    Ok(())
}
