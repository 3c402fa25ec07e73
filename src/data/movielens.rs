//! `tandem import movielens`: converts a MovieLens download into tandem's common format.
//!
//! Two layouts exist and both are read:
//! - ml-100k: `u.data` (tab-separated `user item rating timestamp`, no header), `u.item`
//!   (pipe-separated, latin-1 encoded, 19 genre flags) and `u.user`;
//! - ml-latest-small, ml-latest and ml-25m: `ratings.csv`, `movies.csv` (quoted titles,
//!   `|`-separated genres) and `tags.csv`, all UTF-8 with headers.
//!
//! Genres become categories, user tags become item tags (lowercased, deduplicated), and the
//! year in the title becomes `year`. Titles are kept exactly as MovieLens spells them (the
//! shared evaluation split does the same), so item rows compare equal to it.

use super::format::{CsvTable, DataError, InteractionWriter, ItemWriter};
use crate::domain::{EventType, Interaction, Item, ItemId, Name, UserId};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The 19 genre flags of ml-100k's `u.item`, in column order (as listed in `u.genre`).
/// `unknown` is MovieLens' way to say "no genre" and becomes no category.
const ML100K_GENRES: [&str; 19] = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
];

/// ml-latest's marker for a movie without genres.
const NO_GENRES: &str = "(no genres listed)";

/// Which MovieLens layout a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `u.data`, `u.item`, `u.user`.
    Ml100k,
    /// `ratings.csv`, `movies.csv`, `tags.csv` (ml-latest-small, ml-latest, ml-25m).
    MlLatest,
}

impl Layout {
    /// Detects the layout from the files present in `src`.
    pub fn detect(src: &Path) -> Result<Layout, DataError> {
        if src.join("u.data").is_file() {
            Ok(Layout::Ml100k)
        } else if src.join("ratings.csv").is_file() {
            Ok(Layout::MlLatest)
        } else {
            Err(DataError::Io {
                file: src.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not a MovieLens directory: expected u.data + u.item (ml-100k) or ratings.csv + movies.csv (ml-latest-small, ml-25m)",
                ),
            })
        }
    }
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    pub layout: Layout,
    pub interactions: u64,
    pub users: u64,
    /// Catalog size: every movie in the movie file, rated or not.
    pub items: u64,
    pub items_rated: u64,
    /// Items with at least one tag.
    pub items_tagged: u64,
    /// Ratings whose movie is missing from the movie file (kept, but worth knowing).
    pub unknown_items: u64,
    pub items_file: PathBuf,
    pub interactions_file: PathBuf,
}

/// Imports the MovieLens data in `src` into `out/items.csv` and `out/interactions.csv`.
pub fn import(src: &Path, out: &Path) -> Result<ImportSummary, DataError> {
    let layout = Layout::detect(src)?;
    std::fs::create_dir_all(out).map_err(|e| DataError::Io {
        file: out.to_path_buf(),
        source: e,
    })?;
    let items = match layout {
        Layout::Ml100k => read_ml100k_items(&src.join("u.item"))?,
        Layout::MlLatest => {
            let tags_file = src.join("tags.csv");
            let tags = if tags_file.is_file() {
                read_tags(&tags_file)?
            } else {
                HashMap::new()
            };
            read_movies(&src.join("movies.csv"), tags)?
        }
    };
    let items_file = out.join("items.csv");
    let mut writer = ItemWriter::create(&items_file, true)?;
    for item in &items {
        writer.write(item)?;
    }
    writer.finish()?;
    let catalog: HashSet<&str> = items.iter().map(|i| i.item_id.as_str()).collect();

    let interactions_file = out.join("interactions.csv");
    let mut writer = InteractionWriter::create(&interactions_file, false)?;
    let mut users: HashSet<UserId> = HashSet::new();
    let mut rated: HashSet<ItemId> = HashSet::new();
    let mut interactions = 0u64;
    let mut unknown_items = 0u64;
    let mut sink = |i: Interaction| -> Result<(), DataError> {
        if !catalog.contains(i.item_id.as_str()) {
            unknown_items += 1;
        }
        if !users.contains(&i.user_id) {
            users.insert(i.user_id.clone());
        }
        if !rated.contains(&i.item_id) {
            rated.insert(i.item_id.clone());
        }
        interactions += 1;
        writer.write(&i)
    };
    match layout {
        Layout::Ml100k => read_ml100k_ratings(&src.join("u.data"), &mut sink)?,
        Layout::MlLatest => read_ratings(&src.join("ratings.csv"), &mut sink)?,
    }
    writer.finish()?;
    if layout == Layout::Ml100k {
        check_ml100k_users(&src.join("u.user"), &users)?;
    }
    if unknown_items > 0 {
        tracing::warn!(
            unknown_items,
            "ratings reference movies that are not in the movie file; they are kept"
        );
    }
    Ok(ImportSummary {
        layout,
        interactions,
        users: users.len() as u64,
        items: items.len() as u64,
        items_rated: rated
            .iter()
            .filter(|i| catalog.contains(i.as_str()))
            .count() as u64,
        items_tagged: items.iter().filter(|i| !i.tags.is_empty()).count() as u64,
        unknown_items,
        items_file,
        interactions_file,
    })
}

