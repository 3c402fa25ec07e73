//! tandem's common data format: `items.csv` and `interactions.csv` (or the same records as
//! `.jsonl`). Readers check the header and every field, and report errors with the file, the
//! line and the field. Writers stream, so that generators run in bounded memory.

use crate::domain::{
    check_attributes, Attributes, EventType, Interaction, Item, ItemId, Name, UserId,
};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

pub const ITEM_COLUMNS: &[&str] = &["item_id", "title", "genres"];
pub const ITEM_OPTIONAL_COLUMNS: &[&str] = &[
    "tags",
    "price",
    "available",
    "year",
    "created_at",
    "attributes",
];
pub const INTERACTION_COLUMNS: &[&str] = &["user_id", "item_id", "rating", "timestamp"];
pub const INTERACTION_OPTIONAL_COLUMNS: &[&str] = &["event_type"];

/// A data file could not be read. Every variant names the file; row errors name the line and
/// the field, so a user can open the file at the right place.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: the file is empty (expected a header line: {expected})")]
    Empty { file: PathBuf, expected: String },
    #[error("{file}:{line}: {reason}")]
    Header {
        file: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{file}:{line}: field `{field}`: {reason}")]
    Field {
        file: PathBuf,
        line: u64,
        field: String,
        reason: String,
    },
    #[error("{file}:{line}: {reason}")]
    Row {
        file: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{dir}: no {stem}.csv or {stem}.jsonl found")]
    Missing { dir: PathBuf, stem: String },
}

impl DataError {
    fn io(file: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            file: file.to_path_buf(),
            source,
        }
    }
}

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("ndjson")
    )
}

/// `dir/stem.csv`, else `dir/stem.jsonl`.
pub fn find_file(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for ext in ["csv", "jsonl"] {
        let p = dir.join(format!("{stem}.{ext}"));
        if p.exists() {
            return Ok(p);
        }
    }
    Err(DataError::Missing {
        dir: dir.to_path_buf(),
        stem: stem.to_string(),
    })
}

/// Reads a CSV file with a checked header, handing each row to `parse` as a lookup by column.
pub(crate) struct CsvTable {
    file: PathBuf,
    reader: csv::Reader<File>,
    /// Column index by name, for required and optional columns.
    columns: Vec<(&'static str, Option<usize>)>,
}

impl CsvTable {
    pub(crate) fn open(
        file: &Path,
        required: &[&'static str],
        optional: &[&'static str],
    ) -> Result<Self, DataError> {
        let f = File::open(file).map_err(|e| DataError::io(file, e))?;
        if f.metadata().map(|m| m.len() == 0).unwrap_or(false) {
            return Err(DataError::Empty {
                file: file.to_path_buf(),
                expected: required.join(","),
            });
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(f);
        let header = reader
            .headers()
            .map_err(|e| csv_error(file, e))?
            .iter()
            .map(|h| h.trim().trim_start_matches('\u{feff}').to_string())
            .collect::<Vec<_>>();
        let header_err = |reason: String| DataError::Header {
            file: file.to_path_buf(),
            line: 1,
            reason,
        };
        if header.len() == 1 {
            for (sep, name) in [('\t', "tab"), (';', "semicolon"), ('|', "pipe")] {
                if header[0].contains(sep) {
                    return Err(header_err(format!(
                        "the header is {name}-separated; tandem expects commas (expected header: {})",
                        required.join(",")
                    )));
                }
            }
        }
        for (i, h) in header.iter().enumerate() {
            if header[..i].contains(h) {
                return Err(header_err(format!("duplicate column `{h}` in the header")));
            }
        }
        let mut columns = Vec::new();
        for &name in required {
            let pos = header.iter().position(|h| h == name).ok_or_else(|| {
                header_err(format!(
                    "missing column `{name}` (header is `{}`, expected at least `{}`)",
                    header.join(","),
                    required.join(",")
                ))
            })?;
            columns.push((name, Some(pos)));
        }
        for &name in optional {
            columns.push((name, header.iter().position(|h| h == name)));
        }
        Ok(CsvTable {
            file: file.to_path_buf(),
            reader,
            columns,
        })
    }

    /// Calls `f` for each row with a [`Row`] accessor.
    pub(crate) fn for_each(
        mut self,
        mut f: impl FnMut(&Row<'_>) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let mut record = csv::StringRecord::new();
        loop {
            match self.reader.read_record(&mut record) {
                Ok(false) => return Ok(()),
                Ok(true) => {}
                Err(e) => return Err(csv_error(&self.file, e)),
            }
            let line = record.position().map(|p| p.line()).unwrap_or(0);
            f(&Row {
                file: &self.file,
                line,
                record: &record,
                columns: &self.columns,
            })?;
        }
    }
}

fn csv_error(file: &Path, e: csv::Error) -> DataError {
    let line = e.position().map(|p| p.line()).unwrap_or(0);
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => DataError::Row {
            file: file.to_path_buf(),
            line,
            reason: format!(
                "has {len} fields, the header has {expected_len} (a stray or missing comma, or an unquoted comma in a field?)"
            ),
        },
        csv::ErrorKind::Io(_) => DataError::Io {
            file: file.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        },
        _ => DataError::Row {
            file: file.to_path_buf(),
            line,
            reason: e.to_string(),
        },
    }
}

pub(crate) struct Row<'a> {
    file: &'a Path,
    line: u64,
    record: &'a csv::StringRecord,
    columns: &'a [(&'static str, Option<usize>)],
}

impl Row<'_> {
    pub(crate) fn err(&self, field: &str, reason: impl Into<String>) -> DataError {
        DataError::Field {
            file: self.file.to_path_buf(),
            line: self.line,
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    /// The raw value of a column, `None` when the column is absent or the field is empty.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        let idx = self.columns.iter().find(|(n, _)| *n == name)?.1?;
        let v = self.record.get(idx)?.trim();
        (!v.is_empty()).then_some(v)
    }

    pub(crate) fn required(&self, name: &str) -> Result<&str, DataError> {
        self.get(name).ok_or_else(|| self.err(name, "is empty"))
    }

    pub(crate) fn text(&self, name: &str) -> String {
        let idx = self
            .columns
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|c| c.1);
        idx.and_then(|i| self.record.get(i))
            .unwrap_or("")
            .to_string()
    }

