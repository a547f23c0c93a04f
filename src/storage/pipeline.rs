//! Work items run on niced helper threads, their results consumed in
//! order on the calling thread: how sealing and compaction compress blocks
//! on every core while one thread writes the file front to back.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::StorageError;

/// Runs `work(n, state)` for every `n` in `0..count` on one niced scoped
/// thread per element of `states` (each owns its state, a compressor), and
/// calls `consume(n, result)` on this thread in the order of `n`. At most
/// two items per thread are in flight, so memory stays bounded whatever
/// `count` is. A failed `consume` stops the helpers. `name`, `path` and
/// `segment` name the threads and the errors.
pub(crate) fn in_order<S, T>(
    name: &str,
    path: &Path,
    segment: u64,
    states: Vec<S>,
    count: usize,
    work: impl Fn(usize, &mut S) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), StorageError>,
) -> Result<(), StorageError>
where
    S: Send,
    T: Send,
{
    let threads = states.len();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (tokens_tx, tokens_rx) = crossbeam_channel::unbounded::<()>();
        for _ in 0..2 * threads {
            let _ = tokens_tx.send(());
        }
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        for mut state in states {
            let (tokens_rx, done_tx) = (tokens_rx.clone(), done_tx.clone());
            let (work, next) = (&work, &next);
            std::thread::Builder::new()
                .name(name.into())
                .spawn_scoped(s, move || {
                    super::nice_background_thread();
                    while tokens_rx.recv().is_ok() {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count || done_tx.send((n, work(n, &mut state))).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| StorageError::io(path, e))?;
        }
        drop(done_tx);
        let mut ready = std::collections::BTreeMap::new();
        for n in 0..count {
            let result = loop {
                if let Some(r) = ready.remove(&n) {
                    break r;
                }
                let (m, r) = done_rx
                    .recv()
                    .map_err(|_| StorageError::corrupted(segment, 0, format!("{name} stopped")))?;
                ready.insert(m, r);
            };
            consume(n, result)?;
            let _ = tokens_tx.send(());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_item_once_in_order() {
        for (threads, count) in [(1, 0), (1, 5), (2, 1), (2, 100), (3, 17)] {
            let mut seen = Vec::new();
            in_order(
                "evdb-test",
                Path::new("x"),
                0,
                (0..threads).map(|t| (t, 0usize)).collect(),
                count,
                |n, state: &mut (usize, usize)| {
                    state.1 += 1;
                    n * 3
                },
                |n, v| {
                    seen.push((n, v));
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(seen, (0..count).map(|n| (n, n * 3)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_failed_consumer_stops_the_helpers() {
        let mut calls = 0;
        let r = in_order(
            "evdb-test",
            Path::new("x"),
            7,
            vec![(), ()],
            1000,
            |n, _: &mut ()| n,
            |n, _| {
                calls += 1;
                if n == 3 {
                    Err(StorageError::corrupted(7, 0, "stop"))
                } else {
                    Ok(())
                }
            },
        );
        assert!(r.is_err());
        assert_eq!(calls, 4);
    }
}