/// The release year at the end of a MovieLens title: `Heat (1995)` gives 1995, a series'
/// `(2006–2007)` gives its first year. Trailing blanks (which MovieLens has) are ignored.
pub fn title_year(title: &str) -> Option<i32> {
    let t = title.trim_end().strip_suffix(')')?;
    let inner = &t[t.rfind('(')? + 1..];
    let digits: String = inner.chars().take_while(char::is_ascii_digit).collect();
    let rest = &inner[digits.len()..];
    let range_tail = rest.is_empty() || rest.starts_with(['-', '–']);
    (digits.len() == 4 && range_tail)
        .then(|| digits.parse().ok())
        .flatten()
}

/// A tag as tandem stores it: trimmed, lowercased, and without `|` (the list separator).
fn normalize_tag(tag: &str) -> String {
    tag.trim().to_lowercase().replace('|', " ")
}

fn id_error(file: &Path, line: u64, field: &str, e: impl ToString) -> DataError {
    DataError::Field {
        file: file.to_path_buf(),
        line,
        field: field.to_string(),
        reason: e.to_string(),
    }
}

/// `tags.csv`: movie id to its distinct tags, in first-seen order.
fn read_tags(file: &Path) -> Result<HashMap<String, Vec<String>>, DataError> {
    let mut tags: HashMap<String, Vec<String>> = HashMap::new();
    CsvTable::open(file, &["userId", "movieId", "tag"], &["timestamp"])?.for_each(|row| {
        let movie = row.required("movieId")?;
        ItemId::parse(movie).map_err(|e| row.err("movieId", e.to_string()))?;
        let tag = normalize_tag(&row.text("tag"));
        if tag.is_empty() {
            return Ok(());
        }
        let list = tags.entry(movie.to_string()).or_default();
        if !list.contains(&tag) {
            list.push(tag);
        }
        Ok(())
    })?;
    Ok(tags)
}

/// `movies.csv` (`movieId,title,genres`) with the tags attached.
fn read_movies(
    file: &Path,
    mut tags: HashMap<String, Vec<String>>,
) -> Result<Vec<Item>, DataError> {
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    CsvTable::open(file, &["movieId", "title", "genres"], &[])?.for_each(|row| {
        let raw_id = row.required("movieId")?;
        let item_id = ItemId::parse(raw_id).map_err(|e| row.err("movieId", e.to_string()))?;
        if !seen.insert(raw_id.to_string()) {
            return Err(row.err("movieId", format!("duplicate movie id {raw_id}")));
        }
        let title = row.text("title");
        let mut item = Item::new(item_id, title);
        item.categories = row
            .list("genres")
            .into_vec()
            .into_iter()
            .filter(|g| g != NO_GENRES)
            .collect();
        item.year = title_year(&item.title);
        item.tags = tags
            .remove(raw_id)
            .unwrap_or_default()
            .into_iter()
            .map(Name::from)
            .collect();
        items.push(item);
        Ok(())
    })?;
    Ok(items)
}

/// `ratings.csv` (`userId,movieId,rating,timestamp`).
fn read_ratings(
    file: &Path,
    sink: &mut impl FnMut(Interaction) -> Result<(), DataError>,
) -> Result<(), DataError> {
    CsvTable::open(file, &["userId", "movieId", "rating", "timestamp"], &[])?.for_each(|row| {
        let user_id =
            UserId::parse(row.required("userId")?).map_err(|e| row.err("userId", e.to_string()))?;
        let item_id = ItemId::parse(row.required("movieId")?)
            .map_err(|e| row.err("movieId", e.to_string()))?;
        let rating: f32 = row
            .parse("rating", "a number")?
            .ok_or_else(|| row.err("rating", "is empty"))?;
        if !rating.is_finite() {
            return Err(row.err("rating", "is not a finite number"));
        }
        let timestamp: i64 = row
            .parse("timestamp", "an integer unix timestamp")?
            .ok_or_else(|| row.err("timestamp", "is empty"))?;
        sink(Interaction {
            user_id,
            item_id,
            rating,
            timestamp,
            event_type: EventType::Rating,
        })
    })
}

/// Reads a headerless, delimited ml-100k file line by line. The files are latin-1, which maps
/// each byte to the code point of the same value, so decoding can never fail.
fn for_each_ml100k_line(
    file: &Path,
    delimiter: char,
    fields: &[&str],
    min_fields: usize,
    mut f: impl FnMut(u64, &[&str]) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let io = |e| DataError::Io {
        file: file.to_path_buf(),
        source: e,
    };
    let mut reader = BufReader::new(File::open(file).map_err(io)?);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    let mut rows = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
            break;
        }
        line_no += 1;
        let text: String = buf.iter().map(|&b| b as char).collect();
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = text.split(delimiter).collect();
        if parts.len() < min_fields {
            let name = match delimiter {
                '\t' => "tab",
                _ => "|",
            };
            return Err(DataError::Row {
                file: file.to_path_buf(),
                line: line_no,
                reason: format!(
                    "has {} {name}-separated fields, expected {min_fields} ({})",
                    parts.len(),
                    fields.join(", ")
                ),
            });
        }
        rows += 1;
        f(line_no, &parts)?;
    }
    if rows == 0 {
        return Err(DataError::Empty {
            file: file.to_path_buf(),
            expected: fields.join(&delimiter.to_string()),
        });
    }
    Ok(())
}

