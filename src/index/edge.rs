//! `edge`: the Qdrant engine in-process (crate `qdrant-edge` =0.7.0), persisted under
//! `<data_dir>/index/`. The default backend.
//!
//! Layout: one directory per collection version (`<root>/<version>/shard` holds the engine's
//! files, `<root>/<version>/meta.json` the dimension), and `<root>/CURRENT` naming the live
//! version, replaced atomically (write a temp file, then rename).
//!
//! The engine's pitfalls (QDRANT_EDGE.md) shape this file:
//! - `flush()` panics if another thread writes at the same time, so every write, flush and
//!   `optimize()` of a collection runs on that collection's one writer thread, fed by a
//!   channel. Queued writes are applied together and flushed once (group commit) before any
//!   of them is acknowledged, because unflushed writes are lost on a crash.
//! - Nothing builds the HNSW graph by itself: `finalize_version` runs `optimize()` on the
//!   writer thread while searches continue.
//! - Payloads read back from the engine cost milliseconds, so results are filled from
//!   tandem's RAM copy ([`PointStore`]: item ids, live fields, filterable attributes and
//!   the vectors, which the category blocks and the catalog share), rebuilt by a scroll when
//!   a version is opened. Whole payloads (titles, tags) are read from the engine only by
//!   `fetch` and `scroll`.
//! - Broad filters that match whole clusters defeat filtered graph search, and the engine's
//!   exact scan of a filtered set is slow, so a filter on categories that hold at most
//!   `scan_max_points` points is answered exactly from tandem's per-category RAM blocks
//!   ([`CategoryBlocks`]); other filters follow [`super::plan`].
//! - New collections keep an int8 copy of the vectors in RAM (scalar quantization); graph
//!   walks and scans score on it and re-score the best `2 × k` on the full vectors.
//!   Collections built before it keep their config when reopened.

use super::blocks::{CategoryBlocks, Fit, LoadedRow};
use super::payloads::{
    self, PointStore, RamPoint, F_AVAILABLE, F_CATEGORIES, F_CREATED_AT, F_PRICE,
};
use super::plan::{Plan, PlanConfig};
use super::snapshot::{self, SnapPoint};
use super::validate::{check_dim, check_points, check_query, check_version_name, normalized, unit};
use super::{Hit, IndexError, IndexPoint, Payload, PayloadPatch, ScrollPage, Vector, VectorIndex};
use crate::domain::{point_id, AttrFilter, Filter, ItemId};
use async_trait::async_trait;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    BoolIndexParams, Condition, CountRequest, CreateIndex, Distance, EdgeConfig,
    EdgeOptimizersConfig, EdgeShard, EdgeVectorParams, FieldCondition, FieldIndexOperations,
    FloatIndexParams, HasIdCondition, HnswIndexConfig, IntegerIndexParams, IsEmptyCondition,
    JsonPath, KeywordIndexParams, Match, NamedQuery, PayloadFieldSchema, PayloadOps,
    PayloadSchemaParams, PointId, PointInsertOperations, PointOperations, PointStruct,
    QuantizationConfig, QuantizationSearchParams, QueryEnum, QueryRequest, Range,
    ScalarQuantizationConfig, ScalarType, ScoringQuery, ScrollRequest, SearchParams, SetPayloadOp,
    UpdateOperation, VectorStructInternal, WalOptions, WithPayloadInterface, WithVector,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use uuid::Uuid;

const CURRENT: &str = "CURRENT";
const META: &str = "meta.json";
const SHARD_DIR: &str = "shard";
/// Points read per scroll page when rebuilding the RAM payload copy.
const SCROLL_PAGE: usize = 10_000;
/// Points of a RAM snapshot compared with the engine's payloads before it is used.
const SNAPSHOT_SAMPLE: usize = 64;
/// Writes applied together before one flush.
const MAX_GROUP: usize = 256;
/// Rows of a category block re-encoded per hold of the blocks' lock when the block is fitted
/// again (about 1 ms at d = 64).
const FIT_CHUNK: usize = 4_096;

/// Tuning of the embedded engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeOptions {
    pub plan: PlanConfig,
    /// HNSW graph degree.
    pub m: usize,
    /// Beam width while building the graph.
    pub ef_construct: usize,
    /// Segments larger than this (KB of vectors) get an HNSW graph; `None`: the engine's
    /// default (10 MB, about 40k points at d=64). Tests lower it to exercise the graph.
    pub indexing_threshold_kb: Option<usize>,
    /// Searches touching fewer than this many KB of vectors scan instead of walking the
    /// graph; `None`: the engine's default (10 MB).
    pub full_scan_threshold_kb: Option<usize>,
    /// Threads of the HNSW build; 0 = every core.
    pub indexing_threads: usize,
    /// Keep an int8 copy of the vectors in RAM (scalar quantization): graph walks and scans
    /// score on it, then the best `oversampling × k` are re-scored on the full vectors.
    pub quantization: bool,
    /// A filter whose included categories hold at most this many points is answered by an
    /// exact scan of tandem's per-category RAM blocks ([`CategoryBlocks`]) instead of the
    /// engine; 0 turns the blocks off (and saves their memory: up to 5 × dim + 4 bytes per
    /// point).
    pub scan_max_points: usize,
    /// Attribute names that get payload indexes in collections created from now on
    /// (`[catalog] filterable` with `region` and `language`).
    pub filterable: Vec<String>,
}

impl Default for EdgeOptions {
    fn default() -> Self {
        EdgeOptions {
            plan: PlanConfig::default(),
            m: 16,
            ef_construct: 100,
            indexing_threshold_kb: None,
            full_scan_threshold_kb: None,
            indexing_threads: 0,
            quantization: true,
            scan_max_points: 200_000,
            filterable: crate::config::CatalogSettings::default().indexed_names(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    dim: usize,
}

fn backend(context: &str) -> impl Fn(qdrant_edge::OperationError) -> IndexError + '_ {
    move |e| IndexError::Backend(format!("{context}: {e}"))
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> IndexError {
    move |e| IndexError::Backend(format!("{context}: {e}"))
}

enum WriteOp {
    /// Apply in order; flush before acknowledging when `durable`.
    Update {
        ops: Vec<UpdateOperation>,
        durable: bool,
    },
    /// Build the HNSW graph and payload indexes, then flush.
    Optimize,
    /// Panics in the writer thread, as an engine bug would (tests only).
    #[cfg(test)]
    Crash,
}

/// Candidates scored on the int8 vectors per result, re-scored on the full vectors.
const OVERSAMPLING: f64 = 2.0;

/// A write applied but not yet acknowledged: its reply channel and its outcome.
type Pending = (
    tokio::sync::oneshot::Sender<Result<(), String>>,
    Result<(), String>,
);

struct WriteCmd {
    op: WriteOp,
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Flushes, turning the engine's panic into an error so that the writer thread survives.
fn flush(shard: &EdgeShard) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.flush()))
        .map_err(|_| "flush failed (the engine panicked)".to_string())
}

/// The writer thread of one collection: the only thread that writes, flushes or optimizes it.
fn writer_loop(shard: Arc<EdgeShard>, snap: Arc<SnapshotFile>, rx: mpsc::Receiver<WriteCmd>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(cmd) => group.push(cmd),
                Err(_) => break,
            }
        }
        let mut pending: Vec<Pending> = Vec::new();
        let mut need_flush = false;
        for cmd in group {
            match cmd.op {
                WriteOp::Update { ops, durable } => {
                    let r = match ops.is_empty() {
                        true => Ok(()),
                        false => snap.before_write(),
                    }
                    .and_then(|_| {
                        ops.into_iter()
                            .try_for_each(|op| shard.update(op))
                            .map_err(|e| e.to_string())
                    });
                    need_flush |= durable && r.is_ok();
                    pending.push((cmd.reply, r));
                }
                WriteOp::Optimize => {
                    // Acknowledge what came before, then optimize with nothing in flight.
                    acknowledge(&shard, &mut pending, &mut need_flush);
                    let started = Instant::now();
                    let cpu = crate::telemetry::process_cpu_secs();
                    let heartbeat = Heartbeat::start("building the HNSW graph");
                    let r = shard
                        .optimize()
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                        .and_then(|_| flush(&shard));
                    drop(heartbeat);
                    tracing::info!(
                        secs = started.elapsed().as_secs_f64(),
                        // The whole process's, which at start-up is the build's.
                        cpu_secs = crate::telemetry::process_cpu_secs() - cpu,
                        "index optimized"
                    );
                    release_freed_memory();
                    let _ = cmd.reply.send(r);
                }
                #[cfg(test)]
                WriteOp::Crash => panic!("injected engine panic in the writer thread"),
            }
        }
        acknowledge(&shard, &mut pending, &mut need_flush);
    }
}