    pub(crate) fn parse<T: std::str::FromStr>(
        &self,
        name: &str,
        what: &str,
    ) -> Result<Option<T>, DataError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| self.err(name, format!("{v:?} is not {what}"))),
        }
    }

    pub(crate) fn list(&self, name: &str) -> Box<[Name]> {
        split_list(self.get(name).unwrap_or(""))
    }
}

/// Splits a `|`-separated list, dropping empty entries.
pub fn split_list(s: &str) -> Box<[Name]> {
    s.split('|')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(Name::new)
        .collect()
}

fn parse_item_row(row: &Row<'_>) -> Result<Item, DataError> {
    let item_id =
        ItemId::parse(row.required("item_id")?).map_err(|e| row.err("item_id", e.to_string()))?;
    let price: Option<f32> = row.parse("price", "a number")?;
    if let Some(p) = price {
        if !p.is_finite() || p < 0.0 {
            return Err(row.err("price", format!("{p} is not a non-negative number")));
        }
    }
    let available = match row.get("available") {
        None => true,
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(row.err("available", format!("{v:?} is not true or false"))),
        },
    };
    // A JSON object in one cell: {"brand":"acme","region":["eu","us"],"size":42}.
    let attributes = match row.get("attributes") {
        None => Attributes::new(),
        Some(json) => serde_json::from_str(json).map_err(|e| {
            row.err(
                "attributes",
                format!(
                    "is not a JSON object of strings, lists of strings, numbers or booleans: {e}"
                ),
            )
        })?,
    };
    check_attributes(&attributes)
        .map_err(|(name, reason)| row.err("attributes", attr_reason(&name, &reason)))?;
    Ok(Item {
        item_id,
        title: row.text("title"),
        categories: row.list("genres"),
        tags: row.list("tags"),
        price,
        available,
        year: row.parse("year", "an integer year")?,
        created_at: row.parse("created_at", "an integer unix timestamp")?,
        attributes,
    })
}

fn attr_reason(name: &str, reason: &str) -> String {
    if name.is_empty() {
        reason.to_string()
    } else {
        format!("{name}: {reason}")
    }
}

fn parse_interaction_row(row: &Row<'_>) -> Result<Interaction, DataError> {
    let user_id =
        UserId::parse(row.required("user_id")?).map_err(|e| row.err("user_id", e.to_string()))?;
    let item_id =
        ItemId::parse(row.required("item_id")?).map_err(|e| row.err("item_id", e.to_string()))?;
    let rating: f32 = row
        .parse("rating", "a number")?
        .ok_or_else(|| row.err("rating", "is empty"))?;
    if !rating.is_finite() {
        return Err(row.err("rating", "is not a finite number"));
    }
    let timestamp: i64 = row
        .parse("timestamp", "an integer unix timestamp")?
        .ok_or_else(|| row.err("timestamp", "is empty"))?;
    let event_type = match row.get("event_type") {
        None => EventType::Rating,
        Some(v) => v
            .parse::<EventType>()
            .map_err(|e| row.err("event_type", e.to_string()))?,
    };
    Ok(Interaction {
        user_id,
        item_id,
        rating,
        timestamp,
        event_type,
    })
}

