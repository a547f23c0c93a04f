//! Sharing one request's work with an idle core, without ever waiting for
//! one that is busy.
//!
//! [`help_from_pool`] runs items on the calling thread and lets one task of
//! a small `rayon` pool (one thread fewer than the cores) take items too,
//! whenever it gets a core. The caller
//! claims items until none is left and then waits only for the items the
//! helper has already started: on a busy machine the helper may never run
//! and the caller does everything itself, at the cost of one atomic per
//! item (a plain `par_iter` from outside the pool would block the caller
//! until pool threads were scheduled, which showed up as tail latency when
//! the daemon shared its cores with clients).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Condvar, Mutex};

/// The helpers: one thread fewer than the machine has cores, so that the
/// callers plus their helpers never outnumber the cores (a pool of one per
/// core kept an extra thread spinning for work). None on one core.
fn helpers() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores - 1)
            .thread_name(|i| format!("evdb-read-{i}"))
            // A failed item is run again by its caller (without a handler a
            // panicking job would abort the process).
            .panic_handler(|_| {
                tracing::error!("a read helper panicked; its caller redoes the item")
            })
            .build()
            .ok()
    })
    .as_ref()
}

struct State<T> {
    next: AtomicUsize,
    results: Mutex<Vec<Option<T>>>,
    /// Items the helper has claimed and not yet finished.
    helping: Mutex<usize>,
    done: Condvar,
}

impl<T> State<T> {
    /// Claims and runs items until none is left. The helper claims and
    /// counts each item under the `helping` lock, so that the caller, once
    /// it holds that lock, sees every item the helper started.
    fn work_through(&self, n: usize, work: &dyn Fn(usize) -> T, helper: bool) {
        loop {
            let i = {
                let mut helping = helper.then(|| self.helping.lock());
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                if let Some(h) = helping.as_mut() {
                    **h += 1;
                }
                i
            };
            // Counted down even if `work` panics, so the caller never waits
            // for an item that will not finish (it runs that item itself).
            let _finished = helper.then_some(Finished(&self.helping, &self.done));
            let value = work(i);
            if let Some(slot) = self.results.lock().get_mut(i) {
                *slot = Some(value);
            }
        }
    }
}

/// Counts one helper item down when dropped.
struct Finished<'a>(&'a Mutex<usize>, &'a Condvar);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let mut helping = self.0.lock();
        *helping = helping.saturating_sub(1);
        if *helping == 0 {
            self.1.notify_all();
        }
    }
}

/// Runs `work(i)` for every `i` in `0..n` and returns the results in
/// order; items run on the calling thread and on at most one helper.
pub fn help_from_pool<T, F>(n: usize, work: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    let state = Arc::new(State {
        next: AtomicUsize::new(0),
        results: Mutex::new((0..n).map(|_| None).collect()),
        helping: Mutex::new(0),
        done: Condvar::new(),
    });
    let work = Arc::new(work);
    if n > 1
        && let Some(pool) = helpers()
    {
        let state = state.clone();
        let work = work.clone();
        pool.spawn(move || state.work_through(n, &*work, true));
    }
    state.work_through(n, &*work, false);
    {
        let mut helping = state.helping.lock();
        while *helping > 0 {
            state.done.wait(&mut helping);
        }
    }
    let results = std::mem::take(&mut *state.results.lock());
    // An item is missing only if the helper panicked on it: run it here.
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| work(i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_once_in_order() {
        for n in [0, 1, 2, 7, 100] {
            let seen = Arc::new(AtomicUsize::new(0));
            let counter = seen.clone();
            let out = help_from_pool(n, move |i| {
                counter.fetch_add(1, Ordering::Relaxed);
                i * 2
            });
            assert_eq!(out, (0..n).map(|i| i * 2).collect::<Vec<_>>());
            assert_eq!(seen.load(Ordering::Relaxed), n);
        }
    }

    // Release builds abort on panic: there is nothing to recover from.
    #[cfg(panic = "unwind")]
    #[test]
    fn a_panicking_helper_neither_hangs_nor_loses_items() {
        let out = help_from_pool(40, |i| {
            let on_helper = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("evdb-read"));
            assert!(!on_helper, "the helper fails every item it takes");
            std::thread::sleep(std::time::Duration::from_millis(1));
            i
        });
        assert_eq!(out, (0..40).collect::<Vec<_>>());
    }
}