/// Logs `what` with the time so far every [`HEARTBEAT`] until dropped: the engine's graph
/// build is one call that runs for minutes at 1M points and reports nothing itself.
struct Heartbeat {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

impl Heartbeat {
    fn start(what: &'static str) -> Heartbeat {
        let (stop, rx) = mpsc::channel::<()>();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(HEARTBEAT) {
                tracing::info!(secs = started.elapsed().as_secs(), "{what}");
            }
        });
        Heartbeat {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hands the heap that `optimize()` freed back to the OS. The build peaks at about twice
/// the serving footprint, and glibc keeps freed arenas mapped, so without this a process that
/// built its index serves with the build's high-water mark as its RSS.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unmaps, from this process, the pages of a collection's files that opening it read once
/// and serving does not read: the payload storage (read back only by `fetch` and `scroll`)
/// and the full-precision vectors (graph walks and scans score on the int8 copy in RAM; the
/// few rows a query re-scores fault back in). Opening a 1M collection scrolls every payload
/// and vector (about 600 MB of files), and those pages would otherwise stay resident in the
/// process for as long as it runs. They stay in the page cache (the kernel reclaims them
/// when it needs to) and are read again on demand, so nothing changes but what this process
/// holds mapped. Only shared mappings are released: they hold no changes that are not in the
/// file, whereas a private mapping's changed pages would be lost. Returns the bytes released
/// from mappings (an upper bound on the resident bytes freed).
fn release_read_once_pages(shard_dir: &Path) -> u64 {
    #[cfg(target_os = "linux")]
    {
        let Ok(dir) = std::fs::canonicalize(shard_dir) else {
            return 0;
        };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        let mut released = 0;
        for line in maps.lines() {
            // start-end perms offset device inode path
            let mut fields = line.splitn(6, ' ');
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let path = Path::new(fields.nth(3).unwrap_or("").trim_start());
            let read_once = ["payload_storage", "vector_storage"]
                .iter()
                .any(|part| path.components().any(|c| c.as_os_str() == *part));
            if !perms.ends_with('s') || !read_once || !path.starts_with(&dir) {
                continue;
            }
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            // SAFETY: the range is a whole mapping of this process, as listed by the kernel;
            // MADV_DONTNEED on a shared file mapping only drops page-table entries (a later
            // access reads the page from the file again) and changes no memory contents.
            let ok = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED)
            } == 0;
            if ok {
                released += (end - start) as u64;
            }
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = shard_dir;
        0
    }
}

fn acknowledge(shard: &EdgeShard, pending: &mut Vec<Pending>, need_flush: &mut bool) {
    let flushed = if std::mem::take(need_flush) {
        flush(shard)
    } else {
        Ok(())
    };
    for (reply, r) in pending.drain(..) {
        let r = r.and_then(|_| flushed.clone());
        let _ = reply.send(r);
    }
}

/// Capacity of one segment of the engine's WAL (qdrant-edge's default is 32 MiB, each file
/// allocated whole): the WAL of a collection holds at most what one process wrote since it
/// opened it (see [`drop_unread_wal`]), so smaller files keep an idle collection small.
const WAL_SEGMENT_BYTES: usize = 4 << 20;

/// qdrant-edge 0.7 writes every update to its WAL but never reads it back: `EdgeShard::load`
/// loads the segments alone (flushed data lives there; an unflushed write is lost on a crash
/// whatever the WAL holds, which is why the catalog journal exists), and the shard offers no
/// way to acknowledge or truncate it (its `wal` field is private). Left alone it grows with
/// every write for as long as the collection lives (368 MB after 1M points). So before a
/// collection is opened its WAL is removed, and the engine starts an empty one: the WAL is
/// bounded by what one process writes between two starts. Done under the WAL's own lock (a
/// `flock` on its directory, as the engine takes it), so a WAL that another process holds is
/// left alone, and the load that follows names that process. Returns the bytes freed.
///
/// The new WAL goes on numbering where the segments are ([`continue_wal_numbering`]): the
/// engine numbers each write by its WAL position and skips a write to a point whose stored
/// version is newer, so a WAL started again at 0 made it drop, silently, a later process's
/// patches and deletes of the points an earlier process wrote.
fn drop_unread_wal(shard_dir: &Path) -> Result<u64, IndexError> {
    let wal = shard_dir.join("wal");
    let handle = match std::fs::File::open(&wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(format!("cannot open {}", wal.display()))(e)),
    };
    match handle.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(0),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(io(format!("cannot lock {}", wal.display()))(e))
        }
    }
    let bytes = wal_bytes(shard_dir);
    let next = segments_version(shard_dir)? + 1;
    std::fs::remove_dir_all(&wal).map_err(io(format!("cannot remove {}", wal.display())))?;
    continue_wal_numbering(&wal, next)?;
    Ok(bytes)
}

/// The newest write any of a shard's segments has applied: the largest `version` in their
/// `segment.json` (qdrant-edge 0.7's segment state file), 0 without segments.
fn segments_version(shard_dir: &Path) -> Result<u64, IndexError> {
    let dir = shard_dir.join("segments");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(format!("cannot list {}", dir.display()))(e)),
    };
    let mut newest = 0;
    for entry in entries {
        let path = entry
            .map_err(io(format!("cannot list {}", dir.display())))?
            .path()
            .join("segment.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("cannot read {}", path.display()))(e)),
        };
        let state: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| IndexError::Backend(format!("{}: {e}", path.display())))?;
        newest = newest.max(state["version"].as_u64().unwrap_or(0));
    }
    Ok(newest)
}

/// Creates an empty WAL in `wal` whose first write gets number `next`: one closed segment
/// named `closed-<next>` that holds no entry (the layout of qdrant-edge 0.7's
/// `Wal::generate_empty_wal_starting_at_index`, which the crate does not export: the magic
/// `wal`, format 0, a CRC seed, then zeros, where an entry would start).
fn continue_wal_numbering(wal: &Path, next: u64) -> Result<(), IndexError> {
    const EMPTY_SEGMENT_BYTES: usize = 4096;
    let mut segment = vec![0u8; EMPTY_SEGMENT_BYTES];
    segment[..3].copy_from_slice(b"wal");
    segment[4..8].copy_from_slice(&0x7a6e_d3c1u32.to_le_bytes());
    let path = wal.join(format!("closed-{next}"));
    std::fs::create_dir(wal)
        .and_then(|_| std::fs::write(&path, &segment))
        .and_then(|_| std::fs::File::open(&path)?.sync_all())
        .and_then(|_| std::fs::File::open(wal)?.sync_all())
        .map_err(io(format!("cannot create {}", path.display())))
}

