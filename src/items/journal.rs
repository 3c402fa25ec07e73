//! The catalog journal: what makes an item write durable on the embedded index.

use crate::catalog::CatalogError;
use crate::domain::Item;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Items added through the API since the catalog file was written, so that they survive a
/// restart (the index keeps their vectors; the catalog file does not know them). One item per
/// line in the common JSONL format (plus the item's `popularity`, which the format ignores),
/// followed by a tab and the CRC-32 of the JSON in hex, appended and fsynced before the write
/// is acknowledged. A damaged line costs that line only (see [`CatalogJournal::read`]).
///
/// The journal is also what makes an acknowledged upsert durable: the API writes items to the
/// index without waiting for the engine's flush (`VectorIndex::upsert_buffered`), and a
/// sidecar file (`<journal>.flushed`) holds the journal's length as of the last index flush
/// that covered it. A start replays the lines past that mark into the index. Every flush
/// moves the mark forward: the periodic one, and those of patches and deletes, which must,
/// or a replay would undo them with an older line. Availability and price changes need no
/// journal lines: they live in the index payload, which `Catalog::load` reads.
pub struct CatalogJournal {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
    /// The mark as last written; it only moves forward.
    marked: Mutex<Option<u64>>,
    /// Lines appended since the last flush mark was taken.
    unflushed: std::sync::atomic::AtomicBool,
}

/// One journal line: an item in the common format, and its popularity.
#[derive(Serialize, Deserialize)]
struct JournalLine {
    #[serde(flatten)]
    item: Item,
    #[serde(default)]
    popularity: f32,
}

