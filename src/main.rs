use anyhow::Context;
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
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// ANN search on generated clustered vectors: build time, latency, recall against exact
    /// search, upsert visibility and memory, printed as one JSON line.
    Ann {
        /// Items in the generated catalog.
        #[arg(long, default_value_t = 100_000)]
        items: usize,
        /// Vector dimension.
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// Queries timed (each run unfiltered and, with --filter-selectivity, filtered).
        #[arg(long, default_value_t = 1_000)]
        queries: usize,
        /// Fractions of items a filtered query keeps, as whole categories (e.g. 0.1,0.01).
        #[arg(long, value_delimiter = ',')]
        filter_selectivity: Vec<f64>,
        /// Backend: edge (embedded), qdrant or exact.
        #[arg(long, default_value = "edge")]
        backend: String,
        /// Directory for the edge collections (default: a fresh temp dir, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench {
            what:
                BenchCommand::Ann {
                    items,
                    dim,
                    queries,
                    filter_selectivity,
                    backend,
                    dir,
                    seed,
                },
        } => bench_ann(
            tandem::index::bench::AnnBenchParams {
                items,
                dim,
                queries,
                filter_selectivity,
                seed,
            },
            &backend,
            dir,
        ),
    }
}

fn bench_ann(
    params: tandem::index::bench::AnnBenchParams,
    backend: &str,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    use tandem::config::{IndexBackend, Settings};
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,qdrant_edge=error".into()),
        )
        .init();
    let mut settings = Settings::load(None)?;
    settings.index.backend = match backend {
        "edge" | "embedded" => IndexBackend::Embedded,
        "qdrant" => IndexBackend::Qdrant,
        "exact" => IndexBackend::Exact,
        other => anyhow::bail!("--backend {other:?}: expected edge, qdrant or exact"),
    };
    // Never touch the serving alias: the bench gets its own collection name.
    settings.index.collection = format!("tandem_bench_{}", uuid::Uuid::new_v4().simple());
    let temp = dir.is_none();
    let dir = dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tandem-bench-{}", uuid::Uuid::new_v4()))
    });
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let index = tandem::index::open(&settings, &dir)
            .await
            .with_context(|| format!("opening the {backend} index"))?;
        let report = tandem::index::bench::run(index.as_ref(), backend, &params).await?;
        anyhow::Ok(report)
    });
    if temp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", serde_json::to_string(&report?)?);
    Ok(())
}