/// The bytes of the files in a shard's WAL directory.
fn wal_bytes(shard_dir: &Path) -> u64 {
    std::fs::read_dir(shard_dir.join("wal"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Runs one write of a collection (the engine's update and the in-memory mirrors that
/// follow it: payloads, category blocks) on a task of its own, and awaits it. The engine
/// takes a write on its writer thread as soon as it is sent, and the mirrors are updated
/// when its reply comes back: a caller's future dropped in between (a request timeout, a
/// client gone, a budget) would leave the engine and the mirrors disagreeing, so that a
/// deleted item could still be found by a scan of the blocks. A spawned task is never
/// dropped half way: the write finishes as one unit whatever happens to the caller.
async fn whole(
    write: impl std::future::Future<Output = Result<(), IndexError>> + Send + 'static,
) -> Result<(), IndexError> {
    tokio::spawn(write)
        .await
        .map_err(|e| IndexError::Backend(format!("index write task: {e}")))?
}

/// A collection's RAM snapshot file ([`snapshot`]), shared by the collection and its writer
/// thread: the thread counts the writes it applies and removes the file before the first
/// write after it was installed, so that a restart never reads a RAM copy that lacks an
/// acknowledged write.
struct SnapshotFile {
    path: PathBuf,
    state: Mutex<SnapState>,
}

struct SnapState {
    /// The file may exist: it goes before the next write is applied.
    on_disk: bool,
    /// The file holds this RAM copy (it was read from it, or written by this process, and
    /// no write came since): a clean stop need not write it again.
    current: bool,
    /// Writes applied to the engine since the collection was opened.
    applied: u64,
}

impl SnapshotFile {
    fn new(path: PathBuf) -> Self {
        let on_disk = path.exists();
        SnapshotFile {
            path,
            state: Mutex::new(SnapState {
                on_disk,
                current: false,
                applied: 0,
            }),
        }
    }

    /// On the writer thread, before it applies a write: counts the write, and removes the
    /// snapshot durably if there is one. If it cannot, the write is refused.
    fn before_write(&self) -> Result<(), String> {
        let mut s = self.state.lock();
        s.applied += 1;
        if s.on_disk {
            match std::fs::remove_file(&self.path) {
                Ok(()) => snapshot::sync_dir(&self.path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(|e| {
                format!(
                    "cannot remove the RAM snapshot {} before a write: {e}",
                    self.path.display()
                )
            })?;
            s.on_disk = false;
        }
        s.current = false;
        Ok(())
    }
}

/// One write of a collection under way, from before the engine applies it until its RAM
/// copies have it too ([`WriteTicket::done`]). A snapshot is only taken while none is;
/// a ticket dropped before it is done (a write that failed, or a task cut short) means the
/// RAM copy may disagree with the engine, and no snapshot is taken for as long as the
/// collection stays open.
struct WriteTicket<'a> {
    collection: &'a Collection,
    done: bool,
}

impl WriteTicket<'_> {
    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.collection.ram_unsure.store(true, Ordering::SeqCst);
        }
        self.collection.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// RAM copies made from a collection's snapshot while its engine loads (at 1M points this
/// work took 1.6-1.8 s after the engine's load); [`Collection::install_snapshot`] checks the
/// snapshot against the engine before it uses them.
struct Prepared {
    points: payloads::Points,
    /// `None` when the blocks are off.
    blocks: Option<CategoryBlocks>,
    /// Up to [`SNAPSHOT_SAMPLE`] points spread over the snapshot, with their category
    /// names, to compare with the engine's payloads.
    sample: Vec<(SnapPoint, Vec<String>)>,
}

impl Prepared {
    /// Reads the snapshot at `path` and fills the RAM copies from it. `Err`: why it
    /// cannot be used.
    fn of(path: &Path, dim: usize, filterable: &[String], blocks: bool) -> Result<Self, String> {
        let snap = snapshot::read(path, dim, filterable)?.ok_or("there is none")?;
        let step = snap.points.len().div_ceil(SNAPSHOT_SAMPLE).max(1);
        let sample = snap
            .points
            .iter()
            .step_by(step)
            .map(|p| (p.clone(), snap.names(p)))
            .collect();
        let blocks = blocks.then(|| {
            let rows = snap.points.iter().map(|p| LoadedRow {
                id: p.id,
                categories: &p.categories,
                available: p.ram.available,
                price: p.ram.price,
                created_at: p.created_at,
                vector: &p.ram.vector,
            });
            CategoryBlocks::from_loaded(dim, &snap.categories, rows)
        });
        let points = payloads::Points::of_loaded(snap.points.into_iter().map(|p| (p.id, p.ram)));
        Ok(Prepared {
            points,
            blocks,
            sample,
        })
    }
}

/// One opened collection version.
struct Collection {
    name: String,
    dim: usize,
    dir: PathBuf,
    shard: Arc<EdgeShard>,
    /// What tandem keeps of each point in RAM (see [`RamPoint`]).
    points: PointStore,
    /// The attribute names filters can name (the RAM copy keeps those attributes only).
    filterable: Vec<String>,
    /// `None` when `scan_max_points` is 0.
    blocks: Option<Arc<RwLock<CategoryBlocks>>>,
    writer: Mutex<Option<mpsc::Sender<WriteCmd>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    snapshot: Arc<SnapshotFile>,
    /// Writes between their start and their RAM copies' update ([`WriteTicket`]).
    in_flight: AtomicUsize,
    /// A write ended without its RAM copies' update: take no snapshot.
    ram_unsure: AtomicBool,
    /// The RAM copies were read from the snapshot when the collection was opened.
    from_snapshot: AtomicBool,
}

impl Collection {
    fn start(
        name: &str,
        dim: usize,
        dir: PathBuf,
        shard: EdgeShard,
        opts: &EdgeOptions,
    ) -> Result<Self, IndexError> {
        let shard = Arc::new(shard);
        let (tx, rx) = mpsc::channel();
        let for_thread = shard.clone();
        let snap = Arc::new(SnapshotFile::new(dir.join(snapshot::FILE)));
        let snap_for_thread = snap.clone();
        let thread = std::thread::Builder::new()
            .name(format!("edge-writer-{name}"))
            .spawn(move || writer_loop(for_thread, snap_for_thread, rx))
            .map_err(io(format!("cannot start the writer thread of {name:?}")))?;
        Ok(Collection {
            name: name.to_string(),
            dim,
            dir,
            shard,
            points: PointStore::default(),
            filterable: opts.filterable.clone(),
            blocks: (opts.scan_max_points > 0)
                .then(|| Arc::new(RwLock::new(CategoryBlocks::new(dim)))),
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            snapshot: snap,
            in_flight: AtomicUsize::new(0),
            ram_unsure: AtomicBool::new(false),
            from_snapshot: AtomicBool::new(false),
        })
    }

    /// Marks a write as under way until the ticket is done (see [`WriteTicket`]).
    fn start_write(&self) -> WriteTicket<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        WriteTicket {
            collection: self,
            done: false,
        }
    }

    async fn write(&self, op: WriteOp) -> Result<(), IndexError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sender =
            self.writer.lock().clone().ok_or_else(|| {
                IndexError::Backend(format!("collection {:?} is closed", self.name))
            })?;
        sender
            .send(WriteCmd { op, reply })
            .map_err(|_| IndexError::Backend(format!("writer of {:?} has stopped", self.name)))?;
        rx.await
            .map_err(|_| IndexError::Backend(format!("writer of {:?} has stopped", self.name)))?
            .map_err(|e| IndexError::Backend(format!("collection {:?}: {e}", self.name)))
    }

    /// Whether the writer thread still runs (or was stopped on purpose). An engine panic
    /// ends it: every later write fails, so readiness must say so (see `count`).
    fn writer_alive(&self) -> bool {
        !matches!(self.thread.lock().as_ref(), Some(t) if t.is_finished())
    }

    /// Stops the writer thread and waits for it, so that no write is in flight.
    fn close_writer(&self) {
        self.writer.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    async fn upsert(&self, points: Vec<IndexPoint>, durable: bool) -> Result<(), IndexError> {
        check_points(&points, self.dim)?;
        // Unit length once, here: the RAM copy and the blocks then hold the same allocation
        // (the caller's own, when the item tower made it unit length already).
        let points: Vec<IndexPoint> = points
            .into_iter()
            .map(|p| IndexPoint {
                vector: unit(&p.vector),
                payload: p.payload,
            })
            .collect();
        let structs = points
            .iter()
            .map(|p| {
                PointStruct::new(
                    PointId::Uuid(point_id(&p.payload.item_id)),
                    p.vector.to_vec(),
                    serde_json::Value::Object(payloads::to_json(&p.payload)),
                )
                .into()
            })
            .collect::<Vec<_>>();
        let op = UpdateOperation::PointOperation(PointOperations::UpsertPoints(
            PointInsertOperations::PointsList(structs),
        ));
        let ticket = self.start_write();
        self.write(WriteOp::Update {
            ops: vec![op],
            durable,
        })
        .await?;
        if let Some(b) = &self.blocks {
            b.write().upsert(&points);
            self.fit_blocks_in_background(b);
        }
        self.keep(points);
        ticket.done();
        Ok(())
    }

    /// Puts points (with unit vectors) in the RAM copy.
    fn keep(&self, points: Vec<IndexPoint>) {
        self.points.insert_many(
            points
                .into_iter()
                .map(|p| RamPoint::of(p.payload, p.vector, &self.filterable)),
        );
    }

    /// Fits again the category blocks that writes have doubled, on the blocking pool: the
    /// fit itself (about 10 ms, on a sample of the rows) holds no lock, and the rows are
    /// re-encoded [`FIT_CHUNK`] at a time, releasing the lock (fairly, to waiting searches)
    /// between chunks. Detached, so that a cancelled request cannot leave a fit half done.
    fn fit_blocks_in_background(&self, blocks: &Arc<RwLock<CategoryBlocks>>) {
        let due = blocks.write().start_fits();
        if due.is_empty() {
            return;
        }
        let (blocks, dim) = (blocks.clone(), self.dim);
        tokio::task::spawn_blocking(move || {
            for (category, sample) in due {
                let started = Instant::now();
                blocks
                    .write()
                    .begin_fit(&category, Fit::of_sample(dim, &sample));
                let mut chunks = 1;
                loop {
                    let mut guard = blocks.write();
                    if guard.continue_fit(&category, FIT_CHUNK) {
                        break;
                    }
                    RwLockWriteGuard::unlock_fair(guard);
                    chunks += 1;
                }
                // One per category at every start (16 lines on the demo): detail, not news.
                tracing::debug!(
                    category,
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    chunks,
                    "category block fitted again"
                );
            }
        });
    }

    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        if ids.is_empty() {
            return Ok(());
        }
        let op = UpdateOperation::PointOperation(PointOperations::DeletePoints {
            ids: ids.iter().map(|i| PointId::Uuid(point_id(i))).collect(),
        });
        let ticket = self.start_write();
        self.write(WriteOp::Update {
            ops: vec![op],
            durable: true,
        })
        .await?;
        if let Some(b) = &self.blocks {
            b.write().delete(ids.iter().map(point_id));
        }
        self.points.remove_many(ids);
        ticket.done();
        Ok(())
    }

    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        let fields = payloads::patch_json(patch);
        if fields.is_empty() || !self.points.contains(id) {
            return Ok(()); // nothing to set, or an unknown item: a no-op, as in Qdrant
        }
        // By a has-id filter, not by point id: a delete that raced past the check above then
        // makes this a no-op (the caller answers 404) instead of a "no point" error.
        let only_this = qdrant_edge::Filter::new_must(qdrant_edge::Condition::HasId(
            std::iter::once(PointId::Uuid(point_id(id))).collect(),
        ));
        let op = UpdateOperation::PayloadOperation(PayloadOps::SetPayload(SetPayloadOp {
            payload: qdrant_edge::Payload(fields),
            points: None,
            filter: Some(only_this),
            key: None,
        }));
        let ticket = self.start_write();
        self.write(WriteOp::Update {
            ops: vec![op],
            durable: true,
        })
        .await?;
        if let Some(b) = &self.blocks {
            b.write().patch(&point_id(id), patch);
        }
        self.points.patch(id, patch);
        ticket.done();
        Ok(())
    }

    fn count_estimate(&self, filter: &qdrant_edge::Filter) -> Result<usize, IndexError> {
        self.shard
            .count(CountRequest {
                filter: Some(filter.clone()),
                exact: false,
            })
            .map_err(backend("count"))
    }

    /// One engine query; returns (point id, score), best first.
    fn query(
        &self,
        q: &[f32],
        filter: Option<qdrant_edge::Filter>,
        k: usize,
        plan: Plan,
        cfg: &PlanConfig,
        exact: bool,
    ) -> Result<Vec<(Uuid, f32)>, IndexError> {
        // An exact plan asks for a plain scan by cardinality rather than with `exact: true`,
        // which would ignore the quantized vectors. The planner picks it for sets of at most
        // `exact_max_points` (20k), under the engine's full-scan threshold (10 MB of vectors:
        // 40k points at d=64), so the engine scans them; should its own estimate disagree (a
        // lowered threshold, or d > 128), it walks the graph with `ef_max` instead.
        let ef = match plan {
            Plan::Graph { ef } => ef,
            _ => cfg.ef_max,
        };
        let req = QueryRequest {
            prefetches: vec![],
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(
                NamedQuery::default_dense(q.to_vec()),
            ))),
            filter,
            score_threshold: None,
            limit: k,
            offset: 0,
            params: Some(SearchParams {
                hnsw_ef: Some(ef),
                exact,
                quantization: Some(QuantizationSearchParams {
                    ignore: false,
                    rescore: Some(true),
                    oversampling: Some(OVERSAMPLING),
                }),
                indexed_only: false,
                acorn: None,
            }),
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(false),
        };
        let points = self.shard.query(req).map_err(backend("search"))?;
        Ok(points
            .into_iter()
            .filter_map(|p| match p.id {
                PointId::Uuid(u) => Some((u, p.score)),
                PointId::NumId(_) => None,
            })
            .collect())
    }

    fn search(
        &self,
        q: &[f32],
        filter: &Filter,
        k: usize,
        opts: &EdgeOptions,
    ) -> Result<Vec<Hit>, IndexError> {
        check_query(q, self.dim)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let scored = match self.scan_blocks(q, filter, k, opts.scan_max_points) {
            Some(found) => found,
            None => self.planned_search(q, filter, k, opts, self.points.len())?,
        };
        let found = self.points.item_ids(scored.iter().map(|(id, _)| id));
        Ok(scored
            .into_iter()
            .zip(found)
            // A point written to the engine but not yet to the RAM copy is still in flight.
            .filter_map(|((_, score), item_id)| item_id.map(|item_id| Hit { score, item_id }))
            .collect())
    }

    /// The exact answer from the RAM blocks, when the filter's categories are few enough
    /// points to scan.
    fn scan_blocks(
        &self,
        q: &[f32],
        filter: &Filter,
        k: usize,
        max_points: usize,
    ) -> Option<Vec<(Uuid, f32)>> {
        let blocks = self.blocks.as_ref()?.read();
        if blocks.rows_to_scan(filter)? > max_points {
            return None;
        }
        let attrs = &filter.attributes;
        let attributes_pass = |id: &Uuid| {
            self.points
                .with(id, |p| p.attributes_pass(attrs))
                .unwrap_or(false)
        };
        let check: Option<&(dyn Fn(&Uuid) -> bool + Sync)> =
            (!attrs.is_empty()).then_some(&attributes_pass);
        Some(blocks.search(&normalized(q), filter, k, check))
    }

    fn planned_search(
        &self,
        q: &[f32],
        filter: &Filter,
        k: usize,
        opts: &EdgeOptions,
        total: usize,
    ) -> Result<Vec<(Uuid, f32)>, IndexError> {
        let cfg = &opts.plan;
        let edge_filter = to_edge_filter(filter);
        let estimate = match &edge_filter {
            Some(f) if counts_something(filter) => Some(self.count_estimate(f)?),
            _ => None,
        };
        let plan = cfg.plan(total, estimate, filter.include_categories.len(), k);
        // An attribute filter keeping up to `attr_exact_max_points` is scanned exactly
        // (see `PlanConfig::attr_exact_max_points`).
        let exact = !filter.attributes.is_empty()
            && matches!(plan, Plan::Graph { .. })
            && estimate.is_some_and(|e| e <= cfg.attr_exact_max_points);
        if plan != Plan::PerCategory {
            return self.query(q, edge_filter, k, plan, cfg, exact);
        }
        // One search per category, each planned by its own cardinality, run in parallel on
        // the rayon pool and merged by best score (an item in two included categories is
        // found twice; keep it once). A category the blocks hold few enough points of is
        // scanned there (exact, and the engine has no category links then: see
        // `category_links`).
        let per_category: Vec<Vec<(Uuid, f32)>> = filter
            .include_categories
            .par_iter()
            .map(|cat| {
                let one = Filter {
                    include_categories: vec![cat.clone()],
                    ..filter.clone()
                };
                if let Some(found) = self.scan_blocks(q, &one, k, opts.scan_max_points) {
                    return Ok(found);
                }
                let f = to_edge_filter(&one).expect("a category filter is not empty");
                let est = self.count_estimate(&f)?;
                let p = cfg.plan(total, Some(est), 1, k);
                let exact = !filter.attributes.is_empty()
                    && matches!(p, Plan::Graph { .. })
                    && est <= cfg.attr_exact_max_points;
                self.query(q, Some(f), k, p, cfg, exact)
            })
            .collect::<Result<_, _>>()?;
        let mut best: HashMap<Uuid, f32> = HashMap::new();
        for (id, s) in per_category.into_iter().flatten() {
            let e = best.entry(id).or_insert(s);
            *e = e.max(s);
        }
        let mut merged: Vec<(Uuid, f32)> = best.into_iter().collect();
        merged.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        merged.truncate(k);
        Ok(merged)
    }

    /// The points of `ids`, in the order of `ids`: payloads read back from the engine (the
    /// RAM copy keeps only part of them), vectors from the RAM copy.
    fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vector)>, IndexError> {
        let pids: Vec<PointId> = ids.iter().map(|i| PointId::Uuid(point_id(i))).collect();
        let records = self
            .shard
            .retrieve(
                &pids,
                Some(WithPayloadInterface::Bool(true)),
                Some(WithVector::Bool(false)),
            )
            .map_err(backend("fetch"))?;
        let mut by_id: HashMap<Uuid, Payload> = HashMap::with_capacity(records.len());
        for r in records {
            if let (PointId::Uuid(u), Some(p)) = (r.id, r.payload) {
                by_id.insert(u, payloads::from_json(p.0)?);
            }
        }
        let uuids: Vec<Uuid> = ids.iter().map(point_id).collect();
        let vectors = self.points.vectors(&uuids);
        // A point in the engine but not yet in the RAM copy is a write still in flight.
        Ok(uuids
            .iter()
            .zip(vectors)
            .filter_map(|(u, v)| Some((by_id.remove(u)?, v?)))
            .collect())
    }

    /// The live fields and vectors of `ids` from the RAM copy, in the order of `ids`.
    fn fetch_live(&self, ids: &[ItemId]) -> Vec<super::LivePoint> {
        // A point id is a SHA-1 of the item id: the catalog load asks for 1M of them.
        let uuids: Vec<Uuid> = match ids.len() >= 1_024 {
            true => ids.par_iter().map(point_id).collect(),
            false => ids.iter().map(point_id).collect(),
        };
        self.points.live(&uuids)
    }

    /// One page of points in point-id order, from `offset` (inclusive), with the payloads
    /// from the RAM copy and the vectors from the engine; and the point id of the next page.
    fn scroll(&self, offset: Option<Uuid>, limit: usize) -> Result<ScrollPage, IndexError> {
        let (records, next) = self
            .shard
            .scroll(ScrollRequest {
                offset: offset.map(PointId::Uuid),
                limit: Some(limit.max(1)),
                filter: None,
                with_payload: Some(WithPayloadInterface::Bool(true)),
                with_vector: WithVector::Bool(false),
                order_by: None,
            })
            .map_err(backend("scroll"))?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let (PointId::Uuid(u), Some(p)) = (r.id, r.payload) else {
                continue;
            };
            // A point in the engine but not yet in the RAM copy is a write still in flight.
            let Some(vector) = self.points.with(&u, |p| p.vector.clone()) else {
                continue;
            };
            out.push((payloads::from_json(p.0)?, vector));
        }
        let next = match next {
            Some(PointId::Uuid(u)) => Some(u.to_string()),
            Some(PointId::NumId(n)) => {
                return Err(IndexError::Backend(format!(
                    "scroll: numeric point id {n} in a tandem collection"
                )))
            }
            None => None,
        };
        Ok((out, next))
    }

    /// Writes the RAM snapshot ([`snapshot`]) if it would be exact: no write under way and
    /// none applied while it is written (the writer thread counts them), and no write ever
    /// left the RAM copy unsure. Holds the RAM copy's read lock while it writes (about a
    /// second at 1M points: writes wait meanwhile). Returns whether it was written.
    fn save_snapshot(&self) -> Result<bool, IndexError> {
        let started = Instant::now();
        let skip = |why: &str| -> Result<bool, IndexError> {
            tracing::info!(version = %self.name, why, "RAM snapshot not written");
            Ok(false)
        };
        let applied = {
            let s = self.snapshot.state.lock();
            if s.current {
                return skip("the snapshot on disk is current");
            }
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                return skip("a write is under way");
            }
            s.applied
        };
        if self.ram_unsure.load(Ordering::SeqCst) {
            return skip("a write failed or was cut short since the collection was opened");
        }
        let (names, members) = match &self.blocks {
            Some(b) => b.read().memberships(),
            None => Default::default(),
        };
        let path = &self.snapshot.path;
        let tmp = self
            .points
            .with_all(|points| {
                snapshot::write_temp(
                    path,
                    self.dim,
                    &self.filterable,
                    points.len(),
                    points.iter().map(|(id, p)| (id, p)),
                    |id| members.get(id).cloned(),
                    &names,
                )
            })
            .map_err(io(format!("cannot write {}", path.display())))?;
        let mut s = self.snapshot.state.lock();
        if s.applied != applied || self.ram_unsure.load(Ordering::SeqCst) {
            drop(s);
            let _ = std::fs::remove_file(&tmp);
            return skip("written to while the snapshot was being taken");
        }
        // Under the state lock: the writer thread cannot apply a write until `on_disk` says
        // that the file is there to remove.
        snapshot::install(&tmp, path).map_err(io(format!("cannot install {}", path.display())))?;
        s.on_disk = true;
        s.current = true;
        drop(s);
        tracing::info!(
            version = %self.name,
            points = self.points.len(),
            secs = started.elapsed().as_secs_f64(),
            "RAM snapshot written"
        );
        Ok(true)
    }

    /// Puts the RAM copies that [`Prepared::of`] made from the snapshot in place, if the
    /// snapshot is usable: whole, for this dimension and these filterable names, with as many
    /// points as the engine holds, and agreeing with the engine on a sample of points.
    /// `Err`: why the snapshot was not used (the RAM copies are left empty).
    fn install_snapshot(&self, prepared: Result<Prepared, String>) -> Result<usize, String> {
        let prepared = prepared?;
        let engine = self
            .shard
            .count(CountRequest {
                filter: None,
                exact: true,
            })
            .map_err(|e| format!("counting the engine's points: {e}"))?;
        let n = prepared.points.len();
        if engine != n {
            return Err(format!("it holds {n} points, the engine {engine}"));
        }
        self.check_sample(&prepared.sample)?;
        self.points.fill(prepared.points);
        if let (Some(b), Some(built)) = (&self.blocks, prepared.blocks) {
            *b.write() = built;
        }
        self.from_snapshot.store(true, Ordering::SeqCst);
        self.snapshot.state.lock().current = true;
        Ok(n)
    }

    /// Compares the sample of the snapshot's points with the engine's payloads: same item
    /// ids and live fields.
    fn check_sample(&self, sample: &[(SnapPoint, Vec<String>)]) -> Result<(), String> {
        let ids: Vec<PointId> = sample.iter().map(|(p, _)| PointId::Uuid(p.id)).collect();
        let records = self
            .shard
            .retrieve(
                &ids,
                Some(WithPayloadInterface::Bool(true)),
                Some(WithVector::Bool(false)),
            )
            .map_err(|e| format!("reading a sample from the engine: {e}"))?;
        let mut by_id: HashMap<Uuid, Payload> = HashMap::with_capacity(records.len());
        for r in records {
            if let (PointId::Uuid(u), Some(p)) = (r.id, r.payload) {
                let p = payloads::from_json(p.0).map_err(|e| e.to_string())?;
                by_id.insert(u, p);
            }
        }
        for (p, categories_of_p) in sample {
            let Some(e) = by_id.get(&p.id) else {
                return Err(format!("point {} is not in the engine", p.ram.item_id));
            };
            // The blocks (whose rows the snapshot keeps) hold the categories and creation
            // time of the points that have a category.
            let blocks_agree = self.blocks.is_none() || {
                let mut categories = e.categories.clone();
                categories.sort();
                categories.dedup();
                categories == *categories_of_p
                    && (p.categories.is_empty() || e.created_at == p.created_at)
            };
            let same = e.item_id == p.ram.item_id
                && e.available == p.ram.available
                && e.price == p.ram.price
                && e.popularity == p.ram.popularity
                && blocks_agree;
            if !same {
                return Err(format!(
                    "item {} differs from the engine's payload",
                    p.ram.item_id
                ));
            }
        }
        Ok(())
    }

    /// Rebuilds the RAM copies (payloads and vectors, and the category blocks) from the
    /// engine (after a reopen). The engine reads and decodes every payload of the collection
    /// here, one at a time (the bulk of a restart at 1M points), so the point-id space is
    /// split in one range per core and each range is scrolled on a thread of its own.
    fn load_payloads(&self) -> Result<(), IndexError> {
        let started = Instant::now();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let ranges = id_ranges(threads);
        std::thread::scope(|scope| {
            let loaders: Vec<_> = ranges
                .iter()
                .map(|&(from, to)| scope.spawn(move || self.load_range(from, to)))
                .collect();
            loaders
                .into_iter()
                .try_for_each(|t| t.join().expect("a payload loader does not panic"))
        })?;
        if let Some(b) = &self.blocks {
            b.write().fit_due();
        }
        tracing::info!(
            version = %self.name,
            points = self.points.len(),
            threads,
            secs = started.elapsed().as_secs_f64(),
            "loaded payloads"
        );
        Ok(())
    }

    /// Loads the points with ids in `from..to` (`to: None`: to the end) into the RAM copies.
    fn load_range(&self, from: Uuid, to: Option<Uuid>) -> Result<(), IndexError> {
        let mut offset = Some(PointId::Uuid(from));
        while let Some(at) = offset {
            let (records, next) = self
                .shard
                .scroll(ScrollRequest {
                    offset: Some(at),
                    limit: Some(SCROLL_PAGE),
                    filter: None,
                    with_payload: Some(WithPayloadInterface::Bool(true)),
                    with_vector: WithVector::Bool(true),
                    order_by: None,
                })
                .map_err(backend("scroll"))?;
            let in_range = |id: &PointId| match (id, to) {
                (PointId::Uuid(u), Some(to)) => *u < to,
                (PointId::Uuid(_), None) => true,
                (PointId::NumId(_), _) => false,
            };
            let mut batch = Vec::with_capacity(records.len());
            for r in records {
                if !in_range(&r.id) {
                    break;
                }
                if let (Some(p), Some(v)) = (r.payload, dense(r.vector)) {
                    batch.push(IndexPoint {
                        vector: unit(&v.into()),
                        payload: payloads::from_json(p.0)?,
                    });
                }
            }
            if let Some(b) = &self.blocks {
                b.write().upsert(&batch);
            }
            self.keep(batch);
            offset = next.filter(in_range);
        }
        Ok(())
    }
}

