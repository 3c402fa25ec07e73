//! Session store benchmark: Redis ingestion rate with a no-loss check, recent-list read
//! latency, how fast calls fail while Redis is down or hung, and the memory backend's
//! fsynced ingestion rate.
//!
//! `cargo run --release --example session_bench -- --help`

use clap::Parser;
use hdrhistogram::Histogram;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::config::SessionSettings;
use tandem::domain::{EventType, ItemId, UserId};
use tandem::session::{Actor, Event, MemoryStore, RedisStore, SessionError, SessionStore};

#[derive(Parser)]
struct Args {
    /// Redis to ingest into (a unique key prefix is used and deleted afterwards).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Events to ingest.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per append call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent appending tasks.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Users the events are spread over.
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Recent-list reads to time.
    #[arg(long, default_value_t = 20_000)]
    reads: usize,
    /// Skip the Redis-down measurement (it starts and kills its own redis-server).
    #[arg(long)]
    skip_outage: bool,
}

fn make_events(n: usize, users: usize, seed: usize) -> Vec<Event> {
    let now = tandem::session::event::now_ms();
    let types = [
        EventType::View,
        EventType::Click,
        EventType::AddToCart,
        EventType::Purchase,
    ];
    (0..n)
        .map(|i| {
            let k = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
            Event {
                event_id: uuid::Uuid::new_v4(),
                user_id: Some(UserId::parse(format!("u{}", k % users)).unwrap()),
                session_id: None,
                item_id: ItemId::parse(format!("i{}", (k / 7) % 5000)).unwrap(),
                event_type: types[k % 4],
                value: None,
                timestamp_ms: now,
                variant: None,
                context: None,
                categories: vec![format!("c{}", k % 20)],
            }
        })
        .collect()
}

async fn ingest(
    store: Arc<dyn SessionStore>,
    events: Vec<Event>,
    batch: usize,
    concurrency: usize,
) -> (usize, Duration) {
    let batches: Vec<Vec<Event>> = events.chunks(batch).map(|c| c.to_vec()).collect();
    let queue = Arc::new(parking_lot::Mutex::new(batches));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let store = store.clone();
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut acked = 0usize;
                loop {
                    let Some(b) = queue.lock().pop() else {
                        return acked;
                    };
                    match store.append(&b).await {
                        Ok(out) => acked += out.accepted,
                        Err(e) => eprintln!("append failed: {e}"),
                    }
                }
            })
        })
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    (acked, started.elapsed())
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: n={} p50={:.3} ms p99={:.3} ms p99.9={:.3} ms max={:.3} ms",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

async fn time_calls(store: &RedisStore, n: usize) -> (Histogram<u64>, usize) {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let mut unavailable = 0;
    let actor = Actor::User(UserId::parse("u1").unwrap());
    for _ in 0..n {
        let t = Instant::now();
        if let Err(SessionError::Unavailable(_)) = store.recent(&actor, 50).await {
            unavailable += 1;
        }
        h.record(t.elapsed().as_micros() as u64).unwrap();
    }
    (h, unavailable)
}

async fn outage(base: &SessionSettings) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let settings = SessionSettings {
        redis_url: format!("redis://127.0.0.1:{port}"),
        ..base.clone()
    };
    let store = RedisStore::connect(&settings).await.unwrap();
    store.ping().await.unwrap();
    // Hung: the process is stopped, so connections stay open and nothing answers.
    Command::new("kill")
        .args(["-STOP", &child.id().to_string()])
        .status()
        .unwrap();
    let (h, unavailable) = time_calls(&store, 20).await;
    report(
        &format!("recent() while Redis is hung (SIGSTOP), {unavailable} unavailable"),
        &h,
    );
    Command::new("kill")
        .args(["-CONT", &child.id().to_string()])
        .status()
        .unwrap();
    store.ping().await.unwrap();
    // Dead: the process is gone, so connections are refused.
    child.kill().unwrap();
    child.wait().unwrap();
    let (h, unavailable) = time_calls(&store, 200).await;
    report(
        &format!("recent() while Redis is dead (SIGKILL), {unavailable} unavailable"),
        &h,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let prefix = format!("tandem-bench-{}", uuid::Uuid::new_v4().simple());
    let settings = SessionSettings {
        redis_url: args.redis_url.clone(),
        key_prefix: prefix.clone(),
        ..Default::default()
    };
    println!(
        "events={} batch={} concurrency={} users={}",
        args.events, args.batch, args.concurrency, args.users
    );

    let redis = Arc::new(RedisStore::connect(&settings).await?);
    redis.ping().await?;
    let events = make_events(args.events, args.users, 1);
    let (acked, took) = ingest(redis.clone(), events, args.batch, args.concurrency).await;
    let in_stream = redis.stream_len().await?;
    println!(
        "redis ingest: {acked} acknowledged in {:.2} s = {:.0} events/s; stream holds {in_stream}; lost {}",
        took.as_secs_f64(),
        acked as f64 / took.as_secs_f64(),
        acked as i64 - in_stream as i64
    );
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..args.reads {
        let actor = Actor::User(UserId::parse(format!("u{}", i % args.users)).unwrap());
        let t = Instant::now();
        let items = redis.recent(&actor, 50).await?;
        h.record(t.elapsed().as_micros() as u64).unwrap();
        std::hint::black_box(items);
    }
    report("redis recent(user, 50) sequential reads", &h);
    redis.delete_all_keys().await?;

    let dir = tempfile::tempdir()?;
    let log = dir.path().join("events.log");
    let memory: Arc<dyn SessionStore> = Arc::new(MemoryStore::open(&settings, &log)?);
    let n = args.events.min(100_000);
    let (acked, took) = ingest(
        memory.clone(),
        make_events(n, args.users, 2),
        args.batch,
        args.concurrency,
    )
    .await;
    let logged = memory.read_log(0, i64::MAX).await?.len();
    println!(
        "memory ingest (fsynced log): {acked} acknowledged in {:.2} s = {:.0} events/s; log holds {logged}",
        took.as_secs_f64(),
        acked as f64 / took.as_secs_f64()
    );
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..args.reads {
        let actor = Actor::User(UserId::parse(format!("u{}", i % args.users)).unwrap());
        let t = Instant::now();
        std::hint::black_box(memory.recent(&actor, 50).await?);
        h.record(t.elapsed().as_nanos() as u64 / 1000).unwrap();
    }
    report("memory recent(user, 50) reads", &h);

    if !args.skip_outage {
        outage(&settings).await;
    }
    Ok(())
}
