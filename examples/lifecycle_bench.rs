//! Model switch under load: steady-rate recommendation traffic against a running `tandem
//! serve` while a registered version is activated and then rolled back. Reports, per phase
//! (before, during activation, after, during rollback, after), the requests, errors and
//! p50/p99/max latency, plus the time from the activate call to the switch.
//!
//! ```text
//! cargo run --release --example lifecycle_bench -- --url http://127.0.0.1:18081 \
//!     --api-key KEY --version tt-b --rate 200
//! ```

use clap::Parser;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::Rng;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::http::admin_client::AdminClient;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:18081")]
    url: String,
    #[arg(long, env = "TANDEM_ADMIN_KEY")]
    api_key: String,
    /// A registered version to activate (the active one is rolled back to afterwards).
    #[arg(long)]
    version: String,
    /// Requests per second, sent open-loop (a slow answer does not slow the sender).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Seconds of traffic before the activation and after each switch.
    #[arg(long, default_value_t = 15)]
    phase_secs: u64,
    /// Distinct user ids the traffic picks from.
    #[arg(long, default_value_t = 2_000)]
    users: u32,
}

const PHASES: [&str; 5] = [
    "before",
    "during activation",
    "after activation",
    "during rollback",
    "after rollback",
];

struct PhaseStats {
    hist: Histogram<u64>,
    errors: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(10))
        .build()?;
    let admin = AdminClient::new(&args.url, Some(args.api_key.clone()));
    let before = admin.list().await?;
    let old = before
        .active
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no active model"))?;
    let stats: Arc<Vec<Mutex<PhaseStats>>> = Arc::new(
        (0..PHASES.len())
            .map(|_| {
                Mutex::new(PhaseStats {
                    hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
                    errors: 0,
                })
            })
            .collect(),
    );
    let phase = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // Milliseconds since start at which a response first carried the new version (0: not yet).
    let first_new = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let sender = {
        let (http, stats, phase, stop, first_new) = (
            http.clone(),
            stats.clone(),
            phase.clone(),
            stop.clone(),
            first_new.clone(),
        );
        let url = format!("{}/v1/recommendations", args.url);
        let target = args.version.clone();
        let users = args.users;
        let period = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let user = rand::thread_rng().gen_range(0..users);
                let req = http.get(format!("{url}?user_id=u{user}&k=20"));
                let (stats, phase, first_new, target) = (
                    stats.clone(),
                    phase.clone(),
                    first_new.clone(),
                    target.clone(),
                );
                tokio::spawn(async move {
                    let p = phase.load(Ordering::Relaxed);
                    let t = Instant::now();
                    let outcome = match req.send().await {
                        Ok(r) if r.status().is_success() => {
                            match r.json::<serde_json::Value>().await {
                                Ok(body) => Ok(body["model_version"] == target.as_str()),
                                Err(e) => Err(e.to_string()),
                            }
                        }
                        Ok(r) => Err(format!("status {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    };
                    let us = t.elapsed().as_micros() as u64;
                    let mut s = stats[p].lock();
                    match outcome {
                        Ok(is_new) => {
                            let _ = s.hist.record(us.max(1));
                            if is_new && first_new.load(Ordering::Relaxed) == 0 {
                                let ms = started.elapsed().as_millis() as u64;
                                let _ = first_new.compare_exchange(
                                    0,
                                    ms.max(1),
                                    Ordering::Relaxed,
                                    Ordering::Relaxed,
                                );
                            }
                        }
                        Err(e) => {
                            s.errors += 1;
                            eprintln!("error in {}: {e}", PHASES[p]);
                        }
                    }
                });
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(args.phase_secs)).await;
    phase.store(1, Ordering::Relaxed);
    let t_activate = Instant::now();
    let activate_at_ms = started.elapsed().as_millis() as u64;
    admin.activate(&args.version).await?;
    let mut last = String::new();
    admin
        .wait_active(&args.version, Duration::from_secs(3600), |m| {
            if let Some(p) = &m.progress {
                let line = format!("{} {}/{}", p.phase, p.done, p.total);
                if line != last {
                    eprintln!("[{:>6.1}s] {line}", t_activate.elapsed().as_secs_f64());
                    last = line;
                }
            }
        })
        .await?;
    let activation_secs = t_activate.elapsed().as_secs_f64();
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.phase_secs)).await;
    phase.store(3, Ordering::Relaxed);
    // The activation is reported active at the switch; its catch-up (moving the catalog to
    // the new vectors) may still hold the lifecycle lock, and then rollback answers 409 busy.
    let t_wait = Instant::now();
    let (back, t_rollback) = loop {
        let t = Instant::now();
        match admin.rollback().await {
            Err(tandem::http::admin_client::ClientError::Api { status: 409, .. })
                if t_wait.elapsed() < Duration::from_secs(600) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => break (other?, t),
        }
    };
    let rollback_secs = t_rollback.elapsed().as_secs_f64();
    let busy_secs = t_rollback.duration_since(t_wait).as_secs_f64();
    anyhow::ensure!(
        back.active.version == old,
        "rolled back to {}",
        back.active.version
    );
    // The rollback call returns after the switch; keep the phase open briefly so the
    // reconciliation that follows it is measured as "during".
    tokio::time::sleep(Duration::from_secs(2)).await;
    phase.store(4, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.phase_secs)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.await;
    tokio::time::sleep(Duration::from_secs(2)).await; // let the last requests land

    let first_new_ms = first_new.load(Ordering::Relaxed);
    println!(
        "rate {} req/s, {} users; switched {} -> {} -> {}",
        args.rate, args.users, old, args.version, old
    );
    println!(
        "activate: {:.2} s from the activate call until the registry reported it active; first response from the new model {:.2} s after the call",
        activation_secs,
        (first_new_ms.saturating_sub(activate_at_ms)) as f64 / 1000.0
    );
    println!(
        "rollback: {:.3} s for the rollback call, after {:.1} s of 409 busy while the activation caught up",
        rollback_secs, busy_secs
    );
    println!("| phase | requests | errors | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in PHASES.iter().zip(stats.iter()) {
        let s = s.lock();
        let q = |x: f64| s.hist.value_at_quantile(x) as f64 / 1000.0;
        println!(
            "| {name} | {} | {} | {:.2} | {:.2} | {:.2} |",
            s.hist.len(),
            s.errors,
            q(0.5),
            q(0.99),
            s.hist.max() as f64 / 1000.0
        );
    }
    Ok(())
}
