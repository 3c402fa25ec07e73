//! A compact binary copy of what an embedded collection rebuilds in RAM when it is opened:
//! per point its id, live fields, filterable attributes, categories, creation time and unit
//! vector ([`super::payloads::RamPoint`] plus what the category blocks need). Rebuilding it
//! from the engine makes the engine decode every payload (about 10 s at 1M points on two
//! cores); reading this file takes about a second (issue 37).
//!
//! The file is only a cache of the engine's state and must never shadow a write the engine
//! has: the collection writes it when no write is in flight and nothing has been written
//! since its RAM copy was read, and its writer thread removes it (durably) before it applies
//! any later write (see `edge`). A restart reads it only when it is there, whole (a CRC32
//! covers every byte), of the collection's dimension and filterable names, and holds as many
//! points as the engine; otherwise it rebuilds from the engine as before.
//!
//! Layout (little endian): magic, format, dimension, point count, the filterable names, the
//! category names, then per point its UUID, item id, flags (available, has a price, has a
//! creation time), price, popularity, creation time, category numbers, attributes and
//! vector (in half precision, as [`Vector`] holds it); last the CRC32 of everything before it.

use super::payloads::RamPoint;
use super::Vector;
use crate::domain::{AttrValue, ItemId, Name};
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use uuid::Uuid;

const MAGIC: &[u8; 8] = b"TNDMRAM\0";
/// 2: vectors in half precision (1 had f32).
const FORMAT: u32 = 2;

/// The file name of a collection's snapshot, beside its `meta.json`.
pub const FILE: &str = "ram-snapshot.bin";

/// What a snapshot holds: the category names, and every point.
#[derive(Debug)]
pub struct Snapshot {
    pub categories: Vec<String>,
    pub points: Vec<SnapPoint>,
}

/// One point as the snapshot holds it.
#[derive(Debug, Clone)]
pub struct SnapPoint {
    pub id: Uuid,
    pub ram: RamPoint,
    /// The categories whose blocks hold the point, as numbers into
    /// [`Snapshot::categories`] (empty when the blocks are off).
    pub categories: Vec<u32>,
    pub created_at: Option<i64>,
}

impl Snapshot {
    /// The names of a point's categories.
    pub fn names(&self, p: &SnapPoint) -> Vec<String> {
        p.categories
            .iter()
            .map(|&c| self.categories[c as usize].clone())
            .collect()
    }
}

/// Writes `bytes` to `out` and into the running checksum.
struct Summed<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Summed<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }
    fn u8(&mut self, v: u8) -> std::io::Result<()> {
        self.put(&[v])
    }
    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> std::io::Result<()> {
        self.u32(s.len() as u32)?;
        self.put(s.as_bytes())
    }
}

/// Writes the snapshot of `points` (`n` of them) to a temporary file beside `path`, synced,
/// and returns its path; [`install`] puts it in place. `categories(id)` gives a point's
/// category numbers (into `category_names`) and creation time (from the category blocks).
pub fn write_temp<'a>(
    path: &Path,
    dim: usize,
    filterable: &[String],
    n: usize,
    points: impl Iterator<Item = (&'a Uuid, &'a RamPoint)>,
    categories: impl Fn(&Uuid) -> Option<(Vec<u32>, i64)>,
    category_names: &[String],
) -> std::io::Result<std::path::PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{FILE}.{}", Uuid::new_v4()));
    let tmp_path = tmp.clone();
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = Summed {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
        };
        w.put(MAGIC)?;
        w.u32(FORMAT)?;
        w.u32(dim as u32)?;
        w.put(&(n as u64).to_le_bytes())?;
        w.u32(filterable.len() as u32)?;
        for f in filterable {
            w.str(f)?;
        }
        w.u32(category_names.len() as u32)?;
        for c in category_names {
            w.str(c)?;
        }
        let mut written = 0usize;
        for (id, p) in points {
            written += 1;
            w.put(id.as_bytes())?;
            w.str(p.item_id.as_str())?;
            let (cats, created_at) = categories(id).unwrap_or((Vec::new(), i64::MIN));
            let flags = u8::from(p.available)
                | (u8::from(p.price.is_some()) << 1)
                | (u8::from(created_at != i64::MIN) << 2);
            w.u8(flags)?;
            w.put(&p.price.unwrap_or(0.0).to_le_bytes())?;
            w.put(&p.popularity.to_le_bytes())?;
            w.put(&created_at.to_le_bytes())?;
            w.u32(cats.len() as u32)?;
            for c in cats {
                w.u32(c)?;
            }
            w.u32(p.attributes.len() as u32)?;
            for (name, value) in p.attributes.iter() {
                w.str(name)?;
                match value {
                    AttrValue::Bool(b) => {
                        w.u8(0)?;
                        w.u8(u8::from(*b))?;
                    }
                    AttrValue::Number(x) => {
                        w.u8(1)?;
                        w.put(&x.to_le_bytes())?;
                    }
                    AttrValue::Text(s) => {
                        w.u8(2)?;
                        w.str(s)?;
                    }
                    AttrValue::List(l) => {
                        w.u8(3)?;
                        w.u32(l.len() as u32)?;
                        for s in l {
                            w.str(s)?;
                        }
                    }
                }
            }
            if p.vector.len() != dim {
                return Err(std::io::Error::other("a vector of another dimension"));
            }
            for x in p.vector.bits() {
                w.put(&x.to_le_bytes())?;
            }
        }
        if written != n {
            return Err(std::io::Error::other(
                "the points changed while being written",
            ));
        }
        let crc = w.crc.clone().finalize();
        w.out.write_all(&crc.to_le_bytes())?;
        let file = w.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp_path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Puts a snapshot written by [`write_temp`] in place of `path`, durably.