/// `n` ranges that cover the point-id (UUID) space in order, as (first id, end: the next
/// range's first id, `None` for the last).
fn id_ranges(n: usize) -> Vec<(Uuid, Option<Uuid>)> {
    let n = n.max(1) as u128;
    let step = u128::MAX / n;
    (0..n)
        .map(|i| {
            let from = Uuid::from_u128(i * step);
            let to = (i + 1 < n).then(|| Uuid::from_u128((i + 1) * step));
            (from, to)
        })
        .collect()
}

/// The dense vector of a record read back from the engine.
fn dense(v: Option<VectorStructInternal>) -> Option<Vec<f32>> {
    match v? {
        VectorStructInternal::Single(v) => Some(v),
        VectorStructInternal::Named(mut m) => match m.remove("")? {
            qdrant_edge::VectorInternal::Dense(v) => Some(v),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the engine's payload indexes can estimate how many points `filter` keeps; an
/// exclusion list alone keeps nearly everything.
fn counts_something(f: &Filter) -> bool {
    !f.include_categories.is_empty()
        || !f.exclude_categories.is_empty()
        || f.available_only
        || f.price_min.is_some()
        || f.price_max.is_some()
        || f.created_after.is_some()
        || !f.attributes.is_empty()
}

fn key(name: &str) -> JsonPath {
    name.parse()
        .expect("tandem's payload field names are valid JSON paths")
}

/// The domain filter as an engine filter; `None` when it restricts nothing.
fn to_edge_filter(f: &Filter) -> Option<qdrant_edge::Filter> {
    let mut must = Vec::new();
    let mut must_not = Vec::new();
    if !f.include_categories.is_empty() {
        must.push(Condition::Field(FieldCondition::new_match(
            key(F_CATEGORIES),
            Match::from(f.include_categories.clone()),
        )));
    }
    if !f.exclude_categories.is_empty() {
        must_not.push(Condition::Field(FieldCondition::new_match(
            key(F_CATEGORIES),
            Match::from(f.exclude_categories.clone()),
        )));
    }
    if f.available_only {
        must.push(Condition::Field(FieldCondition::new_match(
            key(F_AVAILABLE),
            Match::from(true),
        )));
    }
    if f.price_min.is_some() || f.price_max.is_some() {
        must.push(Condition::Field(FieldCondition::new_range(
            key(F_PRICE),
            Range {
                lt: None,
                gt: None,
                gte: f.price_min.map(|m| OrderedFloat(f64::from(m))),
                lte: f.price_max.map(|m| OrderedFloat(f64::from(m))),
            },
        )));
    }
    if let Some(after) = f.created_after {
        must.push(Condition::Field(FieldCondition::new_range(
            key(F_CREATED_AT),
            Range {
                lt: None,
                gt: Some(OrderedFloat(after as f64)),
                gte: None,
                lte: None,
            },
        )));
    }
    attribute_conditions(&f.attributes, &mut must, &mut must_not);
    if !f.exclude_items.is_empty() {
        let ids: HasIdCondition = f
            .exclude_items
            .iter()
            .map(|i| PointId::Uuid(point_id(i)))
            .collect();
        must_not.push(Condition::HasId(ids));
    }
    if must.is_empty() && must_not.is_empty() {
        return None;
    }
    Some(qdrant_edge::Filter {
        should: None,
        min_should: None,
        must: (!must.is_empty()).then_some(must),
        must_not: (!must_not.is_empty()).then_some(must_not),
    })
}

/// The attribute conditions as engine conditions, on the keyword and number fields that
/// `payloads::to_json` writes.
fn attribute_conditions(a: &AttrFilter, must: &mut Vec<Condition>, must_not: &mut Vec<Condition>) {
    let any_of = |name: &str, values: &[String]| {
        Condition::Field(FieldCondition::new_match(
            key(&payloads::attr_keyword_path(name)),
            Match::from(values.to_vec()),
        ))
    };
    for (name, values) in &a.any {
        must.push(any_of(name, values));
    }
    for (name, values) in &a.none {
        must_not.push(any_of(name, values));
    }
    for (name, values) in &a.any_or_unset {
        let unset = Condition::IsEmpty(IsEmptyCondition::from(key(&payloads::attr_keyword_path(
            name,
        ))));
        let mut either = qdrant_edge::Filter::new_should(any_of(name, values));
        either.should.get_or_insert_with(Vec::new).push(unset);
        must.push(Condition::Filter(either));
    }
    let names: std::collections::BTreeSet<&String> = a.min.keys().chain(a.max.keys()).collect();
    for name in names {
        must.push(Condition::Field(FieldCondition::new_range(
            key(&payloads::attr_number_path(name)),
            Range {
                lt: None,
                gt: None,
                gte: a.min.get(name).map(|&m| OrderedFloat(m)),
                lte: a.max.get(name).map(|&m| OrderedFloat(m)),
            },
        )));
    }
}

/// Payload indexes on the four filterable fields. `available` matches nearly every point and
/// prices and dates are range filters, so payload-aware HNSW links for them would build
/// several more full-size graphs (at 1M items, most of `optimize()`) for filters that the
/// planner and the payload index already answer.
///
/// `categories` gets links only when `category_links` is set (see [`category_links`]): a
/// category filter selects whole clusters of a trained model's vectors, where a filtered
/// graph walk needs the extra links of each category's sub-graph; but when tandem's category
/// blocks answer those filters, the engine never walks them, and building them (one
/// sub-graph per category above the engine's full-scan threshold, about as many points
/// again as the main graph) was about half of the first start at 1M.
///
/// Each filterable attribute gets a keyword index on its keywords and a float index on its
/// number, neither with links: an attribute filter is estimated by its index and then either
/// scanned exactly (small sets) or searched with a wider beam, as [`super::plan`] decides.
///
/// The keyword and number indexes are kept on disk (memory-mapped): in RAM, the engine built
/// every one of them again from its files at each open, about a fifth of a restart's CPU at
/// 1M items (issue 37); mapped, they open at once and their pages come in as filters read
/// them. The availability flag, which nearly every search checks, stays in RAM.
fn payload_index_ops(filterable: &[String], category_links: bool) -> Vec<UpdateOperation> {
    let no_links = Some(false);
    let on_disk = Some(true);
    let attributes = filterable.iter().flat_map(|name| {
        [
            (
                payloads::attr_keyword_path(name),
                PayloadSchemaParams::Keyword(KeywordIndexParams {
                    enable_hnsw: no_links,
                    on_disk,
                    ..Default::default()
                }),
            ),
            (
                payloads::attr_number_path(name),
                PayloadSchemaParams::Float(FloatIndexParams {
                    enable_hnsw: no_links,
                    on_disk,
                    ..Default::default()
                }),
            ),
        ]
    });
    [
        (
            F_CATEGORIES,
            PayloadSchemaParams::Keyword(KeywordIndexParams {
                enable_hnsw: (!category_links).then_some(false),
                on_disk,
                ..Default::default()
            }),
        ),
        (
            F_AVAILABLE,
            PayloadSchemaParams::Bool(BoolIndexParams {
                enable_hnsw: no_links,
                ..Default::default()
            }),
        ),
        (
            F_PRICE,
            PayloadSchemaParams::Float(FloatIndexParams {
                enable_hnsw: no_links,
                on_disk,
                ..Default::default()
            }),
        ),
        (
            F_CREATED_AT,
            PayloadSchemaParams::Integer(IntegerIndexParams {
                lookup: Some(false),
                range: Some(true),
                enable_hnsw: no_links,
                on_disk,
                ..Default::default()
            }),
        ),
    ]
    .into_iter()
    .map(|(field, params)| (field.to_string(), params))
    .chain(attributes)
    .map(|(field, params)| {
        UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
            field_name: key(&field),
            field_schema: Some(PayloadFieldSchema::FieldParams(params)),
        }))
    })
    .collect()
}

