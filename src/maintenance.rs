//! Keeping the store within bounds: retention (by age, by total size, per
//! source) and compaction (rewriting segments without their deleted rows,
//! merging small ones). One maintenance job runs at a time; ingest, queries
//! and deletes go on meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use roaring::RoaringBitmap;

use crate::db::{Db, DbError};
use crate::event::Timestamp;
use crate::index::Dim;
use crate::storage::SealedSegment;
use crate::storage::compact::{CompactInput, Compacted, Throttle, can_merge};

/// When compaction rewrites or merges sealed segments.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactionPolicy {
    /// Rewrite a segment once this fraction of its rows is deleted.
    pub deleted_ratio: f64,
    /// Rewrite a segment whose oldest pending deletion is older than this,
    /// whatever the fraction: the bound on how long deleted bytes stay.
    pub deleted_max_age: Duration,
    /// Segments smaller than this are merged with their neighbours.
    pub small_segment_bytes: u64,
    /// A merge stops growing a segment at this size.
    pub max_segment_bytes: u64,
    /// Read at most this many bytes per second (0: no limit), all
    /// threads together.
    pub io_bytes_per_sec: u64,
    /// Threads that rewrite a run's blocks (niced; one more writes them).
    pub threads: usize,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            deleted_ratio: 0.2,
            deleted_max_age: Duration::from_secs(24 * 3600),
            small_segment_bytes: 16 << 20,
            max_segment_bytes: crate::storage::StorageConfig::default().segment_size_bytes,
            io_bytes_per_sec: 0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One compaction run.
#[derive(Clone, Debug)]
pub struct CompactOptions {
    pub policy: CompactionPolicy,
    /// The time deletion ages are measured at.
    pub now: Timestamp,
    /// Rewrite every segment with a deleted row, now (`evdb compact --now`).
    pub force: bool,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            policy: CompactionPolicy::default(),
            now: Timestamp::now(),
            force: false,
        }
    }
}

/// What a compaction run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompactReport {
    /// Segments rewritten or merged.
    pub segments_in: usize,
    /// Segments they became.
    pub segments_out: usize,
    /// Deleted events whose bytes are gone.
    pub events_removed: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub elapsed_ms: u64,
}

/// How far a compaction run is: bytes read of bytes planned.
#[derive(Clone, Copy, Debug)]
pub struct CompactProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Which events retention keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Events older than this go (per-source overrides aside).
    pub max_age: Option<Duration>,
    /// The oldest sealed segments go while the segments take more bytes.
    pub max_bytes: Option<u64>,
    /// Per-source maximum age, shorter or longer than `max_age`.
    pub sources: BTreeMap<String, Duration>,
}

/// What a retention run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetentionReport {
    /// Whole segments dropped (their files are gone).
    pub segments_dropped: usize,
    /// Events that expired (hidden at once): those of dropped segments,
    /// and those of segments that stay, whose bytes compaction frees.
    pub events_deleted: u64,
    pub bytes_freed: u64,
}

fn cutoff(now: Timestamp, age: Duration) -> i64 {
    now.as_micros()
        .saturating_sub(i64::try_from(age.as_micros()).unwrap_or(i64::MAX))
}

