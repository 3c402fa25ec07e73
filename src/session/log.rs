//! The memory backend's durable event log: an append-only file of length-prefixed,
//! CRC-checksummed records, fsynced with group commit.
//!
//! File layout: the 8-byte magic `TNDLOG01`, then records, each
//! `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`. The payload is opaque here
//! (the memory store writes JSON).
//!
//! Durability: one writer thread owns the file. `append` hands it the encoded records and
//! waits until they are fsynced. While the thread is inside `fsync`, new requests queue up;
//! the next round writes all of them and fsyncs once (group commit), so throughput grows with
//! concurrency while each caller still returns only after its own records are on disk.
//!
//! Rotation: once the file reaches [`Rotation::segment_bytes`] after a round, the writer
//! seals it (renames it to `<path>.00000001`, `.00000002`, ..., oldest first) and starts a
//! new file at `path`; readers (start-up replay, export) read the sealed segments in order,
//! then the live file. With [`Rotation::keep_segments`] above 0 the oldest sealed segments
//! beyond that many are deleted (a retention limit the operator chose; 0 keeps them all).
//!
//! Recovery: a crash can leave a torn record at the tail (a partial header, a partial payload,
//! or a checksum mismatch). Nothing in it was acknowledged, because acknowledgement follows
//! fsync. `open` truncates such a tail and logs a warning. Damage in the middle of the file
//! (a bad disk sector, a stray write) costs only the records it touches: the reader skips to
//! the next offset where an intact record starts, counts and logs the stretch it skipped, and
//! keeps everything after it (`Recovery::damaged_regions`). Start-up never stops for it.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::watch;

const MAGIC: &[u8; 8] = b"TNDLOG01";
const HEADER_LEN: usize = 8;
/// Largest payload accepted; a length above it in the file means a corrupt header.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
/// Most bytes written in one group-commit round, so one round cannot grow without bound.
const MAX_ROUND_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("event log {file}: {reason}")]
    Io { file: String, reason: String },
}

impl LogError {
    fn io(file: &Path, reason: impl std::fmt::Display) -> Self {
        LogError::Io {
            file: file.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// How far the log is durable. `failed` is set for good after a write or fsync error: after
/// a failed fsync the kernel may have dropped the dirty pages, so no later write can be
/// trusted to follow a complete prefix (the PostgreSQL "fsyncgate" lesson).
#[derive(Debug, Clone, Default)]
struct Durable {
    seq: u64,
    len: u64,
    failed: Option<String>,
}

struct Request {
    seq: u64,
    frames: Vec<u8>,
}

/// When the live file is sealed into a segment, and how many sealed segments are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Seal the live file once it holds this many bytes (0: never).
    pub segment_bytes: u64,
    /// Most sealed segments kept; the oldest beyond it are deleted (0: keep every one).
    pub keep_segments: usize,
}

/// An open event log. Cheap to share behind an `Arc`; `append` may be called concurrently.
pub struct EventLog {
    path: PathBuf,
    /// Held for reading by readers of the whole log and for writing by a rotation, so that a
    /// reader never sees a segment twice or misses one.
    segments: Arc<parking_lot::RwLock<()>>,
    /// Assigns sequence numbers in the order requests enter the channel.
    sender: parking_lot::Mutex<(u64, Option<mpsc::Sender<Request>>)>,
    durable: watch::Sender<Durable>,
    writer: Option<JoinHandle<()>>,
}

/// What `open` found in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    pub records: u64,
    /// Bytes of a torn tail that were cut off (0 after a clean shutdown).
    pub truncated_bytes: u64,
    /// Damaged stretches in the middle of the file that the reader skipped to the next
    /// intact record (each costs the records it overlaps, and nothing after it).
    pub damaged_regions: u64,
    /// Bytes in those stretches.
    pub skipped_bytes: u64,
}

impl EventLog {
    /// Opens (or creates) the log, passes every intact record to `replay` in order, truncates
    /// a torn tail, and starts the writer. Takes an exclusive lock on the file so that two
    /// processes cannot interleave records. Blocking: call from `spawn_blocking`.
    pub fn open(
        path: &Path,
        replay: impl FnMut(&[u8]) -> Result<(), LogError>,
    ) -> Result<(Self, Recovery), LogError> {
        Self::open_rotating(path, Rotation::default(), replay)
    }