/// Whether new collections build payload-aware HNSW links for `categories`: only when the
/// category blocks are off (`scan_max_points` 0), so that category filters go to the engine.
/// With the blocks on, a filter on categories holding at most `scan_max_points` points is
/// scanned from them, and a wider one fans out per category to them (see
/// `Collection::planned_search`); only a single category larger than `scan_max_points` (none
/// in the 1M demo catalog, whose largest holds about 15 %) walks the main graph under the
/// filter, with the planner's wider beam.
fn category_links(opts: &EdgeOptions) -> bool {
    opts.scan_max_points == 0
}

/// The `edge` backend: versioned collections under one root directory.
pub struct EdgeIndex {
    root: PathBuf,
    opts: EdgeOptions,
    open: RwLock<HashMap<String, Arc<Collection>>>,
    live: RwLock<Option<Arc<Collection>>>,
    /// Serializes create/switch/drop so that two of them never race on the directory.
    admin: tokio::sync::Mutex<()>,
}

impl EdgeIndex {
    /// Opens (or creates) the root directory and the live version it names, if any.
    pub fn open(root: &Path, opts: EdgeOptions) -> Result<Self, IndexError> {
        std::fs::create_dir_all(root).map_err(io(format!(
            "cannot create index directory {}",
            root.display()
        )))?;
        let index = EdgeIndex {
            root: root.to_path_buf(),
            opts,
            open: RwLock::new(HashMap::new()),
            live: RwLock::new(None),
            admin: tokio::sync::Mutex::new(()),
        };
        if let Some(name) = index.read_current()? {
            let c = index.collection(&name)?;
            *index.live.write() = Some(c);
        }
        Ok(index)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// (points, vectors covered by the HNSW graph) of a version, for benchmarks and tests.
    pub fn index_status(&self, version: &str) -> Result<(usize, usize), IndexError> {
        let info = self.collection(version)?.shard.info();
        Ok((info.points_count, info.indexed_vectors_count))
    }

    /// Whether a version's RAM copy was read from its snapshot when it was opened (rather
    /// than from every payload in the engine), for tests and the start-up log.
    pub fn loaded_from_snapshot(&self, version: &str) -> Result<bool, IndexError> {
        Ok(self
            .collection(version)?
            .from_snapshot
            .load(Ordering::SeqCst))
    }

    fn read_current(&self) -> Result<Option<String>, IndexError> {
        let path = self.root.join(CURRENT);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let name = s.trim().to_string();
                check_version_name(&name)?;
                Ok(Some(name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("cannot read {}", path.display()))(e)),
        }
    }

