use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// tandem: a recommendation service (two-tower model, Qdrant ANN, session-aware re-ranking).
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the event log as `interactions.csv` in the common format, to retrain on live
    /// traffic.
    ExportEvents(ExportEventsArgs),
}

#[derive(clap::Args)]
struct ExportEventsArgs {
    /// Settings file (TOML); `TANDEM_*` variables override it.
    #[arg(long, env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    /// Directory to write `interactions.csv` into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Only events at or after this time: unix seconds, unix milliseconds or RFC 3339.
    #[arg(long)]
    since: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::ExportEvents(args) => export_events(args),
    }
}

fn export_events(args: ExportEventsArgs) -> anyhow::Result<()> {
    let settings = tandem::config::Settings::load(args.config.as_deref())?;
    let since_ms = match &args.since {
        Some(s) => {
            tandem::session::event::parse_time(s).map_err(|e| anyhow::anyhow!("--since: {e}"))?
        }
        None => i64::MIN,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let summary = runtime.block_on(tandem::session::export::export_events(
        &settings, &args.out, since_ms,
    ))?;
    println!(
        "wrote {} interactions to {} ({} zero-weight events such as impressions left out)",
        summary.written,
        args.out.join("interactions.csv").display(),
        summary.skipped_zero_weight
    );
    Ok(())
}