    /// [`EventLog::open`], sealing the live file into segments as `rotation` says; the
    /// sealed segments are replayed first, oldest first.
    pub fn open_rotating(
        path: &Path,
        rotation: Rotation,
        mut replay: impl FnMut(&[u8]) -> Result<(), LogError>,
    ) -> Result<(Self, Recovery), LogError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LogError::io(path, e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| LogError::io(path, e))?;
        file.try_lock().map_err(|e| {
            LogError::io(
                path,
                format!("is locked by another process (is another tandem running?): {e}"),
            )
        })?;
        let mut sealed = Recovery::default();
        for (_, segment) in sealed_segments(path)? {
            let f = File::open(&segment).map_err(|e| LogError::io(&segment, e))?;
            let s = scan(&segment, &f, u64::MAX, &mut replay)?;
            sealed.records += s.records;
            sealed.damaged_regions += s.damaged_regions;
            sealed.skipped_bytes += s.skipped_bytes;
        }
        let scan = scan(path, &file, u64::MAX, |p| replay(p))?;
        let mut recovery = Recovery {
            records: sealed.records + scan.records,
            damaged_regions: sealed.damaged_regions + scan.damaged_regions,
            skipped_bytes: sealed.skipped_bytes + scan.skipped_bytes,
            ..Recovery::default()
        };
        if scan.damaged_regions > 0 {
            tracing::error!(
                file = %path.display(),
                damaged_regions = scan.damaged_regions,
                skipped_bytes = scan.skipped_bytes,
                kept_records = scan.records,
                "event log has damaged records in the middle (a disk or a copy went wrong); skipped them and kept every intact record"
            );
        }
        let file_len = file.metadata().map_err(|e| LogError::io(path, e))?.len();
        if scan.valid_len < HEADER_LEN as u64 {
            // New file, or a crash while writing the magic.
            file.set_len(0).map_err(|e| LogError::io(path, e))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| LogError::io(path, e))?;
            file.write_all(MAGIC).map_err(|e| LogError::io(path, e))?;
            file.sync_all().map_err(|e| LogError::io(path, e))?;
            // A new file's directory entry is only durable once the directory is synced.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| LogError::io(path, format!("syncing its directory: {e}")))?;
            }
        } else if scan.valid_len < file_len {
            recovery.truncated_bytes = file_len - scan.valid_len;
            tracing::warn!(
                file = %path.display(),
                kept_records = scan.records,
                truncated_bytes = recovery.truncated_bytes,
                reason = %scan.stop_reason.as_deref().unwrap_or("torn record"),
                "event log had a torn tail after an unclean shutdown; truncated it (none of it was acknowledged)"
            );
            file.set_len(scan.valid_len)
                .map_err(|e| LogError::io(path, e))?;
        }
        file.sync_all().map_err(|e| LogError::io(path, e))?;
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| LogError::io(path, e))?;
        if recovery.records > 0 {
            tracing::info!(file = %path.display(), records = recovery.records, bytes = len, "event log replayed");
        }

        let sink: Box<dyn LogSink> = match take_injected_sink(path) {
            Some(wrap) => wrap(file),
            None => Box::new(file),
        };
        let (tx, rx) = mpsc::channel::<Request>();
        let (durable, _) = watch::channel(Durable {
            seq: 0,
            len,
            failed: None,
        });
        let thread_durable = durable.clone();
        let thread_path = path.to_path_buf();
        let segments = Arc::new(parking_lot::RwLock::new(()));
        let thread_segments = segments.clone();
        let writer = std::thread::Builder::new()
            .name("tandem-event-log".into())
            .spawn(move || {
                write_loop(
                    sink,
                    len,
                    &thread_path,
                    rx,
                    thread_durable,
                    rotation,
                    &thread_segments,
                )
            })
            .map_err(|e| LogError::io(path, e))?;
        Ok((
            EventLog {
                path: path.to_path_buf(),
                segments,
                sender: parking_lot::Mutex::new((0, Some(tx))),
                durable,
                writer: Some(writer),
            },
            recovery,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues the payloads as one contiguous group of records and returns its sequence
    /// number. The records are durable once [`EventLog::wait_durable`] returns Ok for it.
    /// Requests are written in the order of their sequence numbers.
    pub fn enqueue(&self, payloads: &[Vec<u8>]) -> Result<u64, LogError> {
        let mut frames = Vec::with_capacity(payloads.iter().map(|p| p.len() + 8).sum());
        for p in payloads {
            if p.len() > MAX_RECORD_BYTES {
                return Err(LogError::io(
                    &self.path,
                    format!("a record of {} bytes exceeds {MAX_RECORD_BYTES}", p.len()),
                ));
            }
            frames.extend_from_slice(&(p.len() as u32).to_le_bytes());
            frames.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            frames.extend_from_slice(p);
        }
        if let Some(reason) = &self.durable.borrow().failed {
            return Err(LogError::io(&self.path, reason));
        }
        let mut guard = self.sender.lock();
        let (next, sender) = &mut *guard;
        let Some(sender) = sender.as_ref() else {
            return Err(LogError::io(&self.path, "the log is closed"));
        };
        *next += 1;
        let seq = *next;
        sender
            .send(Request { seq, frames })
            .map_err(|_| LogError::io(&self.path, "the log writer has stopped"))?;
        Ok(seq)
    }

    /// Waits until every request up to `seq` is fsynced.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), LogError> {
        let mut rx = self.durable.subscribe();
        let state = rx
            .wait_for(|d| d.failed.is_some() || d.seq >= seq)
            .await
            .map_err(|_| LogError::io(&self.path, "the log writer has stopped"))?;
        match &state.failed {
            // Requests fsynced before the failure stay acknowledged.
            Some(reason) if state.seq < seq => Err(LogError::io(&self.path, reason)),
            _ => Ok(()),
        }
    }

    /// Appends the payloads and returns once they are fsynced.
    pub async fn append(&self, payloads: &[Vec<u8>]) -> Result<(), LogError> {
        let seq = self.enqueue(payloads)?;
        self.wait_durable(seq).await
    }

    /// Whether the log still accepts writes (it refuses all after a failed write or fsync).
    pub fn check(&self) -> Result<(), LogError> {
        match &self.durable.borrow().failed {
            Some(reason) => Err(LogError::io(&self.path, reason)),
            None => Ok(()),
        }
    }

    /// Bytes of the file known to be complete and durable; readers stop there so that they
    /// never see a half-written group.
    pub fn durable_len(&self) -> u64 {
        self.durable.borrow().len
    }

    /// Reads every durable record in order, across the sealed segments. Blocking.
    pub fn read(&self, mut f: impl FnMut(&[u8]) -> Result<(), LogError>) -> Result<u64, LogError> {
        let _no_rotation = self.segments.read();
        let mut records = 0;
        for (_, segment) in sealed_segments(&self.path)? {
            records += read_file(&segment, u64::MAX, &mut f)?;
        }
        Ok(records + read_file(&self.path, self.durable_len(), &mut f)?)
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit.
        self.sender.lock().1 = None;
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// Reads the intact records of a log file without opening it for writing (for export while a
/// server owns the file). Stops at the first torn record or at `limit` bytes. Blocking.
pub fn read_file(
    path: &Path,
    limit: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), LogError>,
) -> Result<u64, LogError> {
    let file = File::open(path).map_err(|e| LogError::io(path, e))?;
    let scan = scan(path, &file, limit, |p| f(p))?;
    Ok(scan.records)
}

/// Reads the intact records of a log across its sealed segments and its live file, in
/// order, without opening it for writing (export while a server owns it). A rotation by the
/// server during the read is noticed (the segments changed) and the read starts again, so no
/// record is missed or read twice. Blocking.
pub fn read_segments(
    path: &Path,
    mut f: impl FnMut(&[u8]) -> Result<(), LogError>,
) -> Result<u64, LogError> {
    for _ in 0..5 {
        let before = sealed_segments(path)?;
        let mut records = Vec::new();
        for (_, segment) in &before {
            read_file(segment, u64::MAX, |p| {
                records.push(p.to_vec());
                Ok(())
            })?;
        }
        match read_file(path, u64::MAX, |p| {
            records.push(p.to_vec());
            Ok(())
        }) {
            Ok(_) => {}
            // Between a rotation's rename and the new file.
            Err(_) if !path.exists() => {}
            Err(e) => return Err(e),
        }
        if sealed_segments(path)? == before {
            for r in &records {
                f(r)?;
            }
            return Ok(records.len() as u64);
        }
    }
    Err(LogError::io(
        path,
        "the log kept rotating while it was read; retry",
    ))
}

/// The sealed segments of the log at `path` (`<path>.NNNNNNNN`), oldest first.
pub fn sealed_segments(path: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LogError::io(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io(dir, e))?;
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_digit()) {
            found.push((rest.parse::<u64>().expect("8 digits"), entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

fn segment_path(path: &Path, n: u64) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n:08}"));
    PathBuf::from(p)
}

/// Seals the live file at `path` as the next segment and starts a new live file (locked,
/// with the magic, fsynced, the directory fsynced); then deletes the oldest sealed segments
/// beyond `keep` (when `keep` > 0). Returns the new live file.
fn rotate(path: &Path, keep: usize) -> Result<File, LogError> {
    let sealed = sealed_segments(path)?;
    let next = sealed.last().map_or(1, |(n, _)| n + 1);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let sync_dir = || {
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LogError::io(&dir, e))
    };
    let target = segment_path(path, next);
    std::fs::rename(path, &target).map_err(|e| LogError::io(&target, e))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| LogError::io(path, e))?;
    file.try_lock().map_err(|e| LogError::io(path, e))?;
    file.write_all(MAGIC)
        .and_then(|_| file.sync_all())
        .map_err(|e| LogError::io(path, e))?;
    sync_dir()?;
    tracing::info!(file = %path.display(), sealed = %target.display(), "event log rotated");
    if keep > 0 && sealed.len() + 1 > keep {
        for (_, old) in &sealed[..sealed.len() + 1 - keep] {
            match std::fs::remove_file(old) {
                Ok(()) => {
                    tracing::warn!(segment = %old.display(), keep, "event log: deleted a sealed segment past session.log_keep_segments")
                }
                Err(e) => {
                    tracing::warn!(segment = %old.display(), error = %e, "event log: could not delete an old segment")
                }
            }
        }
        sync_dir()?;
    }
    Ok(file)
}

