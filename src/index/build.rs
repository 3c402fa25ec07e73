//! Building a collection version: the one routine that both `tandem index` and model
//! activation use. Create, fill in batches, finalize (index built), then switch the alias. On
//! any failure the half-built version is dropped and the old one stays live.

use super::{IndexError, IndexPoint, VectorIndex};
use indicatif::ProgressBar;
use serde::Serialize;
use std::future::Future;
use std::task::Poll;
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
    build_version_batched(index, version, dim, in_batches(points), progress).await
}

/// [`build_version`] from batches made on demand: each batch is made (the next is asked
/// for) while the engine writes the one before, so that a producer such as the item tower
/// runs beside the upserts instead of before them. An `Err` batch aborts the build (the
/// new version is dropped); empty batches are skipped.
pub async fn build_version_batched(
    index: &dyn VectorIndex,
    version: &str,
    dim: usize,
    batches: impl Iterator<Item = Result<Vec<IndexPoint>, IndexError>>,
    progress: &ProgressBar,
) -> Result<BuildReport, IndexError> {
    let report = build_unswitched_batched(index, version, dim, batches, progress).await?;
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
    build_unswitched_batched(index, version, dim, in_batches(points), progress).await
}

/// [`build_unswitched`] from batches made on demand (see [`build_version_batched`]).
async fn build_unswitched_batched(
    index: &dyn VectorIndex,
    version: &str,
    dim: usize,
    batches: impl Iterator<Item = Result<Vec<IndexPoint>, IndexError>>,
    progress: &ProgressBar,
) -> Result<BuildReport, IndexError> {
    let start = Instant::now();
    index.create_version(version, dim).await?;
    match fill_and_finalize(index, version, dim, batches, progress, start).await {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Err(drop_err) = index.drop_version(version).await {
                tracing::warn!(version, error = %drop_err, "could not drop the failed version");
            }
            Err(e)
        }
    }
}

/// `points` in batches of [`BUILD_BATCH`].
fn in_batches(
    points: impl Iterator<Item = IndexPoint>,
) -> impl Iterator<Item = Result<Vec<IndexPoint>, IndexError>> {
    let mut points = points.peekable();
    std::iter::from_fn(move || {
        points.peek()?;
        Some(Ok(points.by_ref().take(BUILD_BATCH).collect()))
    })
}

/// The next non-empty batch, `None` at the end.
fn next_batch(
    batches: &mut impl Iterator<Item = Result<Vec<IndexPoint>, IndexError>>,
) -> Result<Option<Vec<IndexPoint>>, IndexError> {
    for batch in batches.by_ref() {
        let batch = batch?;
        if !batch.is_empty() {
            return Ok(Some(batch));
        }
    }
    Ok(None)
}

async fn fill_and_finalize(
    index: &dyn VectorIndex,
    version: &str,
    dim: usize,
    mut batches: impl Iterator<Item = Result<Vec<IndexPoint>, IndexError>>,
    progress: &ProgressBar,
    start: Instant,
) -> Result<BuildReport, IndexError> {
    let mut total = 0usize;
    let mut last_log = Instant::now();
    let mut next = next_batch(&mut batches)?;
    if next.is_none() {
        return Err(IndexError::EmptyBatch);
    }
    while let Some(batch) = next {
        let n = batch.len();
        let mut upsert = std::pin::pin!(index.upsert_into(version, batch));
        // The first poll hands the batch over (the embedded engine's write runs on a task
        // and a thread of its own); the next batch is made meanwhile, then the write is
        // awaited before the next one goes, so batches are written in order.
        let started = std::future::poll_fn(|cx| Poll::Ready(upsert.as_mut().poll(cx))).await;
        let made = next_batch(&mut batches);
        match started {
            Poll::Ready(written) => written?,
            Poll::Pending => upsert.await?,
        }
        next = made?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::exact::ExactIndex;

    fn point(id: &str) -> IndexPoint {
        IndexPoint::for_test(id, &["c"], &[1.0, 0.0])
    }

    /// A producer that fails midway (the item tower, say) aborts the build: the half-built
    /// version is dropped and the live one keeps serving.
    #[tokio::test]
    async fn a_failed_batch_drops_the_new_version_and_keeps_the_live_one() {
        let index = ExactIndex::new();
        let bar = ProgressBar::hidden();
        build_version(&index, "v1", 2, [point("a")].into_iter(), &bar)
            .await
            .unwrap();
        let batches = vec![
            Ok(vec![point("b")]),
            Err(IndexError::Backend("the item tower failed".into())),
            Ok(vec![point("c")]),
        ];
        let err = build_version_batched(&index, "v2", 2, batches.into_iter(), &bar)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("item tower"), "{err}");
        let (versions, live) = index.versions().await.unwrap();
        assert_eq!(versions, vec!["v1".to_string()]);
        assert_eq!(live.as_deref(), Some("v1"));
        assert_eq!(index.count().await.unwrap(), 1);
    }

    /// Empty batches are skipped; only batches with nothing at all in them make an empty
    /// build, which fails as one.
    #[tokio::test]
    async fn empty_batches_are_skipped() {
        let index = ExactIndex::new();
        let bar = ProgressBar::hidden();
        let batches = vec![Ok(vec![]), Ok(vec![point("a"), point("b")]), Ok(vec![])];
        let report = build_version_batched(&index, "v1", 2, batches.into_iter(), &bar)
            .await
            .unwrap();
        assert_eq!(report.points, 2);
        assert_eq!(index.count().await.unwrap(), 2);
        let err = build_version_batched(&index, "v2", 2, vec![Ok(vec![])].into_iter(), &bar)
            .await
            .unwrap_err();
        assert!(matches!(err, IndexError::EmptyBatch), "{err}");
    }
}