    fn write_current(&self, name: &str) -> Result<(), IndexError> {
        let tmp = self.root.join(format!(".{CURRENT}.{}", Uuid::new_v4()));
        let path = self.root.join(CURRENT);
        std::fs::write(&tmp, format!("{name}\n"))
            .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .and_then(|_| std::fs::File::open(&self.root)?.sync_all())
            .map_err(io(format!("cannot write {}", path.display())))
    }

    fn live(&self) -> Result<Arc<Collection>, IndexError> {
        self.live.read().clone().ok_or(IndexError::NoActiveVersion)
    }

    /// The opened collection `name`, opening it from disk if needed.
    fn collection(&self, name: &str) -> Result<Arc<Collection>, IndexError> {
        check_version_name(name)?;
        if let Some(c) = self.open.read().get(name) {
            return Ok(c.clone());
        }
        let mut open = self.open.write();
        if let Some(c) = open.get(name) {
            return Ok(c.clone());
        }
        let dir = self.root.join(name);
        let meta_path = dir.join(META);
        let meta: Meta = match std::fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| IndexError::Backend(format!("{}: {e}", meta_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IndexError::UnknownVersion(name.to_string()))
            }
            Err(e) => return Err(io(format!("cannot read {}", meta_path.display()))(e)),
        };
        let freed = drop_unread_wal(&dir.join(SHARD_DIR))?;
        if freed > 0 {
            tracing::info!(
                collection = name,
                bytes = freed,
                "dropped the engine's unread WAL"
            );
        }
        let stage = Instant::now();
        // The snapshot is read and turned into the RAM copies while the engine loads (seconds
        // each at 1M points); it is checked against the engine afterwards.
        let preparing = {
            let (path, dim) = (dir.join(snapshot::FILE), meta.dim);
            let (filterable, blocks) =
                (self.opts.filterable.clone(), self.opts.scan_max_points > 0);
            std::thread::spawn(move || {
                let prepared = Prepared::of(&path, dim, &filterable, blocks);
                if prepared.is_ok() {
                    crate::telemetry::startup_stage("RAM copies made from the snapshot", stage);
                }
                prepared
            })
        };
        let shard = EdgeShard::load(&dir.join(SHARD_DIR), None).map_err(|e| {
            let e = e.to_string();
            // The WAL's file lock is taken: another process (a running `tandem serve`, most
            // likely) has this collection open. qdrant-edge says only "Can't init WAL:
            // Kind(WouldBlock)".
            if e.contains("WouldBlock") {
                IndexError::Backend(format!(
                    "cannot open collection {name:?}: the index in {} is in use by another \
                     process (is `tandem serve` running? stop it first)",
                    self.root.display()
                ))
            } else {
                IndexError::Backend(format!("cannot open collection {name:?}: {e}"))
            }
        })?;
        crate::telemetry::startup_stage("engine opened", stage);
        let c = Arc::new(Collection::start(name, meta.dim, dir, shard, &self.opts)?);
        let prepared = preparing
            .join()
            .unwrap_or_else(|_| Err("making the RAM copies from it panicked".to_string()));
        let stage = Instant::now();
        match c.install_snapshot(prepared) {
            Ok(points) => tracing::info!(
                collection = name,
                points,
                secs = stage.elapsed().as_secs_f64(),
                "RAM copy loaded from the snapshot"
            ),
            Err(why) => {
                tracing::info!(
                    collection = name,
                    why,
                    "RAM snapshot not used; reading every point from the engine"
                );
                c.load_payloads()?;
            }
        }
        let released = release_read_once_pages(&c.dir.join(SHARD_DIR));
        tracing::debug!(
            collection = name,
            bytes = released,
            "released read-once pages"
        );
        crate::telemetry::startup_stage("payloads and blocks loaded", stage);
        open.insert(name.to_string(), c.clone());
        Ok(c)
    }

    fn edge_config(&self, dim: usize) -> EdgeConfig {
        let defaults = HnswIndexConfig::default();
        let hnsw = HnswIndexConfig {
            m: self.opts.m,
            ef_construct: self.opts.ef_construct,
            full_scan_threshold: self
                .opts
                .full_scan_threshold_kb
                .unwrap_or(defaults.full_scan_threshold),
            max_indexing_threads: self.opts.indexing_threads,
            ..defaults
        };
        let builder = EdgeConfig::builder()
            .vector("", EdgeVectorParams::builder(dim, Distance::Cosine).build())
            .hnsw_config(hnsw)
            .wal_options(WalOptions {
                segment_capacity: WAL_SEGMENT_BYTES,
                segment_queue_len: 0,
                retain_closed: std::num::NonZeroUsize::MIN,
            })
            .optimizers(EdgeOptimizersConfig {
                indexing_threshold: self.opts.indexing_threshold_kb,
                ..EdgeOptimizersConfig::default()
            });
        if !self.opts.quantization {
            return builder.build();
        }
        builder
            .quantization_config(QuantizationConfig::from(ScalarQuantizationConfig {
                r#type: ScalarType::Int8,
                quantile: Some(0.99),
                always_ram: Some(true),
            }))
            .build()
    }
}