/// Reads JSONL records one per line, reporting the line of a bad record.
/// `check` refuses a record that parsed but is invalid, with the reason.
fn read_jsonl<T: serde::de::DeserializeOwned>(
    file: &Path,
    check: impl Fn(&T) -> Result<(), String>,
    mut f: impl FnMut(T) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let reader = BufReader::new(File::open(file).map_err(|e| DataError::io(file, e))?);
    let mut seen = false;
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| DataError::io(file, e))?;
        if line.trim().is_empty() {
            continue;
        }
        seen = true;
        let value: T = serde_json::from_str(&line)
            .map_err(|e| e.to_string())
            .and_then(|v| check(&v).map(|_| v))
            .map_err(|reason| DataError::Row {
                file: file.to_path_buf(),
                line: i as u64 + 1,
                reason,
            })?;
        f(value)?;
    }
    if !seen {
        return Err(DataError::Empty {
            file: file.to_path_buf(),
            expected: "one JSON object per line".into(),
        });
    }
    Ok(())
}

/// Streams the items of a `.csv` or `.jsonl` file.
pub fn for_each_item(
    file: &Path,
    mut f: impl FnMut(Item) -> Result<(), DataError>,
) -> Result<(), DataError> {
    if is_jsonl(file) {
        let check = |item: &Item| {
            check_attributes(&item.attributes)
                .map_err(|(name, reason)| format!("attributes: {}", attr_reason(&name, &reason)))
        };
        return read_jsonl(file, check, f);
    }
    CsvTable::open(file, ITEM_COLUMNS, ITEM_OPTIONAL_COLUMNS)?
        .for_each(|row| f(parse_item_row(row)?))
}

/// Streams the interactions of a `.csv` or `.jsonl` file.
pub fn for_each_interaction(
    file: &Path,
    mut f: impl FnMut(Interaction) -> Result<(), DataError>,
) -> Result<(), DataError> {
    if is_jsonl(file) {
        return read_jsonl(file, |_: &Interaction| Ok(()), f);
    }
    CsvTable::open(file, INTERACTION_COLUMNS, INTERACTION_OPTIONAL_COLUMNS)?
        .for_each(|row| f(parse_interaction_row(row)?))
}

pub fn read_items(file: &Path) -> Result<Vec<Item>, DataError> {
    let mut out = Vec::new();
    for_each_item(file, |i| {
        out.push(i);
        Ok(())
    })?;
    Ok(out)
}

pub fn read_interactions(file: &Path) -> Result<Vec<Interaction>, DataError> {
    let mut out = Vec::new();
    for_each_interaction(file, |i| {
        out.push(i);
        Ok(())
    })?;
    Ok(out)
}

/// Formats a rating the way MovieLens and the shared split do (`4.0`, `3.5`).
pub fn format_rating(r: f32) -> String {
    if r.fract() == 0.0 {
        format!("{r:.1}")
    } else {
        format!("{r}")
    }
}

/// Streams items to a CSV file. Optional columns are written when `extended` is set.
pub struct ItemWriter {
    file: PathBuf,
    out: csv::Writer<BufWriter<File>>,
    extended: bool,
}

impl ItemWriter {
    pub fn create(file: &Path, extended: bool) -> Result<Self, DataError> {
        let f = File::create(file).map_err(|e| DataError::io(file, e))?;
        let mut out = csv::Writer::from_writer(BufWriter::new(f));
        let mut header: Vec<&str> = ITEM_COLUMNS.to_vec();
        if extended {
            header.extend_from_slice(ITEM_OPTIONAL_COLUMNS);
        }
        out.write_record(&header)
            .map_err(|e| DataError::io(file, e.into()))?;
        Ok(ItemWriter {
            file: file.to_path_buf(),
            out,
            extended,
        })
    }

    pub fn write(&mut self, item: &Item) -> Result<(), DataError> {
        let mut rec = vec![
            item.item_id.to_string(),
            item.title.clone(),
            item.categories.join("|"),
        ];
        if self.extended {
            rec.push(item.tags.join("|"));
            rec.push(item.price.map(|p| format!("{p:.2}")).unwrap_or_default());
            rec.push(item.available.to_string());
            rec.push(item.year.map(|y| y.to_string()).unwrap_or_default());
            rec.push(item.created_at.map(|c| c.to_string()).unwrap_or_default());
            rec.push(if item.attributes.is_empty() {
                String::new()
            } else {
                serde_json::to_string(&item.attributes).expect("attributes serialize")
            });
        }
        self.out
            .write_record(&rec)
            .map_err(|e| DataError::io(&self.file, e.into()))
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.out.flush().map_err(|e| DataError::io(&self.file, e))
    }
}

/// Streams interactions to a CSV file. `event_type` is written when `with_event_type` is set.
pub struct InteractionWriter {
    file: PathBuf,
    out: BufWriter<File>,
    with_event_type: bool,
}