/// Parses one journal line: `<json>\t<crc32 of the json, 8 hex digits>`. A line without the
/// checksum (written before checksums) is taken if its JSON parses. A JSON string never holds
/// a raw tab (serde escapes it), so the last tab starts the checksum.
fn parse_line(line: &str) -> Result<JournalLine, String> {
    let (json, crc) = match line.rsplit_once('\t') {
        Some((json, crc)) if crc.len() == 8 && crc.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (json, u32::from_str_radix(crc, 16).ok())
        }
        _ => (line, None),
    };
    if let Some(crc) = crc {
        if crc32fast::hash(json.as_bytes()) != crc {
            return Err("checksum mismatch".into());
        }
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

impl CatalogJournal {
    pub fn new(path: PathBuf) -> Self {
        CatalogJournal {
            path,
            file: Mutex::new(None),
            marked: Mutex::new(None),
            unflushed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The journaled items, oldest first. A damaged line (its checksum or its JSON does not
    /// hold, or it is a torn last line from a crash mid-append) costs that line only: it is
    /// skipped, counted and logged, and start-up goes on.
    pub fn read(&self) -> Result<Vec<Item>, CatalogError> {
        Ok(self.read_from(0)?.into_iter().map(|(i, _)| i).collect())
    }

    /// The items (with their popularity) of the lines at or past byte `offset`.
    fn read_from(&self, offset: u64) -> Result<Vec<(Item, f32)>, CatalogError> {
        use std::io::{Read, Seek};
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut tail = Vec::new();
        file.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| file.read_to_end(&mut tail))
            .map_err(|e| self.io(e))?;
        let text = String::from_utf8_lossy(&tail);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut items = Vec::with_capacity(lines.len());
        let mut skipped = 0usize;
        for (n, line) in lines.iter().enumerate() {
            match parse_line(line) {
                Ok(l) => items.push((l.item, l.popularity)),
                Err(e) if n + 1 == lines.len() && !text.ends_with('\n') => {
                    tracing::warn!(file = %self.path.display(), error = %e, "skipping a torn last line (a crash mid-append; it was never acknowledged)");
                }
                Err(e) => {
                    skipped += 1;
                    tracing::error!(
                        file = %self.path.display(),
                        line = n + 1,
                        past_byte = offset,
                        error = %e,
                        "catalog journal: skipping a damaged line (that item write is lost, no other)"
                    );
                }
            }
        }
        if skipped > 0 {
            tracing::error!(file = %self.path.display(), skipped, kept = items.len(), "catalog journal had damaged lines; kept every intact one");
        }
        Ok(items)
    }

    fn mark_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".flushed");
        self.path.with_file_name(name)
    }

    /// The journal's length in bytes: a flush mark to take before a flush.
    pub fn byte_len(&self) -> Result<u64, CatalogError> {
        // Under the append lock, so the length is never in the middle of an append.
        let _file = self.file.lock();
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Records that every line before byte `offset` is in a flushed index (a mark taken with
    /// [`CatalogJournal::byte_len`] before the flush); durable when this returns.
    pub fn mark_flushed(&self, offset: u64) -> Result<(), CatalogError> {
        let mut marked = self.marked.lock();
        if marked.is_some_and(|m| m >= offset) {
            return Ok(());
        }
        let path = self.mark_path();
        let tmp = path.with_extension("flushed.tmp");
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, offset.to_string().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| self.io(e))?;
        *marked = Some(offset);
        Ok(())
    }

    /// The items of the lines past the flush mark: acknowledged, but perhaps not in the
    /// index after a crash. A journal without a mark comes from a version that flushed the
    /// index before every acknowledgement, so all of it is flushed; the mark is written then.
    /// Returns the items and the journal's length they end at.
    pub fn unflushed(&self) -> Result<(Vec<(Item, f32)>, u64), CatalogError> {
        let end = self.byte_len()?;
        let mark = match std::fs::read_to_string(self.mark_path()) {
            Ok(t) => t.trim().parse::<u64>().map_err(|e| CatalogError::Journal {
                file: self.mark_path(),
                reason: format!("not a byte offset: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.mark_flushed(end)?;
                end
            }
            Err(e) => return Err(self.io(e)),
        };
        *self.marked.lock() = Some(mark);
        Ok((self.read_from(mark)?, end))
    }

    /// Whether lines were appended since the last call; the periodic flusher asks.
    pub fn take_unflushed(&self) -> bool {
        self.unflushed
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Says the last [`CatalogJournal::take_unflushed`] still holds (its flush failed).
    pub fn keep_unflushed(&self) {
        self.unflushed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Appends items and their popularity durably (blocking I/O: call it off the async
    /// workers).
    pub fn append(&self, items: &[(Item, f32)]) -> Result<(), CatalogError> {
        use std::io::Write;
        let mut buf = Vec::new();
        for (item, popularity) in items {
            let line = JournalLine {
                item: item.clone(),
                popularity: *popularity,
            };
            let json = serde_json::to_vec(&line).map_err(|e| CatalogError::Journal {
                file: self.path.clone(),
                reason: e.to_string(),
            })?;
            buf.extend_from_slice(&json);
            buf.extend_from_slice(format!("\t{:08x}\n", crc32fast::hash(&json)).as_bytes());
        }
        let mut file = self.file.lock();
        if file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
            }
            // Drop a torn tail first, so the next line starts on a line of its own.
            if let Ok(text) = std::fs::read(&self.path) {
                if !text.is_empty() && !text.ends_with(b"\n") {
                    let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&self.path)
                        .map_err(|e| self.io(e))?;
                    f.set_len(keep as u64).map_err(|e| self.io(e))?;
                }
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| self.io(e))?;
            *file = Some(f);
        }
        let f = file.as_mut().expect("opened above");
        f.write_all(&buf).map_err(|e| self.io(e))?;
        f.sync_data().map_err(|e| self.io(e))?;
        self.unflushed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn io(&self, e: std::io::Error) -> CatalogError {
        CatalogError::Journal {
            file: self.path.clone(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ItemId;

    fn item(id: &str, genre: &str) -> Item {
        let mut item = Item::new(ItemId::parse(id).unwrap(), format!("title {id}"));
        item.categories = [genre.into()].into();
        item
    }

    #[test]
    fn journal_round_trips_and_tolerates_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/items-added.jsonl");
        let j = CatalogJournal::new(path.clone());
        assert!(j.read().unwrap().is_empty());
        let a = item("a", "x");
        let b = item("b", "y");
        j.append(&[(a.clone(), 1.0)]).unwrap();
        j.append(&[(b.clone(), 1.0)]).unwrap();
        assert_eq!(j.read().unwrap(), vec![a.clone(), b.clone()]);
        // A crash in the middle of an append leaves half a line.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"item_id":"c","tit"#).unwrap();
        assert_eq!(j.read().unwrap(), vec![a.clone(), b.clone()]);
        // A fresh writer (after the restart) cuts the torn tail before appending.
        let j = CatalogJournal::new(path.clone());
        let c = item("c", "z");
        j.append(&[(c.clone(), 1.0)]).unwrap();
        assert_eq!(j.read().unwrap(), vec![a, b, c]);
        // Damage anywhere else costs the damaged lines only.
        std::fs::write(&path, "not json\n{}\n").unwrap();
        assert!(j.read().unwrap().is_empty());
    }

    #[test]
    fn a_damaged_line_in_the_middle_costs_only_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items-added.jsonl");
        let j = CatalogJournal::new(path.clone());
        let items: Vec<Item> = (0..5).map(|i| item(&format!("i{i}"), "g")).collect();
        for it in &items {
            j.append(&[(it.clone(), 1.0)]).unwrap();
        }
        // Overwrite 4 bytes inside line 3 (i2): once so it no longer parses, once so it still
        // parses but says something else (a flipped letter in its title).
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find(r#""i2""#).unwrap();
        let mut bytes = text.clone().into_bytes();
        bytes[start..start + 4].copy_from_slice(b"\0\0\0\0");
        std::fs::write(&path, &bytes).unwrap();
        let got = CatalogJournal::new(path.clone()).read().unwrap();
        let want: Vec<Item> = items
            .iter()
            .filter(|i| i.item_id.as_str() != "i2")
            .cloned()
            .collect();
        assert_eq!(got, want);
        let title = text.find("title i2").unwrap();
        let mut bytes = text.into_bytes();
        bytes[title..title + 4].copy_from_slice(b"TITL");
        std::fs::write(&path, &bytes).unwrap();
        let j = CatalogJournal::new(path.clone());
        assert_eq!(j.read().unwrap(), want);
        // The pending lines past a mark skip it the same way, and appends go on.
        let (pending, _) = j.unflushed().unwrap();
        assert!(pending.is_empty());
        let last = item("i5", "g");
        j.append(&[(last.clone(), 1.0)]).unwrap();
        let mut want = want;
        want.push(last);
        assert_eq!(j.read().unwrap(), want);
    }

    #[test]
    fn the_flush_mark_splits_the_journal_into_flushed_and_pending_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("items-added.jsonl");
        let j = CatalogJournal::new(path.clone());
        let a = item("a", "x");
        j.append(&[(a, 1.0)]).unwrap();
        // A journal written before marks existed was flushed line by line: nothing pending.
        let (pending, end) = j.unflushed().unwrap();
        assert!(pending.is_empty());
        assert_eq!(end, j.byte_len().unwrap());
        // A restart sees what was appended past the mark, with its popularity.
        let b = item("b", "y");
        j.append(&[(b.clone(), 7.5)]).unwrap();
        assert!(j.take_unflushed());
        assert!(!j.take_unflushed(), "taken once");
        let j = CatalogJournal::new(path.clone());
        let (pending, end) = j.unflushed().unwrap();
        assert_eq!(pending, vec![(b, 7.5)]);
        // A mark moves forward only.
        j.mark_flushed(end).unwrap();
        j.mark_flushed(0).unwrap();
        let (pending, _) = CatalogJournal::new(path).unflushed().unwrap();
        assert!(pending.is_empty());
    }
}
