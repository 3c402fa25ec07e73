use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tandem::config::Settings;
use tandem::data::{movielens, split, synthetic};

/// tandem: a recommendation service (two-tower model, Qdrant ANN, session-aware re-ranking).
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    /// A TOML settings file; `TANDEM_*` environment variables override it.
    #[arg(long, global = true, env = "TANDEM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert a public dataset into tandem's common format (items.csv, interactions.csv).
    #[command(subcommand)]
    Import(ImportSource),
    /// Write a synthetic catalog and interaction log with learnable structure (categories,
    /// power-law popularity, user tastes, drifting sessions), deterministic for a seed.
    Generate(GenerateArgs),
    /// Split a dataset with the evaluation protocol: train, test, onboarding for new users,
    /// and a validation split of train.
    Split(SplitArgs),
}

#[derive(Subcommand)]
enum ImportSource {
    /// Import MovieLens: ml-100k (u.data, u.item, u.user) or ml-latest-small / ml-25m
    /// (ratings.csv, movies.csv, tags.csv). Genres become categories, tags become item tags,
    /// the year in the title becomes `year`.
    Movielens(MovielensArgs),
}

#[derive(Args)]
struct MovielensArgs {
    /// The unpacked MovieLens directory.
    #[arg(long, env = "TANDEM_IMPORT_SRC", value_name = "DIR")]
    src: PathBuf,
    /// Where to write items.csv and interactions.csv (created if missing).
    #[arg(long, env = "TANDEM_IMPORT_OUT", value_name = "DIR")]
    out: PathBuf,
}

#[derive(Args)]
struct GenerateArgs {
    /// Where to write items.csv, interactions.csv and generate.json (created if missing).
    #[arg(long, env = "TANDEM_GENERATE_OUT", value_name = "DIR")]
    out: PathBuf,
    /// Number of catalog items.
    #[arg(long, env = "TANDEM_GENERATE_ITEMS", default_value_t = 10_000)]
    items: u64,
    /// Number of users; each gets at least one interaction.
    #[arg(long, env = "TANDEM_GENERATE_USERS", default_value_t = 2_000)]
    users: u64,
    /// Exact number of interactions to write (at least --users).
    #[arg(long, env = "TANDEM_GENERATE_INTERACTIONS", default_value_t = 100_000)]
    interactions: u64,
    /// Random seed; the same seed gives the same bytes.
    #[arg(long, env = "TANDEM_GENERATE_SEED", default_value_t = 42)]
    seed: u64,
}

#[derive(Args)]
struct SplitArgs {
    /// A directory with items.{csv,jsonl} and interactions.{csv,jsonl}.
    #[arg(long, env = "TANDEM_SPLIT_DATA", value_name = "DIR")]
    data: PathBuf,
    /// Where to write train.csv, test.csv, onboard.csv, onboard_test.csv, val/, items and
    /// stats.json (created if missing).
    #[arg(long, env = "TANDEM_SPLIT_OUT", value_name = "DIR")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tandem::telemetry::init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the line already holds
/// (the data errors print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Validated at start-up even by commands that use little of it, so that a bad setting
    // fails before any work is done.
    let _settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Import(ImportSource::Movielens(args)) => {
            let s = movielens::import(&args.src, &args.out)?;
            println!(
                "imported {} interactions, {} users, {} items ({} rated, {} tagged) into {}",
                thousands(s.interactions),
                thousands(s.users),
                thousands(s.items),
                thousands(s.items_rated),
                thousands(s.items_tagged),
                args.out.display()
            );
        }
        Command::Generate(args) => {
            let cfg = synthetic::GenerateConfig {
                items: args.items,
                users: args.users,
                interactions: args.interactions,
                seed: args.seed,
            };
            let s = synthetic::generate(&cfg, &args.out)?;
            println!(
                "generated {} interactions, {} users, {} items (seed {}) into {} in {:.1}s",
                thousands(cfg.interactions),
                thousands(cfg.users),
                thousands(cfg.items),
                cfg.seed,
                args.out.display(),
                s.seconds
            );
        }
        Command::Split(args) => {
            let s = split::split(&args.data, &args.out)?;
            println!(
                "split {} interactions: train {}, test {} ({} users), onboard {} + onboard_test {} ({} new users), val {} + {}, into {}",
                thousands(s.interactions),
                thousands(s.train_rows),
                thousands(s.test_rows),
                thousands(s.test_users),
                thousands(s.onboard_rows),
                thousands(s.onboard_test_rows),
                thousands(s.new_users_scored),
                thousands(s.val_train_rows),
                thousands(s.val_test_rows),
                args.out.display()
            );
        }
    }
    Ok(())
}

/// `100836` as `100,836`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