#[async_trait]
impl VectorIndex for EdgeIndex {
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        let c = self.live()?;
        whole(async move { c.upsert(points, true).await }).await
    }

    async fn upsert_buffered(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        let c = self.live()?;
        whole(async move { c.upsert(points, false).await }).await
    }

    async fn flush(&self) -> Result<(), IndexError> {
        self.live()?
            .write(WriteOp::Update {
                ops: Vec::new(),
                durable: true,
            })
            .await
    }

    async fn save_snapshot(&self) -> Result<(), IndexError> {
        let c = match self.live() {
            Err(IndexError::NoActiveVersion) => return Ok(()),
            other => other?,
        };
        tokio::task::spawn_blocking(move || c.save_snapshot())
            .await
            .map_err(|e| IndexError::Backend(format!("RAM snapshot task: {e}")))??;
        Ok(())
    }

    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        let (c, ids) = (self.live()?, ids.to_vec());
        whole(async move { c.delete(&ids).await }).await
    }

    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        let (c, id, patch) = (self.live()?, id.clone(), patch.clone());
        whole(async move { c.set_payload(&id, &patch).await }).await
    }

    async fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.live()?.search(vector, filter, k, &self.opts)
    }

    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vector)>, IndexError> {
        self.live()?.fetch(ids)
    }

    async fn fetch_live(
        &self,
        version: Option<&str>,
        ids: &[ItemId],
    ) -> Result<Vec<super::LivePoint>, IndexError> {
        let c = match version {
            Some(v) => self.collection(v)?,
            None => self.live()?,
        };
        Ok(c.fetch_live(ids))
    }

    /// Also the readiness probe's question: a live collection whose writer thread died (an
    /// engine panic) can still be searched but never written again, so it answers
    /// `Unavailable` and `/readyz` fails, for the orchestrator to restart the process.
    async fn count(&self) -> Result<usize, IndexError> {
        let live = self.live()?;
        if !live.writer_alive() {
            return Err(IndexError::Unavailable(format!(
                "the writer thread of collection {:?} has died (an engine panic); writes fail until a restart",
                live.name
            )));
        }
        Ok(live.points.len())
    }

    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError> {
        check_version_name(version)?;
        check_dim(dim)?;
        let _admin = self.admin.lock().await;
        let dir = self.root.join(version);
        if dir.exists() {
            return Err(IndexError::Backend(format!(
                "collection version {version:?} already exists"
            )));
        }
        let shard_dir = dir.join(SHARD_DIR);
        std::fs::create_dir_all(&shard_dir)
            .map_err(io(format!("cannot create {}", shard_dir.display())))?;
        let shard = EdgeShard::new(&shard_dir, self.edge_config(dim))
            .map_err(backend(&format!("cannot create collection {version:?}")))?;
        let c = Arc::new(Collection::start(
            version,
            dim,
            dir.clone(),
            shard,
            &self.opts,
        )?);
        // Payload indexes come first, so that the graph gets its payload-aware links (when
        // there are any: see `category_links`).
        let indexed = c
            .write(WriteOp::Update {
                ops: payload_index_ops(&self.opts.filterable, category_links(&self.opts)),
                durable: true,
            })
            .await;
        // meta.json last: a directory without it is an unfinished create, not a version.
        let meta = serde_json::to_vec(&Meta { dim }).expect("meta serializes");
        let written = indexed.and_then(|_| {
            std::fs::write(dir.join(META), meta)
                .map_err(io(format!("cannot write {}", dir.join(META).display())))
        });
        if let Err(e) = written {
            drop(c); // closes the engine before its directory goes
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.open.write().insert(version.to_string(), c);
        Ok(())
    }

    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        // Not flushed per batch: a version is not live until finalized, and finalize flushes.
        let c = self.collection(version)?;
        whole(async move { c.upsert(points, false).await }).await
    }

    async fn search_in(
        &self,
        version: &str,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.collection(version)?
            .search(vector, filter, k, &self.opts)
    }

    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vector)>, IndexError> {
        self.collection(version)?.fetch(ids)
    }

    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        let (c, ids) = (self.collection(version)?, ids.to_vec());
        whole(async move { c.delete(&ids).await }).await
    }

    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        let (c, id, patch) = (self.collection(version)?, id.clone(), patch.clone());
        whole(async move { c.set_payload(&id, &patch).await }).await
    }

    async fn finalize_version(&self, version: &str) -> Result<(), IndexError> {
        let c = self.collection(version)?;
        c.write(WriteOp::Optimize).await?;
        // So that the next start reads the RAM copy back instead of every payload, even if
        // this process does not stop cleanly (a write before then removes it).
        let for_snapshot = c.clone();
        match tokio::task::spawn_blocking(move || for_snapshot.save_snapshot()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(version, error = %e, "RAM snapshot not written"),
            Err(e) => tracing::warn!(version, error = %e, "RAM snapshot not written"),
        }
        let info = c.shard.info();
        tracing::info!(
            version,
            points = info.points_count,
            indexed = info.indexed_vectors_count,
            segments = info.segments_count,
            "collection finalized"
        );
        Ok(())
    }

    async fn switch_to(&self, version: &str) -> Result<(), IndexError> {
        let _admin = self.admin.lock().await;
        let c = self.collection(version)?;
        self.write_current(version)?;
        *self.live.write() = Some(c);
        Ok(())
    }

    async fn drop_version(&self, version: &str) -> Result<(), IndexError> {
        check_version_name(version)?;
        let _admin = self.admin.lock().await;
        if self.live.read().as_ref().is_some_and(|c| c.name == version) {
            return Err(IndexError::Backend(format!(
                "collection version {version:?} is live; switch to another version before dropping it"
            )));
        }
        let dir = self.root.join(version);
        let opened = self.open.write().remove(version);
        if let Some(c) = opened {
            // Wait for in-flight searches to let go, then stop the writer: the engine flushes
            // when the last handle drops, and it must not flush into a deleted directory.
            let deadline = Instant::now() + Duration::from_secs(30);
            while Arc::strong_count(&c) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c.close_writer();
            drop(c);
        } else if !dir.join(META).exists() {
            return Err(IndexError::UnknownVersion(version.to_string()));
        }
        std::fs::remove_dir_all(&dir).map_err(io(format!("cannot remove {}", dir.display())))
    }

    async fn versions(&self) -> Result<(Vec<String>, Option<String>), IndexError> {
        let entries = std::fs::read_dir(&self.root)
            .map_err(io(format!("cannot list {}", self.root.display())))?;
        let mut names = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if check_version_name(&name).is_ok() && e.path().join(META).exists() {
                names.push(name);
            }
        }
        names.sort();
        Ok((names, self.live.read().as_ref().map(|c| c.name.clone())))
    }

    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError> {
        let c = match version {
            Some(v) => self.collection(v)?,
            None => self.live()?,
        };
        let offset = offset
            .map(|o| {
                Uuid::parse_str(&o)
                    .map_err(|_| IndexError::Backend(format!("invalid scroll cursor {o:?}")))
            })
            .transpose()?;
        // A page of a few thousand points reads the engine's mmapped vectors: off the
        // async workers.
        tokio::task::spawn_blocking(move || c.scroll(offset, limit))
            .await
            .map_err(|e| IndexError::Backend(format!("scroll: {e}")))?
    }
}

impl Drop for Collection {
    fn drop(&mut self) {
        self.close_writer();
        tracing::debug!(version = %self.name, dir = %self.dir.display(), "collection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn point(id: &str, v: [f32; 4]) -> IndexPoint {
        IndexPoint::for_test(id, &["c"], &v)
    }

    /// The engine never truncates its WAL; opening a collection drops the unread one, so
    /// over many write+flush rounds, each ended by a restart, the WAL stays the size of one
    /// round instead of growing with every write.
    #[tokio::test]
    async fn the_engine_wal_stays_bounded_over_many_write_and_flush_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("index");
        let mut sizes = Vec::new();
        for round in 0..4 {
            let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
            if round == 0 {
                index.create_version("v1", 64).await.unwrap();
                index.switch_to("v1").await.unwrap();
            }
            // About 6 MiB of WAL a round: more than one segment.
            for batch in 0..20 {
                let points = (0..1_000)
                    .map(|i| {
                        let mut v = [0.0f32; 64];
                        v[(i + batch) % 64] = 1.0;
                        v[(i * 7 + round) % 64] += 0.5;
                        IndexPoint {
                            vector: v.to_vec().into(),
                            ..point(&format!("i{round}-{batch}-{i}"), [0.0; 4])
                        }
                    })
                    .collect();
                index.upsert(points).await.unwrap(); // durable: flushed
            }
            let live = index.live().unwrap();
            sizes.push(wal_bytes(&live.dir.join(SHARD_DIR)));
            assert_eq!(live.points.len(), (round + 1) * 20_000, "round {round}");
            drop(live);
            drop(index);
        }
        assert!(
            sizes[0] > WAL_SEGMENT_BYTES as u64,
            "{sizes:?}: a round fills more than one segment"
        );
        assert!(
            sizes.iter().all(|&s| s <= sizes[0]),
            "WAL bytes at the end of each round: {sizes:?}"
        );
    }

    /// A delete whose caller is dropped right after the engine got it (a request timeout, a
    /// client gone) still finishes as one unit: the engine, the payload copy and the category
    /// blocks agree, and a search never returns the deleted item. Before writes ran on a task
    /// of their own, the dropped future left the item in the blocks and the payloads, and
    /// every search kept finding it.
    #[tokio::test]
    async fn a_delete_dropped_mid_way_still_removes_the_item_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let index = EdgeIndex::open(&dir.path().join("index"), EdgeOptions::default()).unwrap();
        index.create_version("v1", 4).await.unwrap();
        index.switch_to("v1").await.unwrap();
        index
            .upsert(vec![
                point("keep", [1.0, 0.0, 0.0, 0.0]),
                point("gone", [0.9, 0.1, 0.0, 0.0]),
            ])
            .await
            .unwrap();
        let gone = ItemId::parse("gone").unwrap();
        let found = |hits: &[Hit]| hits.iter().any(|h| h.item_id == gone);
        let q = [1.0, 0.0, 0.0, 0.0];
        assert!(found(
            &index.search(&q, &Filter::default(), 10).await.unwrap()
        ));
        // One poll sends the delete to the writer thread; then the caller goes away.
        assert!(index
            .delete(std::slice::from_ref(&gone))
            .now_or_never()
            .is_none());
        let live = index.live().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let engine = live.shard.count(CountRequest {
                filter: None,
                exact: true,
            });
            let in_engine = engine.unwrap();
            let served = found(&index.search(&q, &Filter::default(), 10).await.unwrap());
            if in_engine == 1 && live.points.len() == 1 && !served {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after a dropped delete: {in_engine} points in the engine, {} payloads, deleted item served: {served}",
                live.points.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One copy of each vector (issue 37): the RAM copy and the category blocks keep the
    /// allocation a unit vector came in (the item tower's), and `fetch_live`, which the
    /// catalog loads from, hands out that same one; a vector that is not unit length is
    /// stored normalised, once.
    #[tokio::test]
    async fn a_unit_vector_is_held_once_by_the_ram_copy_the_blocks_and_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let index = EdgeIndex::open(&dir.path().join("index"), EdgeOptions::default()).unwrap();
        index.create_version("v1", 4).await.unwrap();
        index.switch_to("v1").await.unwrap();
        let unit: Vector = vec![0.6, 0.8, 0.0, 0.0].into();
        let long: Vector = vec![0.0, 0.0, 3.0, 4.0].into();
        index
            .upsert(vec![
                IndexPoint {
                    vector: unit.clone(),
                    ..point("unit", [0.0; 4])
                },
                IndexPoint {
                    vector: long.clone(),
                    ..point("long", [0.0; 4])
                },
            ])
            .await
            .unwrap();
        let ids = [
            ItemId::parse("unit").unwrap(),
            ItemId::parse("long").unwrap(),
        ];
        let live = index.fetch_live(None, &ids).await.unwrap();
        assert!(Vector::ptr_eq(&live[0].vector, &unit));
        assert_eq!(live[1].vector, Vector::from([0.0, 0.0, 0.6, 0.8]));
        let again = index.fetch_live(None, &ids).await.unwrap();
        assert!(Vector::ptr_eq(&again[1].vector, &live[1].vector));
        let c = index.live().unwrap();
        let blocks = c.blocks.as_ref().unwrap().read();
        for (id, held) in ids.iter().zip(&live) {
            let row = blocks.vector(&point_id(id)).unwrap();
            assert!(Vector::ptr_eq(row, &held.vector), "{id}: the block's row");
        }
    }

