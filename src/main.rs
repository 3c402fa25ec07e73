use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tandem::eval::{self, On, Split};
use tandem::model::{self, TrainConfig, TwoTower};

/// tandem: a recommendation service (two-tower model, Qdrant ANN, session-aware re-ranking).
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the two-tower model and write a checkpoint (model.safetensors + manifest.json).
    Train(TrainArgs),
    /// Score a checkpoint on a split directory with the offline protocol (trains one first
    /// when --model is not given).
    Eval(EvalArgs),
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
    /// Items with fewer training interactions get no id embedding.
    #[arg(long, default_value_t = 1)]
    min_item_count: usize,
    /// Popularity bucket given to items unseen in training (a prior; 1 = "seen once").
    #[arg(long, default_value_t = 1)]
    unseen_popularity_bucket: usize,
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
    #[arg(long)]
    split: PathBuf,
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
    // SAFETY (edition 2021 allows it safely): called first thing in main, before any thread
    // is spawned, so no other thread reads the environment concurrently.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => {
            set_threads(args.hp.threads);
            init_logging();
            run_train(args)
        }
        Command::Eval(args) => {
            set_threads(args.hp.threads);
            init_logging();
            run_eval(args)
        }
    }
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

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    let on = if args.on == "val" { On::Val } else { On::Test };
    let split = Split::load(&args.split, on)?;
    let cfg = args.hp.config();
    let model = match &args.model {
        Some(dir) => TwoTower::load(dir)
            .with_context(|| format!("loading the checkpoint {}", dir.display()))?,
        None => {
            let (m, report) = match on {
                On::Test => model::train_on_split(&cfg, &args.split, !args.hp.no_validate)?,
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
        args.split.display(),
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
