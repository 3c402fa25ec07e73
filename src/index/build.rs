//! Building a collection version: the one routine that both `tandem index` and model
//! activation use. Create, fill in batches, finalize (index built), then switch the alias. On
//! any failure the half-built version is dropped and the old one stays live.

use super::{IndexError, IndexPoint, VectorIndex};
use indicatif::ProgressBar;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Points per upsert call while building (the edge engine measured ~116k points/s at 1,000).
pub const BUILD_BATCH: usize = 1_000;

/// What a build did and how fast.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuildReport {
    pub version: String,
    pub points: usize,
    pub dim: usize,
    /// Seconds spent upserting.
    pub upsert_secs: f64,
    /// Seconds spent waiting for the index to become searchable at full speed.
    pub finalize_secs: f64,
    pub total_secs: f64,
    /// Points per second over the whole build.
    pub items_per_sec: f64,
}

/// Creates `version`, upserts `points` in batches (advancing `progress` and logging items/s
/// every few seconds), waits until it is searchable at full speed, and switches the serving
/// alias to it. On failure the new version is dropped and the live one is left alone.
pub async fn build_version(
    index: &dyn VectorIndex,
    version: &str,
    dim: usize,
    points: impl Iterator<Item = IndexPoint>,
    progress: &ProgressBar,
) -> Result<BuildReport, IndexError> {
    let report = build_unswitched(index, version, dim, points, progress).await?;
    if let Err(e) = index.switch_to(version).await {
        let _ = index.drop_version(version).await;
        return Err(e);
    }
    tracing::info!(
        version,
        points = report.points,
        secs = report.total_secs,
        items_per_sec = report.items_per_sec,
        "collection version is live"
    );
    Ok(report)
}

/// `build_version` without the switch: the version is searchable by name (`search_in`) and
/// ready to switch to, and the live version is unchanged. A failed build is dropped.
pub async fn build_unswitched(
    index: &dyn VectorIndex,
    version: &str,
    dim: usize,
    points: impl Iterator<Item = IndexPoint>,
    progress: &ProgressBar,
) -> Result<BuildReport, IndexError> {
    let start = Instant::now();
    index.create_version(version, dim).await?;
    match fill_and_finalize(index, version, dim, points, progress, start).await {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Err(drop_err) = index.drop_version(version).await {
                tracing::warn!(version, error = %drop_err, "could not drop the failed version");
            }
            Err(e)
        }
    }
}

async fn fill_and_finalize(
    index: &dyn VectorIndex,
    version: &str,
    dim: usize,
    points: impl Iterator<Item = IndexPoint>,
    progress: &ProgressBar,
    start: Instant,
) -> Result<BuildReport, IndexError> {
    let mut batch = Vec::with_capacity(BUILD_BATCH);
    let mut total = 0usize;
    let mut last_log = Instant::now();
    let mut points = points.peekable();
    if points.peek().is_none() {
        return Err(IndexError::EmptyBatch);
    }
    loop {
        let next = points.next();
        let done = next.is_none();
        if let Some(p) = next {
            batch.push(p);
        }
        if batch.len() >= BUILD_BATCH || (done && !batch.is_empty()) {
            let n = batch.len();
            index
                .upsert_into(
                    version,
                    std::mem::replace(&mut batch, Vec::with_capacity(BUILD_BATCH)),
                )
                .await?;
            total += n;
            progress.inc(n as u64);
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                tracing::info!(
                    version,
                    points = total,
                    items_per_sec = total as f64 / start.elapsed().as_secs_f64(),
                    "upserting"
                );
            }
        }
        if done {
            break;
        }
    }
    let upsert_secs = start.elapsed().as_secs_f64();
    progress.set_message("building the index");
    tracing::info!(version, points = total, "upserted; building the index");
    let t = Instant::now();
    index.finalize_version(version).await?;
    let finalize_secs = t.elapsed().as_secs_f64();
    let total_secs = start.elapsed().as_secs_f64();
    progress.finish_with_message(format!(
        "{total} items in {total_secs:.1}s ({:.0} items/s)",
        total as f64 / total_secs
    ));
    Ok(BuildReport {
        version: version.to_string(),
        points: total,
        dim,
        upsert_secs,
        finalize_secs,
        total_secs,
        items_per_sec: total as f64 / total_secs.max(1e-9),
    })
}