struct Scan {
    records: u64,
    /// End of the last intact record (the file's end when nothing is torn at the tail).
    valid_len: u64,
    stop_reason: Option<String>,
    damaged_regions: u64,
    skipped_bytes: u64,
}

/// A buffered reader of `file` from byte `pos` up to byte `end`.
fn reader_at(file: &File, pos: u64, end: u64) -> std::io::Result<BufReader<std::io::Take<&File>>> {
    let mut f = file;
    f.seek(SeekFrom::Start(pos))?;
    Ok(BufReader::with_capacity(
        1 << 20,
        f.take(end.saturating_sub(pos)),
    ))
}

/// Reads the records of the file in order, up to `limit` bytes. A damaged record (a bad
/// length, a checksum mismatch) is skipped: the reader looks for the next offset where an
/// intact record starts (a plausible length and a matching CRC), logs and counts the
/// stretch it skipped, and goes on from there. Damage with no intact record after it is a
/// torn tail: `valid_len` ends before it.
fn scan(
    path: &Path,
    file: &File,
    limit: u64,
    mut f: impl FnMut(&[u8]) -> Result<(), LogError>,
) -> Result<Scan, LogError> {
    let file_len = file.metadata().map_err(|e| LogError::io(path, e))?.len();
    let end = limit.min(file_len);
    let mut reader = reader_at(file, 0, end).map_err(|e| LogError::io(path, e))?;
    let mut header = [0u8; HEADER_LEN];
    let got = read_up_to(&mut reader, &mut header).map_err(|e| LogError::io(path, e))?;
    if got < HEADER_LEN {
        if header[..got] != MAGIC[..got] {
            return Err(LogError::io(path, "is not a tandem event log (bad magic)"));
        }
        return Ok(Scan {
            records: 0,
            valid_len: 0,
            stop_reason: None,
            damaged_regions: 0,
            skipped_bytes: 0,
        });
    }
    if &header != MAGIC {
        return Err(LogError::io(path, "is not a tandem event log (bad magic)"));
    }
    let mut pos = HEADER_LEN as u64;
    let mut records = 0u64;
    let mut damaged_regions = 0u64;
    let mut skipped_bytes = 0u64;
    let mut payload = Vec::new();
    let stop_reason = loop {
        let mut frame = [0u8; 8];
        let got = read_up_to(&mut reader, &mut frame).map_err(|e| LogError::io(path, e))?;
        if got == 0 {
            break None;
        }
        let damage = if got < 8 {
            Some(format!("partial record header at byte {pos}"))
        } else {
            let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
            if len > MAX_RECORD_BYTES {
                Some(format!("impossible record length {len} at byte {pos}"))
            } else {
                payload.resize(len, 0);
                let got =
                    read_up_to(&mut reader, &mut payload).map_err(|e| LogError::io(path, e))?;
                if got < len {
                    Some(format!(
                        "partial record at byte {pos} ({got} of {len} bytes)"
                    ))
                } else if crc32fast::hash(&payload) != crc {
                    Some(format!("checksum mismatch at byte {pos}"))
                } else {
                    f(&payload)?;
                    records += 1;
                    pos += 8 + len as u64;
                    if records.is_multiple_of(1_000_000) {
                        tracing::info!(file = %path.display(), records, "reading event log");
                    }
                    None
                }
            }
        };
        let Some(reason) = damage else { continue };
        match resync(file, pos + 1, end).map_err(|e| LogError::io(path, e))? {
            Some(next) => {
                damaged_regions += 1;
                skipped_bytes += next - pos;
                tracing::warn!(
                    file = %path.display(),
                    from_byte = pos,
                    skipped_bytes = next - pos,
                    reason,
                    "event log: skipped a damaged stretch to the next intact record (the records in it are lost, none after it)"
                );
                pos = next;
                reader = reader_at(file, pos, end).map_err(|e| LogError::io(path, e))?;
            }
            None => break Some(reason),
        }
    };
    Ok(Scan {
        records,
        valid_len: pos,
        stop_reason,
        damaged_regions,
        skipped_bytes,
    })
}

