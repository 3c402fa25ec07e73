use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tandem::config::Settings;
use tandem::data::{movielens, split, synthetic};
use tandem::eval::{self, On, Split};
use tandem::model::{self, TrainConfig, TwoTower};

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
    /// Serve the HTTP API (recommendations, similar items, catalog, events, onboarding) until
    /// Ctrl-C or SIGTERM, then drain the requests in flight.
    Serve(ServeArgs),
    /// Embed a catalog with a checkpoint's item tower into a new collection version, wait
    /// until it is searchable, then switch the serving alias to it. If it fails midway the
    /// old version stays live.
    Index(IndexArgs),
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
    /// Send a data dir's interactions to a running server through `POST /v1/events`, as a
    /// shop's event pipeline would (`make run` seeds the demo's history this way). Each event
    /// gets an id derived from its fields, so a second replay is counted as duplicates.
    ReplayEvents(ReplayEventsArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Train the two-tower model and write a checkpoint (model.safetensors + manifest.json).
    Train(TrainArgs),
    /// Score a checkpoint on a split directory with the offline protocol (trains one first
    /// when --model is not given).
    Eval(EvalArgs),
    /// Manage model versions on a running server over its admin API (for scripts and CI):
    /// list, register, activate, rollback.
    Models(ModelsArgs),
    /// Retrain from the logged events, score the candidate against the active model on a
    /// held-out slice, and promote it only when it is better (runs on the server).
    #[command(long_about = RETRAIN_ABOUT)]
    Retrain(RetrainArgs),
}

const RETRAIN_ABOUT: &str = "\
Retrain from the logged events, score the candidate against the active model on a held-out \
slice, and promote it only when it is better. The server runs the loop (it holds the event \
log, the registry and the serving model); this command starts a run there, prints each stage \
as it starts, and prints the run's report as JSON. The server also runs it by itself every \
`[retrain] every` (off by default).

The loop, with its `[retrain]` settings:
  1. gather   the event log since the run that trained the active model (all of it otherwise),
              plus the active model's own training data (its manifest's data.source), within
              `window` (default 90d) before the newest event; duplicates dropped.
  2. split    the last `holdout` (default 1d) is this run's test set and is never trained on.
              Users with history before it are scored on it; users new in it are scored as
              new users (first 5 events known).
  3. train    as `tandem train --data` with validation, with the active model's settings from
              its manifest (`epochs` overrides its epoch count).
  4. gate     both models ranked and scored on the held-out slice by `tandem eval`'s scorer
              (Recall@20, NDCG@10, new-user and cold-item recall); the candidate passes when
              its `metric` (default recall@20) beats the active model's by `margin`
              (relative, default 0.01 = 1%).
  5. promote  a passing candidate is registered, then per `promote`: activate (default; the
              zero-downtime switch), experiment (an A/B test with it as the challenger at
              `experiment_share`), or register-only.
  6. record   the report (data counts, both models' metrics, the decision and why, the time
              of each stage) goes to the registry: `tandem models list`, GET /admin/models,
              GET /admin/retrain, the admin page, and the tandem_retrain_* metrics.

Whatever fails (no events, a training error, a gate that cannot be scored), the active model \
keeps serving and the run is recorded as failed with the reason. The run's files (train/, \
holdout.csv, model/) stay under <data_dir>/retrain/<run id>/. Exit status: 0 when the run \
promoted or held back its candidate, 1 when it failed.";

#[derive(Args)]
struct RetrainArgs {
    /// The server's base URL.
    #[arg(long, env = "TANDEM_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The admin key (the server's TANDEM_ADMIN_KEY).
    #[arg(long, env = "TANDEM_ADMIN_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A control run that checks the gate: the candidate trains with the item ids shuffled,
    /// so the gate must hold it back.
    #[arg(long)]
    shuffle_items: bool,
    /// Return once the run has started instead of waiting for its report.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this many seconds (the run goes on on the server).
    #[arg(long, default_value_t = 6 * 3600)]
    timeout_secs: u64,
}