impl InteractionWriter {
    pub fn create(file: &Path, with_event_type: bool) -> Result<Self, DataError> {
        let f = File::create(file).map_err(|e| DataError::io(file, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        let mut header = INTERACTION_COLUMNS.join(",");
        if with_event_type {
            header.push_str(",event_type");
        }
        writeln!(out, "{header}").map_err(|e| DataError::io(file, e))?;
        Ok(InteractionWriter {
            file: file.to_path_buf(),
            out,
            with_event_type,
        })
    }

    pub fn write(&mut self, i: &Interaction) -> Result<(), DataError> {
        let r = write!(
            self.out,
            "{},{},{},{}",
            csv_field(i.user_id.as_str()),
            csv_field(i.item_id.as_str()),
            format_rating(i.rating),
            i.timestamp
        )
        .and_then(|_| {
            if self.with_event_type {
                write!(self.out, ",{}", i.event_type)?;
            }
            writeln!(self.out)
        });
        r.map_err(|e| DataError::io(&self.file, e))
    }

    pub fn finish(mut self) -> Result<(), DataError> {
        self.out.flush().map_err(|e| DataError::io(&self.file, e))
    }
}

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

pub fn write_items(file: &Path, items: &[Item], extended: bool) -> Result<(), DataError> {
    let mut w = ItemWriter::create(file, extended)?;
    for i in items {
        w.write(i)?;
    }
    w.finish()
}

pub fn write_interactions(
    file: &Path,
    rows: &[Interaction],
    with_event_type: bool,
) -> Result<(), DataError> {
    let mut w = InteractionWriter::create(file, with_event_type)?;
    for r in rows {
        w.write(r)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn round_trip_items_and_interactions() {
        let dir = tempfile::tempdir().unwrap();
        let mut item = Item::new(ItemId::parse("i,1").unwrap(), "A \"quoted\", title");
        item.categories = ["Drama".into(), "Comedy".into()].into();
        item.tags = ["funny".into()].into();
        item.price = Some(9.5);
        item.available = false;
        item.year = Some(1995);
        item.created_at = Some(123);
        let f = dir.path().join("items.csv");
        write_items(&f, std::slice::from_ref(&item), true).unwrap();
        assert_eq!(read_items(&f).unwrap(), vec![item]);

        let row = Interaction {
            user_id: UserId::parse("u1").unwrap(),
            item_id: ItemId::parse("i,1").unwrap(),
            rating: 4.0,
            timestamp: 99,
            event_type: EventType::Purchase,
        };
        let f = dir.path().join("interactions.csv");
        write_interactions(&f, std::slice::from_ref(&row), true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&f).unwrap().lines().nth(1).unwrap(),
            "u1,\"i,1\",4.0,99,purchase"
        );
        assert_eq!(read_interactions(&f).unwrap(), vec![row]);
    }

    #[test]
    fn bad_input_names_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases = [
            (
                "user_id,item_id,timestamp\n1,2,3\n",
                "missing column `rating`",
            ),
            (
                "user_id,item_id,rating,timestamp\n1,2,4.0,5\n1,2,good,5\n",
                ":3: field `rating`: \"good\" is not a number",
            ),
            (
                "user_id,item_id,rating,rating,timestamp\n1,2,3,4,5\n",
                "duplicate column `rating`",
            ),
            (
                "user_id\titem_id\trating\ttimestamp\n1\t2\t3\t4\n",
                "tab-separated",
            ),
            ("", "the file is empty"),
            (
                "user_id,item_id,rating,timestamp\n1,2,3\n",
                ":2: has 3 fields, the header has 4",
            ),
            (
                "user_id,item_id,rating,timestamp\n1,2,3,4,clickk\n",
                "has 5 fields",
            ),
        ];
        for (i, (body, want)) in cases.iter().enumerate() {
            let f = write(d, &format!("bad{i}.csv"), body);
            let err = read_interactions(&f).unwrap_err().to_string();
            assert!(err.contains(&format!("bad{i}.csv")), "{err}");
            assert!(err.contains(want), "case {i}: {err:?} lacks {want:?}");
        }
        let f = write(
            d,
            "ev.csv",
            "user_id,item_id,rating,timestamp,event_type\n1,2,3,4,clickk\n",
        );
        let err = read_interactions(&f).unwrap_err().to_string();
        assert!(
            err.contains(":2: field `event_type`: unknown event type"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_is_accepted_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "items.jsonl",
            "{\"item_id\":\"1\",\"title\":\"t\",\"genres\":[\"A\"]}\n\n{\"item_id\":\"2\",\"title\":\"u\"}\n",
        );
        let err = read_items(&f).unwrap_err().to_string();
        assert!(
            err.contains("items.jsonl:3") && err.contains("genres"),
            "{err}"
        );
    }
}