/// The first offset in `from..end` where an intact record starts, if any: a non-zero length
/// that fits the file and a payload whose CRC matches (a false match is a 1 in 2^32 chance
/// per plausible offset). Reads windows of the file, and a payload only for offsets whose
/// length is plausible.
fn resync(file: &File, from: u64, end: u64) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    const WINDOW: usize = 1 << 16;
    let mut buf = vec![0u8; WINDOW + 8];
    let mut payload = Vec::new();
    let mut start = from;
    while start + 8 <= end {
        let n = ((end - start) as usize).min(WINDOW + 8);
        file.read_exact_at(&mut buf[..n], start)?;
        let last = n - 8;
        for i in 0..=last {
            let cand = start + i as u64;
            let len = u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes")) as usize;
            if len == 0 || len > MAX_RECORD_BYTES || cand + 8 + len as u64 > end {
                continue;
            }
            let crc = u32::from_le_bytes(buf[i + 4..i + 8].try_into().expect("4 bytes"));
            payload.resize(len, 0);
            file.read_exact_at(&mut payload, cand + 8)?;
            if crc32fast::hash(&payload) == crc {
                return Ok(Some(cand));
            }
        }
        start += last as u64 + 1;
    }
    Ok(None)
}

/// Like `read_exact`, but returns how much it read at end of file instead of failing.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where the writer thread puts records and fsyncs them: the log file, or, in a test, a
/// stand-in around it that fails (see [`inject_sink`]).
pub trait LogSink: Send {
    fn append_bytes(&mut self, buf: &[u8]) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
}