#[derive(Args)]
struct IndexArgs {
    /// Checkpoint directory (model.safetensors + manifest.json).
    #[arg(long, env = "TANDEM_MODEL_PATH", value_name = "DIR")]
    model: PathBuf,
    /// Data dir holding items.csv (or .jsonl); interactions.csv, when present, gives each
    /// item's popularity.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Index backend: edge (embedded, the default), qdrant or exact. Overrides `index.backend`.
    #[arg(long)]
    backend: Option<String>,
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

#[derive(Args)]
struct ModelsArgs {
    /// The server's base URL.
    #[arg(
        long,
        env = "TANDEM_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// The admin key (the server's TANDEM_ADMIN_KEY).
    #[arg(long, env = "TANDEM_ADMIN_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    action: ModelsAction,
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Registered versions with status, metrics and activation progress (JSON).
    List,
    /// Validate a checkpoint directory (a path on the server) and register it.
    Register {
        /// Checkpoint directory holding model.safetensors and manifest.json.
        path: String,
    },
    /// Embed the catalog with a version's item tower and switch to it.
    Activate {
        version: String,
        /// Return at once instead of waiting until the version serves.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Build a version's collection without switching to it, so that an experiment can
    /// serve it beside the active model (`PUT /admin/experiments`).
    Prepare {
        version: String,
        /// Return at once instead of waiting until the version is ready.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Go back to the previously active version (instant, no re-embedding).
    Rollback,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// ANN search on generated clustered vectors: build time, latency, recall against exact
    /// search, upsert visibility and memory, printed as one JSON line.
    Ann(BenchAnnArgs),
}

#[derive(Args)]
struct BenchAnnArgs {
    /// Items in the generated catalog.
    #[arg(long, default_value_t = 100_000)]
    items: usize,
    /// Vector dimension.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Queries timed (each run unfiltered and once per --filter-selectivity).
    #[arg(long, default_value_t = 1_000)]
    queries: usize,
    /// Fractions of items a filtered query keeps, as whole categories (e.g. 0.1,0.01).
    #[arg(long, value_delimiter = ',')]
    filter_selectivity: Vec<f64>,
    /// Backend: edge (embedded), qdrant or exact.
    #[arg(long, default_value = "edge")]
    backend: String,
    /// Directory for the edge collections (default: a fresh temp dir, removed after).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Random seed of the generated catalog and queries.
    #[arg(long, default_value_t = 42)]
    seed: u64,
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
struct ReplayEventsArgs {
    /// Data dir holding interactions.csv (or .jsonl).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
    url: String,
    /// Events per request (the server takes at most `session.max_batch`, default 1000).
    #[arg(long, default_value_t = 500)]
    batch: usize,
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

/// mimalloc instead of glibc's malloc, for the server. Measured at 1M items (BENCHMARKS.md,
/// 2026-12-03): the serving load test went from 1,146 to 1,279 rps, and the end of the
/// catch-up after a model switch (a blocking thread letting go of a million old catalog
/// entries, allocated by the request threads) stalled the async runtime eight times for
/// 51-111 ms with glibc, and in none of three runs with mimalloc, which frees other
/// threads' memory without taking their arena's lock. (The library, and so the tests, keep
/// the system allocator; `index::edge` trims glibc's heap after a build for them.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Command::Serve(args) => {
            // candle sizes every matrix product's thread pool from RAYON_NUM_THREADS, and
            // without it reads /proc/cpuinfo each time: ~3% of the server's CPU under load.
            if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                set_threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
            }
            serve(settings, args)?
        }
        Command::Index(args) => index_catalog(settings, args)?,
        Command::ExportEvents(args) => export_events(&settings, &args)?,
        Command::ReplayEvents(args) => replay_events(&args)?,
        Command::Models(args) => models(args)?,
        Command::Retrain(args) => retrain(args)?,
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
        Command::Bench(BenchCommand::Ann(args)) => bench_ann(settings, args)?,
        Command::Train(args) => {
            set_threads(args.hp.threads);
            keep_freed_memory();
            run_train(args)?
        }
        Command::Eval(args) => {
            set_threads(args.hp.threads);
            keep_freed_memory();
            run_eval(args)?
        }
    }
    Ok(())
}

/// `tandem index`: embed the catalog and switch the live collection to it.
fn index_catalog(mut settings: Settings, args: IndexArgs) -> anyhow::Result<()> {
    use tandem::config::IndexBackend;
    if let Some(b) = &args.backend {
        settings.index.backend = match b.as_str() {
            "edge" | "embedded" => IndexBackend::Embedded,
            "qdrant" => IndexBackend::Qdrant,
            "exact" => IndexBackend::Exact,
            other => anyhow::bail!("--backend {other:?}: expected edge, qdrant or exact"),
        };
    }
    let model = TwoTower::load(&args.model)
        .with_context(|| format!("loading the checkpoint {}", args.model.display()))?;
    let items = tandem::data::read_items(&tandem::data::find_file(&args.data, "items")?)?;
    let started = std::time::Instant::now();
    tokio::runtime::Runtime::new()?.block_on(async {
        let index = tandem::index::open(&settings, &settings.data_dir).await?;
        tandem::items::load::index_catalog(index.as_ref(), &model, &items, &args.data).await?;
        anyhow::Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "indexed {} items with model {} in {:.1}s ({:.0} items/s) under {}",
        thousands(items.len() as u64),
        model.version(),
        secs,
        items.len() as f64 / secs.max(1e-9),
        settings.data_dir.display()
    );
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

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    use tandem::http::admin_client::AdminClient;
    let client = AdminClient::new(&args.url, args.api_key);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let out = match args.action {
            ModelsAction::List => serde_json::to_value(client.list().await?)?,
            ModelsAction::Register { path } => serde_json::to_value(client.register(&path).await?)?,
            ModelsAction::Activate {
                version,
                no_wait,
                timeout_secs,
            } => {
                let started = client.activate(&version).await?;
                if no_wait {
                    serde_json::to_value(started)?
                } else {
                    let timeout = std::time::Duration::from_secs(timeout_secs);
                    let record = client
                        .wait_active(&version, timeout, progress_printer(&version))
                        .await?;
                    serde_json::to_value(record)?
                }
            }
            ModelsAction::Prepare {
                version,
                no_wait,
                timeout_secs,
            } => {
                let started = client.prepare(&version).await?;
                if no_wait {
                    serde_json::to_value(started)?
                } else {
                    let timeout = std::time::Duration::from_secs(timeout_secs);
                    let record = client
                        .wait_ready(&version, timeout, progress_printer(&version))
                        .await?;
                    serde_json::to_value(record)?
                }
            }
            ModelsAction::Rollback => serde_json::to_value(client.rollback().await?)?,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        anyhow::Ok(())
    })
}

/// `tandem retrain`: starts a run on the server and follows it to its report.
fn retrain(args: RetrainArgs) -> anyhow::Result<()> {
    use tandem::http::admin_client::AdminClient;
    use tandem::retrain::{Decision, RetrainRequest};
    let client = AdminClient::new(&args.url, args.api_key);
    let request = RetrainRequest {
        shuffle_items: args.shuffle_items,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let started = client.retrain(&request).await?;
        eprintln!("retrain {} started", started.id);
        if args.no_wait {
            println!("{}", serde_json::to_string_pretty(&started)?);
            return anyhow::Ok(None);
        }
        let mut last = String::new();
        let report = client
            .wait_retrain(
                &started.id,
                std::time::Duration::from_secs(args.timeout_secs),
                |p| {
                    if p.stage != last {
                        let done: Vec<String> = p
                            .done
                            .iter()
                            .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
                            .collect();
                        eprintln!("{}: {} (done: {})", p.id, p.stage, done.join(", "));
                        last = p.stage.clone();
                    }
                },
            )
            .await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        anyhow::Ok(Some(report))
    })?;
    if let Some(r) = report {
        eprintln!(
            "retrain {}: {:?} in {:.1}s: {}",
            r.id, r.decision, r.seconds, r.reason
        );
        if r.decision == Decision::Failed {
            anyhow::bail!("retrain {} failed: {}", r.id, r.reason);
        }
    }
    Ok(())
}