impl Db {
    /// Plans compaction: runs of adjacent sealed segments, each run made
    /// of segments to rewrite (enough deleted rows, or deletions older
    /// than the bound, or any with `force`) and small segments, grown up
    /// to `max_segment_bytes`. A run of one small segment without deleted
    /// rows is left alone.
    fn compaction_plan(&self, opts: &CompactOptions) -> Result<Vec<Vec<CompactInput>>, DbError> {
        let set = self.log().segments();
        let since: BTreeMap<u64, i64> = self.log().deleted_since()?.into_iter().collect();
        let bound = cutoff(opts.now, opts.policy.deleted_max_age);
        let mut runs: Vec<Vec<CompactInput>> = Vec::new();
        let mut run: Vec<CompactInput> = Vec::new();
        let mut run_bytes = 0u64;
        let worth = |run: &[CompactInput]| run.len() > 1 || run.iter().any(|i| !i.drop.is_empty());
        for seg in &set.sealed {
            let drop = self
                .deleted_rows(seg.id)
                .map(|d| RoaringBitmap::clone(&d))
                .unwrap_or_default();
            let ratio = drop.len() as f64 / f64::from(seg.rows.max(1));
            let rewrite = !drop.is_empty()
                && (opts.force
                    || ratio >= opts.policy.deleted_ratio
                    || since.get(&seg.id).is_some_and(|&t| t <= bound));
            let small = seg.file_bytes() < opts.policy.small_segment_bytes;
            let live_bytes = (seg.file_bytes() as f64 * (1.0 - ratio)) as u64;
            if !(rewrite || small) {
                if worth(&run) {
                    runs.push(std::mem::take(&mut run));
                }
                run.clear();
                run_bytes = 0;
                continue;
            }
            let mut candidate: Vec<Arc<SealedSegment>> =
                run.iter().map(|i| i.segment.clone()).collect();
            candidate.push(seg.clone());
            let fits = run_bytes + live_bytes <= opts.policy.max_segment_bytes
                && can_merge(&set, &candidate);
            if !run.is_empty() && !fits {
                if worth(&run) {
                    runs.push(std::mem::take(&mut run));
                }
                run.clear();
                run_bytes = 0;
            }
            // A segment to rewrite that holds nothing to drop is only merged.
            let drop = if rewrite { drop } else { RoaringBitmap::new() };
            run.push(CompactInput {
                segment: seg.clone(),
                drop,
            });
            run_bytes += live_bytes;
        }
        if worth(&run) {
            runs.push(run);
        }
        Ok(runs)
    }