impl LogSink for File {
    fn append_bytes(&mut self, buf: &[u8]) -> std::io::Result<()> {
        Write::write_all(self, buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        File::sync_data(self)
    }
}

type SinkWrapper = Box<dyn FnOnce(File) -> Box<dyn LogSink> + Send>;

static INJECTED_SINKS: parking_lot::Mutex<Vec<(PathBuf, SinkWrapper)>> =
    parking_lot::Mutex::new(Vec::new());

/// For tests of the failure paths: the next [`EventLog::open`] of `path` hands its writer
/// `wrap(file)` instead of the file (for instance a sink whose fsync fails, which the page
/// cache of a SIGKILL test can never show). Keyed by path, so tests running in parallel in one
/// process do not see each other's faults.
#[doc(hidden)]
pub fn inject_sink(path: &Path, wrap: impl FnOnce(File) -> Box<dyn LogSink> + Send + 'static) {
    INJECTED_SINKS
        .lock()
        .push((path.to_path_buf(), Box::new(wrap)));
}

fn take_injected_sink(path: &Path) -> Option<SinkWrapper> {
    let mut sinks = INJECTED_SINKS.lock();
    let i = sinks.iter().position(|(p, _)| p == path)?;
    Some(sinks.swap_remove(i).1)
}

fn write_loop(
    mut file: Box<dyn LogSink>,
    mut len: u64,
    path: &Path,
    rx: mpsc::Receiver<Request>,
    durable: watch::Sender<Durable>,
    rotation: Rotation,
    segments: &parking_lot::RwLock<()>,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    // Blocks until a request arrives; ends when the log is dropped and the queue is drained.
    while let Ok(first) = rx.recv() {
        buf.clear();
        let mut last_seq = first.seq;
        buf.extend_from_slice(&first.frames);
        while buf.len() < MAX_ROUND_BYTES {
            match rx.try_recv() {
                Ok(r) => {
                    last_seq = r.seq;
                    buf.extend_from_slice(&r.frames);
                }
                Err(_) => break,
            }
        }
        let result = file.append_bytes(&buf).and_then(|_| file.sync());
        match result {
            Ok(()) => {
                len += buf.len() as u64;
                // Rotate before acknowledging, so that when an append returns its records
                // are where they stay (sealed, or in the live file) and the live file exists.
                let mut _readers_wait = None;
                if rotation.segment_bytes > 0 && len >= rotation.segment_bytes {
                    _readers_wait = Some(segments.write());
                    match rotate(path, rotation.keep_segments) {
                        Ok(new) => {
                            file = Box::new(new);
                            len = HEADER_LEN as u64;
                        }
                        // The records are durable where they are; the next round tries again.
                        Err(e) => {
                            tracing::error!(file = %path.display(), error = %e, "event log rotation failed; still appending to the current file")
                        }
                    }
                }
                durable.send_modify(|d| {
                    d.seq = last_seq;
                    d.len = len;
                });
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "event log write failed; refusing further appends");
                durable.send_modify(|d| d.failed = Some(format!("write or fsync failed: {e}")));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(path: &Path) -> (Vec<Vec<u8>>, Recovery, EventLog) {
        let mut out = Vec::new();
        let (log, rec) = EventLog::open(path, |p| {
            out.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        (out, rec, log)
    }

    /// The live file is sealed into segments by size, so no one file grows without bound;
    /// the live reader, the export reader and a restart all read every record, in order,
    /// across the segments; and a retention limit keeps that many sealed segments.
    #[tokio::test]
    async fn the_log_rotates_by_size_and_every_reader_reads_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let record = |i: usize| format!("record {i:05} {}", "x".repeat(90)).into_bytes();
        let rotation = Rotation {
            segment_bytes: 4096,
            keep_segments: 0,
        };
        let all: Vec<Vec<u8>> = (0..600).map(record).collect();
        {
            let (log, _) = EventLog::open_rotating(&path, rotation, |_| Ok(())).unwrap();
            for chunk in all.chunks(10) {
                log.append(chunk).await.unwrap();
            }
            let sealed = sealed_segments(&path).unwrap();
            assert!(sealed.len() >= 10, "{} segments", sealed.len());
            for (_, seg) in &sealed {
                let len = std::fs::metadata(seg).unwrap().len();
                assert!(len < 4096 + 2_000, "{} is {len} bytes", seg.display());
            }
            assert!(std::fs::metadata(&path).unwrap().len() < 4096 + 2_000);
            let mut live = Vec::new();
            log.read(|p| {
                live.push(p.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(live, all, "the server's own reader");
            let mut exported = Vec::new();
            read_segments(&path, |p| {
                exported.push(p.to_vec());
                Ok(())
            })
            .unwrap();
            assert_eq!(exported, all, "export while the server owns the log");
        }
        let mut replayed = Vec::new();
        let (log, rec) = EventLog::open_rotating(&path, rotation, |p| {
            replayed.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(replayed, all, "a restart");
        assert_eq!(rec.records, 600);
        drop(log);
        // Keeping 3 sealed segments: the next rotation deletes the older ones.
        let keep = Rotation {
            segment_bytes: 4096,
            keep_segments: 3,
        };
        let (log, _) = EventLog::open_rotating(&path, keep, |_| Ok(())).unwrap();
        for chunk in (600..700).map(record).collect::<Vec<_>>().chunks(10) {
            log.append(chunk).await.unwrap();
        }
        assert_eq!(sealed_segments(&path).unwrap().len(), 3);
        let mut kept = Vec::new();
        log.read(|p| {
            kept.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(kept.last(), Some(&record(699)));
        assert!(kept.len() < 700);
    }

    /// Once an append returns, a rotation it caused is over: its records are in a sealed
    /// segment and the new live file is there. (The writer used to acknowledge first and
    /// rotate after, so a reader right after an append could find no live file.)
    #[tokio::test]
    async fn an_append_returns_after_the_rotation_it_caused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let rotation = Rotation {
            segment_bytes: 64,
            keep_segments: 0,
        };
        let (log, _) = EventLog::open_rotating(&path, rotation, |_| Ok(())).unwrap();
        for i in 0..300 {
            log.append(&[format!("record {i:05} {}", "x".repeat(60)).into_bytes()])
                .await
                .unwrap();
            let live = std::fs::metadata(&path).map(|m| m.len());
            assert_eq!(live.ok(), Some(HEADER_LEN as u64), "after append {i}");
            assert_eq!(
                sealed_segments(&path).unwrap().len(),
                i + 1,
                "after append {i}"
            );
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        {
            let (seen, _, log) = collect(&path);
            assert!(seen.is_empty());
            log.append(&[b"one".to_vec(), b"two".to_vec()])
                .await
                .unwrap();
            log.append(&[b"three".to_vec()]).await.unwrap();
        }
        let good_len = std::fs::metadata(&path).unwrap().len();
        // A crash mid-write: a header promising 100 bytes, then 5 of them.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&100u32.to_le_bytes()).unwrap();
        f.write_all(&0u32.to_le_bytes()).unwrap();
        f.write_all(b"abcde").unwrap();
        drop(f);
        let (seen, rec, log) = collect(&path);
        assert_eq!(
            seen,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!(
            rec,
            Recovery {
                records: 3,
                truncated_bytes: 13,
                ..Recovery::default()
            }
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
        log.append(&[b"four".to_vec()]).await.unwrap();
        drop(log);
        let (seen, rec, _log) = collect(&path);
        assert_eq!(seen.len(), 4);
        assert_eq!(rec.truncated_bytes, 0);
    }

    #[tokio::test]
    async fn checksum_mismatch_stops_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        {
            let (_, _, log) = collect(&path);
            log.append(&[b"keep".to_vec(), b"flip".to_vec()])
                .await
                .unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (seen, rec, _log) = collect(&path);
        assert_eq!(seen, vec![b"keep".to_vec()]);
        assert_eq!(rec.truncated_bytes, 12);
    }

    #[tokio::test]
    async fn a_damaged_record_in_the_middle_costs_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let payloads: Vec<Vec<u8>> = (0..350)
            .map(|i| format!(r#"{{"kind":"event","n":{i}}}"#).into_bytes())
            .collect();
        {
            let (_, _, log) = collect(&path);
            for p in &payloads {
                log.append(std::slice::from_ref(p)).await.unwrap();
            }
        }
        // Overwrite 4 bytes in the middle of the file: inside record 175's payload or frame.
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid..mid + 4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        std::fs::write(&path, &bytes).unwrap();
        let (seen, rec, log) = collect(&path);
        assert!(
            seen.len() == 349 || seen.len() == 348,
            "kept {} of 350",
            seen.len()
        );
        assert!(seen.iter().all(|p| payloads.contains(p)));
        assert_eq!(seen.last(), payloads.last());
        assert_eq!(rec.damaged_regions, 1, "{rec:?}");
        assert!(rec.skipped_bytes > 0, "{rec:?}");
        assert_eq!(rec.truncated_bytes, 0, "{rec:?}");
        // New records go after the kept ones, and a reader sees them all.
        log.append(&[b"after".to_vec()]).await.unwrap();
        let mut n = 0;
        log.read(|_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, seen.len() + 1);
        drop(log);
        let mut exported = 0;
        read_file(&path, u64::MAX, |_| {
            exported += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(exported, seen.len() + 1);
    }

    /// A file whose fsync fails from the first call on.
    struct FailingSync(File);

    impl LogSink for FailingSync {
        fn append_bytes(&mut self, buf: &[u8]) -> std::io::Result<()> {
            Write::write_all(&mut self.0, buf)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("injected: fsync failed (EIO)"))
        }
    }

    #[tokio::test]
    async fn a_failed_fsync_fails_the_append_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        inject_sink(&path, |f| Box::new(FailingSync(f)));
        let (_, _, log) = collect(&path);
        let err = log.append(&[b"one".to_vec()]).await.unwrap_err();
        assert!(err.to_string().contains("fsync failed"), "{err}");
        assert!(log.check().is_err());
        assert!(log.append(&[b"two".to_vec()]).await.is_err());
    }

    #[test]
    fn a_foreign_file_is_refused_and_a_second_writer_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-log");
        std::fs::write(&path, "user_id,item_id\n").unwrap();
        let err = EventLog::open(&path, |_| Ok(())).err().unwrap();
        assert!(err.to_string().contains("not a tandem event log"), "{err}");

        let path = dir.path().join("events.log");
        let (_log, _) = EventLog::open(&path, |_| Ok(())).unwrap();
        let err = EventLog::open(&path, |_| Ok(())).err().unwrap();
        assert!(err.to_string().contains("locked"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_all_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let (_, _, log) = collect(&path);
        let log = std::sync::Arc::new(log);
        let tasks: Vec<_> = (0..16)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        log.append(&[format!("{t}-{i}").into_bytes()])
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let mut n = 0;
        log.read(|_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 320);
    }
}