/// `u.data`: `user id \t item id \t rating \t timestamp`.
fn read_ml100k_ratings(
    file: &Path,
    sink: &mut impl FnMut(Interaction) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let fields = ["user_id", "item_id", "rating", "timestamp"];
    for_each_ml100k_line(file, '\t', &fields, 4, |line, p| {
        let field = |i: usize| p[i].trim();
        let user_id = UserId::parse(field(0)).map_err(|e| id_error(file, line, "user_id", e))?;
        let item_id = ItemId::parse(field(1)).map_err(|e| id_error(file, line, "item_id", e))?;
        let rating: f32 = field(2)
            .parse()
            .ok()
            .filter(|r: &f32| r.is_finite())
            .ok_or_else(|| {
                id_error(
                    file,
                    line,
                    "rating",
                    format!("{:?} is not a number", field(2)),
                )
            })?;
        let timestamp: i64 = field(3).parse().map_err(|_| {
            id_error(
                file,
                line,
                "timestamp",
                format!("{:?} is not an integer unix timestamp", field(3)),
            )
        })?;
        sink(Interaction {
            user_id,
            item_id,
            rating,
            timestamp,
            event_type: EventType::Rating,
        })
    })
}

/// `u.item`: `id | title | release date | video release date | IMDb URL | 19 genre flags`.
fn read_ml100k_items(file: &Path) -> Result<Vec<Item>, DataError> {
    let fields = [
        "movie_id",
        "title",
        "release_date",
        "video_release_date",
        "imdb_url",
        "19 genre flags",
    ];
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for_each_ml100k_line(file, '|', &fields, 5 + ML100K_GENRES.len(), |line, p| {
        let raw_id = p[0].trim();
        let item_id = ItemId::parse(raw_id).map_err(|e| id_error(file, line, "movie_id", e))?;
        if !seen.insert(raw_id.to_string()) {
            return Err(id_error(
                file,
                line,
                "movie_id",
                format!("duplicate movie id {raw_id}"),
            ));
        }
        let mut item = Item::new(item_id, p[1]);
        let mut categories = Vec::new();
        for (k, name) in ML100K_GENRES.iter().enumerate() {
            match p[5 + k].trim() {
                "1" if k > 0 => categories.push(Name::new(name)),
                "0" | "1" => {}
                other => {
                    return Err(id_error(
                        file,
                        line,
                        &format!("genre flag {name}"),
                        format!("{other:?} is not 0 or 1"),
                    ))
                }
            }
        }
        item.categories = categories.into();
        // The title usually carries the year; the release date (`01-Jan-1995`) is the fallback.
        item.year = title_year(&item.title).or_else(|| {
            let d = p[2].trim();
            d.rsplit('-').next().and_then(|y| y.parse().ok())
        });
        items.push(item);
        Ok(())
    })?;
    Ok(items)
}

/// `u.user` lists the users; it holds demographics that tandem's format has no place for, so it
/// is only checked: a rating by an unlisted user means the download is broken or mixed up.
fn check_ml100k_users(file: &Path, users: &HashSet<UserId>) -> Result<(), DataError> {
    if !file.is_file() {
        tracing::warn!(file = %file.display(), "u.user not found; user ids are not cross-checked");
        return Ok(());
    }
    let fields = ["user_id", "age", "gender", "occupation", "zip_code"];
    let mut listed = HashSet::new();
    for_each_ml100k_line(file, '|', &fields, 5, |line, p| {
        let id = UserId::parse(p[0].trim()).map_err(|e| id_error(file, line, "user_id", e))?;
        listed.insert(id);
        Ok(())
    })?;
    let missing = users.iter().filter(|u| !listed.contains(*u)).count();
    if missing > 0 {
        tracing::warn!(
            missing,
            file = %file.display(),
            "users in u.data are not listed in u.user"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn years_come_from_the_end_of_the_title() {
        assert_eq!(title_year("Toy Story (1995)"), Some(1995));
        assert_eq!(
            title_year("City of Lost Children, The (Cité des enfants perdus, La) (1995)"),
            Some(1995)
        );
        assert_eq!(
            title_year("From Dusk Till Dawn 2: Texas Blood Money (1999) "),
            Some(1999)
        );
        assert_eq!(title_year("Death Note: Desu nôto (2006–2007)"), Some(2006));
        assert_eq!(title_year("Babylon 5"), None);
        assert_eq!(title_year("Movie (Director's Cut)"), None);
        assert_eq!(title_year("1984 (12345)"), None);
    }

    #[test]
    fn tags_are_normalized() {
        assert_eq!(normalize_tag("  Highly Quotable "), "highly quotable");
        assert_eq!(normalize_tag("a|b"), "a b");
    }
}