pub fn install(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    sync_dir(path)
}

/// Syncs the directory holding `path`, so that a rename or removal in it is durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Reads fields off a byte slice; every read checks the length.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("truncated")?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| "a string is not UTF-8".to_string())
    }
    fn string(&mut self) -> Result<String, String> {
        self.str().map(str::to_string)
    }
}

/// Reads a snapshot written by [`write`] for a collection of `dim` dimensions whose RAM copy
/// keeps the attributes `filterable`. `Ok(None)`: there is no snapshot; `Err`: there is one
/// but it cannot be used (the reason).
///
/// The file is mapped, not read into a buffer: at 1M items it is about 370 MB, which a read
/// copied into as many freshly zeroed pages (a tenth of a restart's CPU, issue 37).
pub fn read(path: &Path, dim: usize, filterable: &[String]) -> Result<Option<Snapshot>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    // SAFETY: the mapping lives only for this call. tandem never writes a snapshot in place
    // (`write` makes a new file and renames it over, and a later write removes it), so the
    // mapped file's bytes do not change under `decode`; an unlinked file stays mapped whole.
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
        .map_err(|e| format!("cannot read it: {e}"))?;
    decode(&map, dim, filterable).map(Some)
}

fn decode(bytes: &[u8], dim: usize, filterable: &[String]) -> Result<Snapshot, String> {
    let Some(body_len) = bytes.len().checked_sub(4) else {
        return Err("truncated".into());
    };
    let (body, crc) = bytes.split_at(body_len);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum mismatch (a torn or corrupt file)".into());
    }
    let mut r = Reader { bytes: body, at: 0 };
    if r.take(MAGIC.len())? != MAGIC {
        return Err("not a tandem RAM snapshot".into());
    }
    let format = r.u32()?;
    if format != FORMAT {
        return Err(format!("format {format}, expected {FORMAT}"));
    }
    let file_dim = r.u32()? as usize;
    if file_dim != dim {
        return Err(format!("dimension {file_dim}, the collection has {dim}"));
    }
    let n = u64::from_le_bytes(r.array()?) as usize;
    let names: Vec<String> = (0..r.u32()?)
        .map(|_| r.string())
        .collect::<Result<_, _>>()?;
    if names != filterable {
        return Err(format!(
            "written for filterable attributes {names:?}, now {filterable:?}"
        ));
    }
    let categories: Vec<String> = (0..r.u32()?)
        .map(|_| r.string())
        .collect::<Result<_, _>>()?;
    // Attribute names and values repeat on every point: each is looked up in the process's
    // names once per read (while the catalog file, read meanwhile, looks up its own).
    let mut seen: HashMap<&str, Name> = HashMap::new();
    let mut name = |s| seen.entry(s).or_insert_with(|| Name::new(s)).clone();
    let mut points = Vec::with_capacity(n.min(body.len() / (dim * 4 + 16).max(1)));
    for _ in 0..n {
        let id = Uuid::from_bytes(r.array()?);
        let item_id = ItemId::parse(r.str()?).map_err(|e| e.to_string())?;
        let flags = r.u8()?;
        let price = f32::from_le_bytes(r.array()?);
        let popularity = f32::from_le_bytes(r.array()?);
        let created_at = i64::from_le_bytes(r.array()?);
        let cats = (0..r.u32()?)
            .map(|_| match r.u32()? {
                c if (c as usize) < categories.len() => Ok(c),
                _ => Err("a category out of range".to_string()),
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let n_attributes = r.u32()? as usize;
        let mut attributes = Vec::with_capacity(n_attributes.min(crate::domain::MAX_ATTRS));
        for _ in 0..n_attributes {
            let attr = name(r.str()?);
            let value = match r.u8()? {
                0 => AttrValue::Bool(r.u8()? != 0),
                1 => AttrValue::Number(f64::from_le_bytes(r.array()?)),
                2 => AttrValue::Text(name(r.str()?)),
                3 => AttrValue::List(
                    (0..r.u32()?)
                        .map(|_| r.str().map(&mut name))
                        .collect::<Result<_, _>>()?,
                ),
                k => return Err(format!("unknown attribute kind {k}")),
            };
            attributes.push((attr, value));
        }
        let vector = Vector::from_bits(
            r.take(dim * 2)?
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
        points.push(SnapPoint {
            id,
            ram: RamPoint {
                item_id,
                available: flags & 1 != 0,
                price: (flags & 2 != 0).then_some(price),
                popularity,
                attributes: attributes.into_boxed_slice(),
                vector,
            },
            categories: cats,
            created_at: (flags & 4 != 0).then_some(created_at),
        });
    }
    if r.at != body.len() {
        return Err("trailing bytes after the last point".into());
    }
    Ok(Snapshot { categories, points })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(id: &str, price: Option<f32>) -> RamPoint {
        RamPoint {
            item_id: ItemId::parse(id).unwrap(),
            available: price.is_some(),
            price,
            popularity: 2.5,
            attributes: vec![
                ("language".into(), AttrValue::Text("en".into())),
                (
                    "region".into(),
                    AttrValue::List(vec!["eu".into(), "us".into()].into()),
                ),
                ("size".into(), AttrValue::Number(4.5)),
                ("promoted".into(), AttrValue::Bool(true)),
            ]
            .into_boxed_slice(),
            vector: vec![0.6, 0.8].into(),
        }
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let filterable = vec!["language".to_string(), "region".to_string()];
        let points = [
            (Uuid::from_u128(1), ram("a", Some(9.5))),
            (Uuid::from_u128(2), ram("b", None)),
        ];
        let cats = vec!["Drama".to_string(), "War".to_string()];
        let tmp = write_temp(
            &path,
            2,
            &filterable,
            2,
            points.iter().map(|(u, p)| (u, p)),
            |id| (*id == Uuid::from_u128(1)).then(|| (vec![0, 1], 1_700_000_000)),
            &cats,
        )
        .unwrap();
        install(&tmp, &path).unwrap();
        let snap = read(&path, 2, &filterable).unwrap().unwrap();
        assert_eq!(snap.categories, cats);
        let back = &snap.points;
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].id, Uuid::from_u128(1));
        assert_eq!(back[0].ram.item_id.as_str(), "a");
        assert_eq!(back[0].ram.price, Some(9.5));
        assert!(back[0].ram.available);
        assert_eq!(snap.names(&back[0]), cats);
        assert_eq!(back[0].created_at, Some(1_700_000_000));
        assert_eq!(back[0].ram.attributes, points[0].1.attributes);
        assert_eq!(back[0].ram.vector, Vector::from([0.6, 0.8]));
        assert_eq!(back[1].ram.price, None);
        assert!(!back[1].ram.available);
        assert!(back[1].categories.is_empty() && back[1].created_at.is_none());

        // Another dimension or other filterable names: refused, not misread.
        assert!(read(&path, 3, &filterable).is_err());
        assert!(read(&path, 2, &filterable[..1]).is_err());
        // Any flipped byte or a cut file fails the checksum.
        let bytes = std::fs::read(&path).unwrap();
        for at in [0, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(read(&path, 2, &filterable).is_err(), "byte {at}");
        }
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(read(&path, 2, &filterable).is_err());
        std::fs::remove_file(&path).unwrap();
        assert!(read(&path, 2, &filterable).unwrap().is_none());
    }
}
