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
    /// Serve the HTTP API (recommendations, similar items, catalog, events, onboarding).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Settings file (TOML); `TANDEM_*` environment variables override it.
    #[arg(long, env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides `bind`).
    #[arg(long)]
    bind: Option<String>,
    /// Checkpoint directory to serve (overrides `model_path`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Data dir whose items file is the catalog (overrides `server.catalog_dir`); indexed at
    /// start-up when the index is empty.
    #[arg(long)]
    catalog: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging();
    let mut settings = tandem::config::Settings::load(args.config.as_deref())?;
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}