    /// Compacts per `opts`: each planned run of segments is rewritten into
    /// one (deleted rows left out), swapped in atomically and its old files
    /// unlinked. Crash-safe at every step; ingest, queries and deletes go
    /// on meanwhile (a deletion made during a rewrite is carried over).
    pub fn compact(
        &self,
        opts: &CompactOptions,
        mut progress: impl FnMut(CompactProgress) + Send,
    ) -> Result<CompactReport, DbError> {
        let _one_job = self.maintenance_lock().lock();
        let started = Instant::now();
        // Deleted rows of the open segments are due too: seal them first
        // (a quiet store may take weeks to fill a segment).
        let bound = cutoff(opts.now, opts.policy.deleted_max_age);
        let since: BTreeMap<u64, i64> = self.log().deleted_since()?.into_iter().collect();
        let open_due = self.log().segments().iter().any(|s| {
            matches!(s, crate::storage::SegmentRef::Open(_))
                && self.deleted_rows(s.id()).is_some_and(|d| !d.is_empty())
                && (opts.force || since.get(&s.id()).is_some_and(|&t| t <= bound))
        });
        if open_due {
            self.seal()?;
        }
        let runs = self.compaction_plan(opts)?;
        let bytes_total: u64 = runs.iter().flatten().map(|i| i.segment.file_bytes()).sum();
        let mut report = CompactReport::default();
        let throttle = Throttle::new(opts.policy.io_bytes_per_sec);
        progress(CompactProgress {
            bytes_done: 0,
            bytes_total,
        });
        let mut done = 0u64;
        for run in runs {
            let run_bytes: u64 = run.iter().map(|i| i.segment.file_bytes()).sum();
            let compacted = self
                .log()
                .compact_write(run, opts.policy.threads, &throttle, |d| {
                    progress(CompactProgress {
                        bytes_done: done + d,
                        bytes_total,
                    });
                })?;
            self.swap_compacted(&compacted)?;
            done += run_bytes;
            report.segments_in += compacted.inputs.len();
            report.segments_out += usize::from(compacted.sealed.is_some());
            report.events_removed += compacted.rows_removed();
            report.bytes_before += run_bytes;
            report.bytes_after += compacted.sealed.as_ref().map_or(0, |s| s.file_bytes());
            let inputs = compacted.inputs.into_iter().map(|i| i.segment).collect();
            self.log().compact_unlink(inputs)?;
            progress(CompactProgress {
                bytes_done: done,
                bytes_total,
            });
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        if report.segments_in > 0 {
            tracing::info!(
                segments_in = report.segments_in,
                segments_out = report.segments_out,
                events_removed = report.events_removed,
                bytes_before = report.bytes_before,
                bytes_after = report.bytes_after,
                elapsed_ms = report.elapsed_ms,
                "compaction"
            );
        }
        Ok(report)
    }

    /// Makes a written compaction visible: carries over the deletions
    /// made while it was written and swaps it in. Its inputs' files are
    /// the caller's to unlink, once it lets go of the inputs.
    fn swap_compacted(&self, compacted: &Compacted) -> Result<(), DbError> {
        {
            // Deletions wait while the swap carries theirs over.
            let _no_deletes = self.delete_lock().lock();
            let late: Vec<(u64, RoaringBitmap)> = compacted
                .inputs
                .iter()
                .filter_map(|i| {
                    let now = self.deleted_rows(i.segment.id)?;
                    let late = now.as_ref() - &i.drop;
                    (!late.is_empty()).then_some((i.segment.id, late))
                })
                .collect();
            let deleted = compacted.renumber(&late);
            if let Some(new) = &compacted.sealed {
                // Visible before the new segment is: no deleted row shows
                // up again, not even for a moment.
                self.indexes().set_deleted(new.id, deleted.clone());
            }
            let removed =
                self.log()
                    .compact_swap(compacted, &deleted, Timestamp::now().as_micros())?;
            self.indexes().forget(&removed);
        }
        Ok(())
    }

    /// Applies a retention policy at `now`. Events past their cutoff (the
    /// source's own, else `max_age`) are deleted — hidden at once; sealed
    /// segments left with no live event are dropped whole (files gone,
    /// space back at once); then, while the segments take more than
    /// `max_bytes`, the oldest sealed segment is dropped. Durable when
    /// this returns; a crash midway leaves files the next open removes.
    pub fn apply_retention_policy(
        &self,
        policy: &RetentionPolicy,
        now: Timestamp,
    ) -> Result<RetentionReport, DbError> {
        let _one_job = self.maintenance_lock().lock();
        let mut report = RetentionReport::default();
        if policy.max_age.is_some() || !policy.sources.is_empty() {
            report.events_deleted = self.delete_expired(policy, now)?;
        }
        // Sealed segments with nothing live left go whole.
        let set = self.log().segments();
        let empty: Vec<u64> = set
            .sealed
            .iter()
            .filter(|s| {
                self.deleted_rows(s.id)
                    .is_some_and(|d| d.len() >= u64::from(s.rows))
            })
            .map(|s| s.id)
            .collect();
        let mut victims = empty;
        if let Some(max) = policy.max_bytes {
            let mut total: u64 = set
                .iter()
                .map(|s| match s {
                    crate::storage::SegmentRef::Sealed(s) => s.file_bytes(),
                    crate::storage::SegmentRef::Open(o) => o.file_bytes(),
                })
                .sum();
            for s in &set.sealed {
                if victims.contains(&s.id) {
                    total = total.saturating_sub(s.file_bytes());
                }
            }
            for s in &set.sealed {
                if total <= max {
                    break;
                }
                if !victims.contains(&s.id) {
                    victims.push(s.id);
                    total = total.saturating_sub(s.file_bytes());
                }
            }
        }
        if !victims.is_empty() {
            let dropped = {
                let _no_deletes = self.delete_lock().lock();
                report.bytes_freed = set
                    .sealed
                    .iter()
                    .filter(|s| victims.contains(&s.id))
                    .map(|s| s.file_bytes())
                    .sum();
                // Let go of the victims: a segment nobody holds has its
                // file given back in steps (`Log::compact_unlink`).
                drop(set);
                self.log().drop_sealed(&victims)?
            };
            let ids: Vec<u64> = dropped.iter().map(|s| s.id).collect();
            self.indexes().forget(&ids);
            report.segments_dropped = ids.len();
            // Outside the delete lock: a delete need not wait for the
            // steps' syncs.
            self.log().compact_unlink(dropped)?;
        }
        if report.segments_dropped > 0 || report.events_deleted > 0 {
            tracing::info!(
                segments_dropped = report.segments_dropped,
                events_deleted = report.events_deleted,
                bytes_freed = report.bytes_freed,
                "retention"
            );
        }
        Ok(report)
    }

    /// Deletes every live event past its cutoff; returns how many.
    fn delete_expired(&self, policy: &RetentionPolicy, now: Timestamp) -> Result<u64, DbError> {
        let default_cut = policy.max_age.map(|a| cutoff(now, a));
        let source_cuts: Vec<(&str, i64)> = policy
            .sources
            .iter()
            .map(|(s, a)| (s.as_str(), cutoff(now, *a)))
            .collect();
        self.delete_older(default_cut, &source_cuts)
    }

    /// Deletes every live event with a timestamp before its source's cut
    /// (`source_cuts`), or before `default_cut` for other sources (none:
    /// they stay); returns how many. Durable when this returns.
    pub(crate) fn delete_older(
        &self,
        default_cut: Option<i64>,
        source_cuts: &[(&str, i64)],
    ) -> Result<u64, DbError> {
        // No event at or after this can be past any cutoff.
        let latest_cut = source_cuts
            .iter()
            .map(|(_, c)| *c)
            .chain(default_cut)
            .max()
            .unwrap_or(i64::MIN);
        let _one_at_a_time = self.delete_lock().lock();
        let set = self.log().segments();
        let held = self.indexes().hold_all(&set)?;
        let mut changes = Vec::new();
        let mut total = 0u64;
        for (segment, h) in &held {
            let index = h.view();
            match index.time_bounds() {
                Some((min, _)) if min < latest_cut => {}
                _ => continue,
            }
            let live = index.live().into_owned();
            let mut rows = RoaringBitmap::new();
            let mut overridden = RoaringBitmap::new();
            for (source, cut) in source_cuts {
                if let Some(b) = index.bitmap(Dim::Source, source)? {
                    let b = b.as_ref() & &live;
                    for row in b.iter() {
                        if index.timestamp(row)? < *cut {
                            rows.insert(row);
                        }
                    }
                    overridden |= b;
                }
            }
            if let Some(cut) = default_cut {
                for row in (live - overridden).iter() {
                    if index.timestamp(row)? < cut {
                        rows.insert(row);
                    }
                }
            }
            if !rows.is_empty() {
                total += rows.len();
                changes.push((*segment, rows));
            }
        }
        drop(held);
        self.apply_deletes(changes)?;
        Ok(total)
    }
}

/// The maintenance a store is configured with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policies {
    pub retention: Option<RetentionPolicy>,
    pub compaction: CompactionPolicy,
}

/// What [`Db::maintain`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MaintenanceReport {
    /// `None` when no retention is configured.
    pub retention: Option<RetentionReport>,
    pub compaction: CompactReport,
}

impl Db {
    /// Retention (when configured), then compaction: what `evdb compact`
    /// and `POST /admin/compact` run. `force` rewrites every segment with a
    /// deleted event now (`--now`).
    pub fn maintain(
        &self,
        policies: &Policies,
        now: Timestamp,
        force: bool,
        progress: impl FnMut(CompactProgress) + Send,
    ) -> Result<MaintenanceReport, DbError> {
        let retention = policies
            .retention
            .as_ref()
            .map(|p| self.apply_retention_policy(p, now))
            .transpose()?;
        let compaction = self.compact(
            &CompactOptions {
                policy: policies.compaction.clone(),
                now,
                force,
            },
            progress,
        )?;
        Ok(MaintenanceReport {
            retention,
            compaction,
        })
    }
}