/// Prints a build's phase and count to stderr each time it changes.
fn progress_printer(version: &str) -> impl FnMut(&tandem::registry::ModelRecord) + '_ {
    let mut last = String::new();
    move |m| {
        if let Some(p) = &m.progress {
            let line = format!("{}: {}/{}", p.phase, p.done, p.total);
            if line != last {
                eprintln!("{version} {line}");
                last = line;
            }
        }
    }
}

fn replay_events(args: &ReplayEventsArgs) -> anyhow::Result<()> {
    let path = tandem::data::find_file(&args.data, "interactions")?;
    let interactions = tandem::data::read_interactions(&path)?;
    let url = format!("{}/v1/events", args.url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let (mut accepted, mut duplicates) = (0u64, 0u64);
    let runtime = tokio::runtime::Runtime::new()?;
    for chunk in interactions.chunks(args.batch.max(1)) {
        let events: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| {
                let key = format!(
                    "{}\0{}\0{}\0{}",
                    i.user_id,
                    i.item_id,
                    i.timestamp,
                    i.event_type.as_str()
                );
                serde_json::json!({
                    "event_id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes()),
                    "user_id": i.user_id.as_str(),
                    "item_id": i.item_id.as_str(),
                    "type": i.event_type.as_str(),
                    "value": i.rating,
                    "timestamp": i.timestamp,
                })
            })
            .collect();
        let (status, body) = runtime.block_on(async {
            let r = client
                .post(&url)
                .json(&events)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("could not reach {url}: {e}"))?;
            let status = r.status();
            anyhow::Ok((status, r.text().await.unwrap_or_default()))
        })?;
        if status != reqwest::StatusCode::ACCEPTED {
            anyhow::bail!("POST {url}: {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        accepted += v["accepted"].as_u64().unwrap_or(0);
        duplicates += v["duplicates"].as_u64().unwrap_or(0);
    }
    println!(
        "replayed {} interactions from {} to {url}: {accepted} accepted, {duplicates} duplicates",
        thousands(interactions.len() as u64),
        path.display()
    );
    Ok(())
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

/// `tandem bench ann`: prints one JSON line (see `tandem::index::bench`).
fn bench_ann(mut settings: Settings, args: BenchAnnArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use tandem::config::IndexBackend;
    settings.index.backend = match args.backend.as_str() {
        "edge" | "embedded" => IndexBackend::Embedded,
        "qdrant" => IndexBackend::Qdrant,
        "exact" => IndexBackend::Exact,
        other => anyhow::bail!("--backend {other:?}: expected edge, qdrant or exact"),
    };
    // Never touch the serving alias: the bench gets its own collection name.
    settings.index.collection = format!("tandem_bench_{}", uuid::Uuid::new_v4().simple());
    // The generated catalog's attributes, filtered on by the attribute runs.
    for name in tandem::index::bench::ATTRIBUTES {
        settings.catalog.filterable.push(name.to_string());
    }
    let temp = args.dir.is_none();
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tandem-bench-{}", uuid::Uuid::new_v4()))
    });
    let params = tandem::index::bench::AnnBenchParams {
        items: args.items,
        dim: args.dim,
        queries: args.queries,
        filter_selectivity: args.filter_selectivity,
        seed: args.seed,
    };
    let report = tokio::runtime::Runtime::new()?.block_on(async {
        let index = tandem::index::open(&settings, &dir)
            .await
            .with_context(|| format!("opening the {} index", args.backend))?;
        let report = tandem::index::bench::run(index.as_ref(), &args.backend, &params).await?;
        anyhow::Ok(report)
    });
    if temp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", serde_json::to_string(&report?)?);
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

/// Model and training settings shared by `train` and `eval`.
#[derive(clap::Args, Debug, Clone)]
struct HyperArgs {
    /// Output dimension of both towers (the index's vector size).
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Hidden width of the tower MLPs.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Epochs (with validation: the most the validation fit may run).
    #[arg(long, default_value_t = 7)]
    epochs: usize,
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Softmax temperature.
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    /// Probability of dropping a target's id embedding in training.
    #[arg(long, default_value_t = 0.25)]
    id_dropout: f64,
    /// Weight of the logQ (item frequency) correction; 1 = full.
    #[arg(long, default_value_t = 1.0)]
    logq: f64,
    /// Recency half-life of the user pool, in events.
    #[arg(long, default_value_t = 5.0)]
    half_life: f32,
    /// Most recent events pooled by the user tower.
    #[arg(long, default_value_t = 50)]
    max_history: usize,
    /// Items with fewer training interactions get no id embedding (content only).
    #[arg(long, default_value_t = TrainConfig::default().min_item_count)]
    min_item_count: usize,
    /// Popularity bucket given to items unseen in training (a prior; 1 = "seen once").
    #[arg(long, default_value_t = 1)]
    unseen_popularity_bucket: usize,
    /// Weight of the content alignment loss (a target's content-only vector must find its
    /// full vector in the batch), so that new items land near their content twins; 0 = off.
    #[arg(long, default_value_t = TrainConfig::default().content_loss)]
    content_loss: f64,
    /// `similar`: how much of the popularity direction to take out of the anchor's vector.
    #[arg(long, default_value_t = TrainConfig::default().similar_popularity_removal)]
    similar_popularity_removal: f32,
    /// `similar`: weight of the anchor's content-only vector added to the query.
    #[arg(long, default_value_t = TrainConfig::default().similar_content_weight)]
    similar_content_weight: f32,
    /// Validation epochs without improvement before stopping.
    #[arg(long, default_value_t = 2)]
    patience: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// CPU threads for training and inference kernels.
    #[arg(long, env = "TANDEM_THREADS", default_value_t = 2)]
    threads: usize,
    /// Skip the validation fit and train for exactly --epochs.
    #[arg(long)]
    no_validate: bool,
}

impl HyperArgs {
    fn config(&self) -> TrainConfig {
        let mut c = TrainConfig {
            dim: self.dim,
            hidden: self.hidden,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            temperature: self.temperature,
            id_dropout: self.id_dropout,
            logq: self.logq,
            min_item_count: self.min_item_count,
            content_loss: self.content_loss,
            similar_popularity_removal: self.similar_popularity_removal,
            similar_content_weight: self.similar_content_weight,
            patience: self.patience,
            seed: self.seed,
            threads: self.threads,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            ..TrainConfig::default()
        };
        c.pooling.half_life = self.half_life;
        c.pooling.max_history = self.max_history;
        c.features.unseen_popularity_bucket = self.unseen_popularity_bucket;
        c
    }
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Data directory holding items.csv and interactions.csv (or .jsonl).
    #[arg(long, required_unless_present = "split", conflicts_with = "split")]
    data: Option<PathBuf>,
    /// Split directory: train on train.csv + onboard.csv, choose epochs on val/, and record
    /// test metrics in the manifest.
    #[arg(long)]
    split: Option<PathBuf>,
    /// Checkpoint directory to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    hp: HyperArgs,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    /// Split directory (items.csv, train.csv, onboard.csv, test.csv, onboard_test.csv, val/).
    #[arg(long, required_unless_present = "data", conflicts_with = "data")]
    split: Option<PathBuf>,
    /// With --similar: a data directory (items.csv + interactions.csv, e.g. the demo
    /// catalog) instead of a split; every interaction counts as training data.
    #[arg(long, requires = "similar")]
    data: Option<PathBuf>,
    /// Report the item-to-item (`similar`) metrics instead: same-category share of the 10
    /// nearest neighbours for the best-sellers, the top 100 and 100 random items, against
    /// the item-kNN co-occurrence baseline, and content twins found among the 50 nearest.
    #[arg(long)]
    similar: bool,
    /// Checkpoint to score; without it, one is trained on train.csv + onboard.csv first.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the top-20 lists as user_id,item_id,rank (the input of score.py).
    #[arg(long)]
    export_recs: Option<PathBuf>,
    /// test (default) or val: known = val/train.csv, truth = val/test.csv (for tuning).
    #[arg(long, default_value = "test", value_parser = ["test", "val"])]
    on: String,
    /// Save the checkpoint trained when --model is not given.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the metrics as one JSON object after the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hp: HyperArgs,
}

/// Sizes the CPU thread pools before any kernel runs: candle's gemm reads
/// RAYON_NUM_THREADS, and the rayon global pool runs the rest.
fn set_threads(n: usize) {
    // `set_var` races with any other thread reading the environment (edition 2024 marks it
    // `unsafe` for that reason; this crate is edition 2021, where it is a safe call). It is
    // sound here because every caller is on the main thread, in `run`, before a tokio runtime,
    // the rayon pool or anything else has started a thread: `Cli::parse`, the logging set-up
    // and `Settings::load` before it spawn none.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// For the training commands: mimalloc keeps the memory it frees instead of handing it back
/// to the OS after its purge delay. A training step frees and allocates the same few-megabyte buffers
/// (the `[batch, batch]` scores and their gradients, candle's intermediates) every few
/// milliseconds, so the default purge had steps fault fresh zeroed pages in again
/// (88k minor faults in three epochs of ml-latest-small, against 1.1k with this; BENCHMARKS.md,
/// issue 31). The server keeps the default, so that memory freed after a bulk load is returned.
fn keep_freed_memory() {
    // -1: never purge.
    // SAFETY: mimalloc's option setter takes plain integers and may be called at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (include/mimalloc.h); libmimalloc-sys
/// does not name it. The test below pins it to the option's documented default.
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
}

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    let cfg = args.hp.config();
    let validate = !args.hp.no_validate;
    let (mut model, report) = match (&args.data, &args.split) {
        (Some(dir), _) => model::train_on_data(&cfg, dir, validate)?,
        (None, Some(dir)) => {
            let (mut m, r) = model::train_on_split(&cfg, dir, validate)?;
            let split = Split::load(dir, On::Test)?;
            let users = split.scored_users();
            let lists = eval::recommend(&m, &split, &users, eval::MAX_K)?;
            m.manifest_mut().metrics.test = eval::score(&lists, &split);
            println!(
                "test:\n{}",
                eval::format_metrics(&m.manifest().metrics.test)
            );
            (m, r)
        }
        (None, None) => unreachable!("clap requires --data or --split"),
    };
    model.manifest_mut().command = cfg.command.clone();
    model
        .save(&args.out)
        .with_context(|| format!("writing the checkpoint to {}", args.out.display()))?;
    println!(
        "wrote {} (version {}): best epoch {} of {}, {:.0} training examples/s, best validation after {:.1}s, validation R@20 per epoch {:?}",
        args.out.display(),
        model.version(),
        report.best_epoch,
        report.epochs_run,
        report.examples_per_sec,
        report.seconds_to_best,
        report
            .val_recall
            .iter()
            .map(|r| format!("{r:.4}"))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// `tandem eval --similar`: the item-to-item metrics on a split's known rows (train +
/// onboard) or on a data directory's interactions.
fn run_eval_similar(args: &EvalArgs) -> anyhow::Result<()> {
    let cfg = args.hp.config();
    let validate = !args.hp.no_validate;
    let (items, rows, source) = match (&args.data, &args.split) {
        (Some(dir), _) => {
            let d = tandem::data::Dataset::load(dir)?;
            (d.items, d.interactions, dir)
        }
        (None, Some(dir)) => {
            let s = Split::load(dir, On::Test)?;
            let rows = s.known_rows().cloned().collect();
            (s.items, rows, dir)
        }
        (None, None) => unreachable!("clap requires --split or --data"),
    };
    let model = match (&args.model, &args.data, &args.split) {
        (Some(dir), _, _) => TwoTower::load(dir)
            .with_context(|| format!("loading the checkpoint {}", dir.display()))?,
        (None, Some(dir), _) => model::train_on_data(&cfg, dir, validate)?.0,
        (None, None, Some(dir)) => model::train_on_split(&cfg, dir, validate)?.0,
        (None, None, None) => unreachable!("clap requires --split or --data"),
    };
    if args.model.is_none() {
        if let Some(out) = &args.out {
            model.save(out)?;
        }
    }
    let metrics = eval::similar_metrics(&model, &items, &rows, &eval::SimilarConfig::default())?;
    println!(
        "similar: data={} model={} query={:?}",
        source.display(),
        model.version(),
        model.manifest().similar
    );
    println!("{}", eval::format_similar(&metrics));
    if args.json {
        println!("{}", serde_json::to_string(&metrics)?);
    }
    Ok(())
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    if args.similar {
        return run_eval_similar(&args);
    }
    let split_dir = args
        .split
        .clone()
        .expect("clap requires --split without --similar");
    let on = if args.on == "val" { On::Val } else { On::Test };
    let split = Split::load(&split_dir, on)?;
    let cfg = args.hp.config();
    let model = match &args.model {
        Some(dir) => TwoTower::load(dir)
            .with_context(|| format!("loading the checkpoint {}", dir.display()))?,
        None => {
            let (m, report) = match on {
                On::Test => model::train_on_split(&cfg, &split_dir, !args.hp.no_validate)?,
                // Tuning: fit on val/train.csv, scoring val/test.csv after every epoch.
                On::Val => {
                    let val = if args.hp.no_validate {
                        None
                    } else {
                        Some(&split)
                    };
                    model::train::fit(&cfg, &split.items, &split.train, val, None)?
                }
            };
            eprintln!(
                "trained: best epoch {} of {}, {:.0} examples/s, validation R@20 per epoch {:?}",
                report.best_epoch, report.epochs_run, report.examples_per_sec, report.val_recall
            );
            if let Some(out) = &args.out {
                m.save(out)?;
            }
            m
        }
    };
    let users = split.scored_users();
    let lists = eval::recommend(&model, &split, &users, eval::MAX_K)?;
    let metrics = eval::score(&lists, &split);
    println!(
        "dataset={} on={} model={}",
        split_dir.display(),
        args.on,
        model.version()
    );
    println!("{}", eval::format_metrics(&metrics));
    if let Some(path) = &args.export_recs {
        eval::write_recs(path, &users, &lists)?;
        println!("wrote {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&metrics)?);
    }
    Ok(())
}

#[cfg(test)]
mod allocator_tests {
    use super::*;

    /// The option index is the one mimalloc reads `MIMALLOC_PURGE_DELAY` into: its neighbours
    /// default to 1 and 0, the purge delay to 1,000 ms (mimalloc v3's options.c).
    #[test]
    fn keep_freed_memory_sets_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment chose another default
        }
        // SAFETY: plain integer getter.
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, 1000);
        keep_freed_memory();
        assert_eq!(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }, -1);
    }
}
