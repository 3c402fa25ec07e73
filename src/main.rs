use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tandem::config::Settings;
use tandem::data::{movielens, split, synthetic};
use tracing_subscriber::EnvFilter;

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
    /// Write the event log as `interactions.csv` in the common format, to retrain on live
    /// traffic.
    ExportEvents(ExportEventsArgs),
    /// Serve the HTTP API (recommendations, similar items, catalog, events, onboarding) until
    /// Ctrl-C or SIGTERM, then drain the requests in flight.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (overrides `bind`).
    #[arg(long, env = "TANDEM_BIND", value_name = "HOST:PORT")]
    bind: Option<String>,
    /// Checkpoint directory to serve (overrides `model_path`).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Data dir whose items file is the catalog (overrides `server.catalog_dir`); it is
    /// embedded and indexed at start-up when the index is empty.
    #[arg(long, value_name = "DIR")]
    catalog: Option<PathBuf>,
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

#[derive(Args)]
struct ExportEventsArgs {
    /// Directory to write `interactions.csv` into (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Only events at or after this time: unix seconds, unix milliseconds or RFC 3339.
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise; JSON when `TANDEM_LOG_FORMAT=json`.
fn init_logging() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // qdrant-edge warns "Feature flags not initialized!" on every operation; it means
        // nothing to a tandem user.
        .add_directive(
            "qdrant_edge::common::flags=error"
                .parse()
                .expect("valid directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = std::env::var("TANDEM_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // A second init (there is none in the binary) would only fail to install; ignore it.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
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
    let settings = Settings::load(cli.config.as_deref())?;
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
        Command::ExportEvents(args) => export_events(&settings, &args)?,
        Command::Serve(args) => serve(settings, args)?,
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

fn serve(mut settings: Settings, args: ServeArgs) -> anyhow::Result<()> {
    if let Some(b) = args.bind {
        settings.bind = b;
    }
    if let Some(m) = args.model {
        settings.model_path = m;
    }
    if let Some(c) = args.catalog {
        settings.server.catalog_dir = c;
    }
    settings.validate()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&settings.bind)
            .await
            .map_err(|e| anyhow::anyhow!("binding {}: {e}", settings.bind))?;
        tandem::http::serve(listener, settings, shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM, so the server drains in-flight requests before exiting.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

fn export_events(settings: &Settings, args: &ExportEventsArgs) -> anyhow::Result<()> {
    let since_ms = match &args.since {
        Some(s) => tandem::session::event::parse_time(s).map_err(|e| match e {
            tandem::session::EventError::Invalid { reason, .. } => {
                anyhow::anyhow!("--since: {reason}")
            }
            other => anyhow::anyhow!("--since: {other}"),
        })?,
        None => i64::MIN,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let summary = runtime.block_on(tandem::session::export::export_events(
        settings, &args.out, since_ms,
    ))?;
    println!(
        "wrote {} interactions to {} ({} zero-weight events such as impressions left out)",
        thousands(summary.written as u64),
        args.out.join("interactions.csv").display(),
        thousands(summary.skipped_zero_weight as u64)
    );
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
