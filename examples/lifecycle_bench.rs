//! Model switch under load: steady-rate recommendation traffic against a running `tandem
//! serve` while a registered version is activated and then rolled back, and then an A/B
//! test of the two versions side by side. Reports, per phase (before, during activation,
//! after, during rollback, after, A/B test), the requests, errors and p50/p99/max latency,
//! the time from the activate call to the switch, and the A/B test's per-variant report.
//!
//! Each user first clicks a few items, so that requests take the personal path (user tower
//! and ANN search), which is what a switch changes.
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
    /// Clicks posted for each user before the traffic starts (0: every request is trending).
    #[arg(long, default_value_t = 3)]
    clicks: usize,
}

const PHASES: [&str; 6] = [
    "before",
    "during activation",
    "after activation",
    "during rollback",
    "after rollback",
    "a/b test",
];
const AB_PHASE: usize = 5;
/// Requests slower than this are listed with the time they were sent.
const SLOW_MS: u64 = 50;

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
    seed_clicks(&http, &args).await?;
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
    // Responses of the A/B phase by the model that answered: [old, new].
    let ab_models = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    // Requests slower than SLOW_MS: (phase, ms since start when sent, latency ms), to see
    // where in a phase the tail sits.
    let slow: Arc<Mutex<Vec<(usize, u64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let sender = {
        let (http, stats, phase, stop, first_new, ab_models, slow) = (
            http.clone(),
            stats.clone(),
            phase.clone(),
            stop.clone(),
            first_new.clone(),
            ab_models.clone(),
            slow.clone(),
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
                let (stats, phase, first_new, target, ab_models, slow) = (
                    stats.clone(),
                    phase.clone(),
                    first_new.clone(),
                    target.clone(),
                    ab_models.clone(),
                    slow.clone(),
                );
                tokio::spawn(async move {
                    let p = phase.load(Ordering::Relaxed);
                    let t = Instant::now();
                    let sent_ms = started.elapsed().as_millis() as u64;
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
                    if us > SLOW_MS * 1000 {
                        slow.lock().push((p, sent_ms, us as f64 / 1000.0));
                    }
                    let mut s = stats[p].lock();
                    match outcome {
                        Ok(is_new) => {
                            let _ = s.hist.record(us.max(1));
                            if p == AB_PHASE {
                                ab_models[usize::from(is_new)].fetch_add(1, Ordering::Relaxed);
                            }
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
    let rollback_at_ms = t_rollback.duration_since(started).as_millis() as u64;
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
    // Both versions side by side: the rolled-back one kept its collection, so it can serve
    // an experiment arm at once.
    let experiment = serde_json::json!({"experiments": [{
        "name": "bench-ab", "salt": format!("bench-{}", std::process::id()),
        "variants": [
            {"name": "control", "share": 0.5},
            {"name": "challenger", "share": 0.5, "model_version": args.version}
        ]
    }]});
    let t_put = Instant::now();
    let r = http
        .put(format!("{}/admin/experiments", args.url))
        .header("X-API-Key", &args.api_key)
        .json(&experiment)
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "PUT /admin/experiments: {}",
        r.text().await?
    );
    let put_secs = t_put.elapsed().as_secs_f64();
    phase.store(AB_PHASE, Ordering::Relaxed);
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
    println!(
        "a/b test: PUT /admin/experiments took {put_secs:.3} s; responses by model: {} {}, {} {}",
        old,
        ab_models[0].load(Ordering::Relaxed),
        args.version,
        ab_models[1].load(Ordering::Relaxed)
    );
    let report: serde_json::Value = http
        .get(format!("{}/admin/experiments/bench-ab", args.url))
        .header("X-API-Key", &args.api_key)
        .send()
        .await?
        .json()
        .await?;
    for v in report["variants"].as_array().into_iter().flatten() {
        println!(
            "  variant {} (model {}): {} impressions, server p99 {} ms",
            v["name"], v["model_version"], v["impressions"], v["p99_ms"]
        );
    }
    let switch_at_ms = activate_at_ms + (activation_secs * 1000.0) as u64;
    println!(
        "requests over {SLOW_MS} ms after the activation (switch at {:.1} s, rollback call at {:.1} s):",
        switch_at_ms as f64 / 1000.0,
        rollback_at_ms as f64 / 1000.0
    );
    for (p, sent, ms) in slow.lock().iter().filter(|(p, ..)| *p >= 2) {
        println!(
            "  {}: sent at {:.3} s, {ms:.1} ms",
            PHASES[*p],
            *sent as f64 / 1000.0
        );
    }
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

/// Each user clicks `--clicks` of the catalog's most popular items (a different slice per
/// user), so that the traffic takes the personal path.
async fn seed_clicks(http: &reqwest::Client, args: &Args) -> anyhow::Result<()> {
    if args.clicks == 0 {
        return Ok(());
    }
    let popular: serde_json::Value = http
        .get(format!("{}/v1/trending?k=200", args.url))
        .send()
        .await?
        .json()
        .await?;
    let items: Vec<String> = popular["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["item_id"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(!items.is_empty(), "the catalog is empty");
    let started = Instant::now();
    let mut batch = Vec::new();
    for u in 0..args.users {
        for c in 0..args.clicks {
            let item = &items[(u as usize * 7 + c * 13) % items.len()];
            batch.push(
                serde_json::json!({"user_id": format!("u{u}"), "item_id": item, "type": "click"}),
            );
        }
        if batch.len() >= 500 || u + 1 == args.users {
            let r = http
                .post(format!("{}/v1/events", args.url))
                .json(&batch)
                .send()
                .await?;
            anyhow::ensure!(
                r.status().is_success(),
                "POST /v1/events: {}",
                r.text().await?
            );
            batch.clear();
        }
    }
    eprintln!(
        "seeded {} clicks for {} users in {:.1} s",
        args.users as usize * args.clicks,
        args.users,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