    /// Points in two categories with prices, creation times and a filterable attribute.
    /// An index at `root` whose live version `v1` holds `varied_points(0..40)`, finalized.
    async fn live_v1_of_40_points(root: &Path) -> EdgeIndex {
        let index = EdgeIndex::open(root, EdgeOptions::default()).unwrap();
        index.create_version("v1", 4).await.unwrap();
        index.upsert_into("v1", varied_points(0..40)).await.unwrap();
        index.finalize_version("v1").await.unwrap();
        index.switch_to("v1").await.unwrap();
        index
    }

    fn varied_points(ids: std::ops::Range<usize>) -> Vec<IndexPoint> {
        ids.map(|i| {
            let mut v = [0.1f32; 4];
            v[i % 4] = 1.0 + i as f32 * 0.01;
            let mut p = point(&format!("i{i}"), v);
            p.payload.categories = vec![if i % 3 == 0 { "x" } else { "y" }.into()];
            p.payload.price = (i % 2 == 0).then_some(i as f32);
            p.payload.created_at = Some(1_700_000_000 + i as i64);
            p.payload.popularity = i as f32;
            p.payload.attributes = [(
                "region".into(),
                crate::domain::AttrValue::List(
                    vec![if i % 2 == 0 { "eu" } else { "us" }.into()].into(),
                ),
            )]
            .into();
            p
        })
        .collect()
    }

    /// What a restarted collection answers: the live fields of `ids`, and searches with and
    /// without a category filter (the blocks) and an attribute filter.
    async fn answers(index: &EdgeIndex, ids: &[ItemId]) -> Vec<String> {
        let mut out: Vec<String> = index
            .fetch_live(None, ids)
            .await
            .unwrap()
            .iter()
            .map(|p| format!("{p:?}"))
            .collect();
        let x = Filter {
            include_categories: vec!["x".into()],
            ..Default::default()
        };
        let cheap = Filter {
            include_categories: vec!["y".into()],
            price_max: Some(20.0),
            available_only: true,
            ..Default::default()
        };
        let mut eu = Filter::default();
        eu.attributes.any.insert("region".into(), vec!["eu".into()]);
        let eu_in_y = Filter {
            include_categories: vec!["y".into()],
            ..eu.clone()
        };
        for f in [Filter::default(), x, cheap, eu, eu_in_y] {
            for q in [[1.0, 0.0, 0.0, 0.0], [0.0, 0.3, 1.0, 0.0]] {
                let hits = index.search(&q, &f, 10).await.unwrap();
                out.push(format!(
                    "{:?}",
                    hits.iter()
                        .map(|h| (h.item_id.as_str().to_string(), (h.score * 1e4).round()))
                        .collect::<Vec<_>>()
                ));
            }
        }
        out
    }

    /// The RAM snapshot (issue 37): a restart reads it instead of every payload and answers
    /// the same; a write acknowledged after it was written removes it first, so that a
    /// stop without a new snapshot (a crash) restarts from the engine with the write; a
    /// corrupt snapshot, or one that an older process left behind while it wrote, is not
    /// used.
    #[tokio::test]
    async fn a_restart_reads_the_ram_snapshot_and_never_loses_a_write_made_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("index");
        let snap = root.join("v1").join(snapshot::FILE);
        let ids: Vec<ItemId> = (0..46)
            .map(|i| ItemId::parse(format!("i{i}")).unwrap())
            .collect();
        let index = live_v1_of_40_points(&root).await;
        assert!(snap.exists(), "finalizing a version writes its snapshot");
        let built = answers(&index, &ids).await;
        drop(index);

        let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
        assert!(index.loaded_from_snapshot("v1").unwrap());
        assert_eq!(answers(&index, &ids).await, built);
        // Writes after the snapshot, to points of this process and of the first one: the
        // snapshot goes before the first of them is applied.
        index.upsert(varied_points(40..44)).await.unwrap();
        assert!(!snap.exists());
        let patch = PayloadPatch {
            price: Some(2.5),
            ..Default::default()
        };
        index.set_payload(&ids[41], &patch).await.unwrap();
        index.set_payload(&ids[3], &patch).await.unwrap();
        index.delete(&ids[42..43]).await.unwrap();
        index.delete(&ids[4..5]).await.unwrap();
        let written = answers(&index, &ids).await;
        assert_ne!(written, built);
        // A crash-like stop: no snapshot is saved.
        drop(index);

        let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
        assert!(!index.loaded_from_snapshot("v1").unwrap());
        assert_eq!(answers(&index, &ids).await, written, "from the engine");
        index.save_snapshot().await.unwrap();
        assert!(snap.exists());
        let saved = std::fs::read(&snap).unwrap();
        drop(index);

        let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
        assert!(index.loaded_from_snapshot("v1").unwrap());
        assert_eq!(answers(&index, &ids).await, written, "from the snapshot");
        drop(index);

        // A corrupt snapshot: the engine's payloads, the same answers.
        let mut bad = saved.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        std::fs::write(&snap, &bad).unwrap();
        let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
        assert!(!index.loaded_from_snapshot("v1").unwrap());
        assert_eq!(
            answers(&index, &ids).await,
            written,
            "after a corrupt snapshot"
        );
        // Snapshots older than the engine's state (as a process that does not know about
        // snapshots would leave them): one point patched since (the sample catches it), and
        // points added since (the count does).
        index.upsert(varied_points(44..46)).await.unwrap();
        index.save_snapshot().await.unwrap();
        let before_patch = std::fs::read(&snap).unwrap();
        index
            .set_payload(&ItemId::parse("i44").unwrap(), &patch)
            .await
            .unwrap();
        let patched = answers(&index, &ids).await;
        drop(index);
        for (stale, why) in [(before_patch, "a patch"), (saved, "two upserts")] {
            std::fs::write(&snap, &stale).unwrap();
            let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
            assert!(!index.loaded_from_snapshot("v1").unwrap(), "stale by {why}");
            assert_eq!(answers(&index, &ids).await, patched, "stale by {why}");
        }
    }

    /// The engine numbers writes by their WAL position and skips a write older than the
    /// point's stored version. The WAL is dropped at every open: started again at 0, a
    /// restarted process's patches and deletes of the points an earlier one wrote were
    /// acknowledged, then silently skipped, and the next restart had the old values back.
    #[tokio::test]
    async fn a_later_process_patches_and_deletes_points_an_earlier_one_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("index");
        let ids: Vec<ItemId> = (0..41)
            .map(|i| ItemId::parse(format!("i{i}")).unwrap())
            .collect();
        let index = live_v1_of_40_points(&root).await;
        drop(index);
        // From the engine, not the snapshot.
        let _ = std::fs::remove_file(root.join("v1").join(snapshot::FILE));
        let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
        let patch = PayloadPatch {
            price: Some(2.5),
            ..Default::default()
        };
        index.set_payload(&ids[3], &patch).await.unwrap();
        index.delete(&ids[4..5]).await.unwrap();
        let written = answers(&index, &ids).await;
        drop(index);
        let index = EdgeIndex::open(&root, EdgeOptions::default()).unwrap();
        assert!(!index.loaded_from_snapshot("v1").unwrap());
        assert_eq!(answers(&index, &ids).await, written);
    }

    #[tokio::test]
    async fn an_engine_panic_that_kills_the_writer_fails_the_readiness_count() {
        let dir = tempfile::tempdir().unwrap();
        let index = EdgeIndex::open(&dir.path().join("index"), EdgeOptions::default()).unwrap();
        index.create_version("v1", 4).await.unwrap();
        index.switch_to("v1").await.unwrap();
        assert_eq!(index.count().await.unwrap(), 0);
        let live = index.live().unwrap();
        assert!(live.write(WriteOp::Crash).await.is_err());
        // The reply is dropped while the thread unwinds; it ends a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while index.count().await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "count still answers with a dead writer"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = index.count().await.unwrap_err();
        assert!(
            matches!(err, IndexError::Unavailable(ref m) if m.contains("writer thread")),
            "{err}"
        );
    }

    /// Issue 37: with the category blocks on, the engine builds no payload-aware links for
    /// `categories` (the blocks answer category filters; at 1M those sub-graphs were about
    /// half of the HNSW build); with the blocks off, category filters walk the engine's
    /// graph and keep them.
    #[tokio::test]
    async fn category_links_are_built_only_when_the_blocks_are_off() {
        for (scan_max_points, links) in [(200_000, false), (0, true)] {
            let dir = tempfile::tempdir().unwrap();
            let opts = EdgeOptions {
                scan_max_points,
                ..EdgeOptions::default()
            };
            let index = EdgeIndex::open(&dir.path().join("index"), opts).unwrap();
            index.create_version("v1", 4).await.unwrap();
            index
                .upsert_into("v1", vec![point("a", [1.0, 0.0, 0.0, 0.0])])
                .await
                .unwrap();
            let schema = index.collection("v1").unwrap().shard.info().payload_schema;
            let categories = schema
                .get(&key(F_CATEGORIES))
                .unwrap_or_else(|| panic!("no index on categories: {schema:?}"));
            let enabled = categories.params.as_ref().is_none_or(|p| p.enable_hnsw());
            assert_eq!(enabled, links, "scan_max_points {scan_max_points}");
            for (field, info) in &schema {
                if field.to_string() != F_CATEGORIES {
                    let enabled = info.params.as_ref().is_none_or(|p| p.enable_hnsw());
                    assert!(!enabled, "{field}: no payload-aware links");
                }
            }
        }
    }
}
