//! Live tail: delivers every event stored after a subscription, once and
//! in arrival order, to each subscriber whose filter it matches.
//!
//! Concurrent batches may finish out of order, so the hub holds back a
//! batch until every earlier arrival number has been published. Each
//! subscriber has a bounded queue; a subscriber that falls a whole queue
//! behind is dropped (its receiver ends with [`TailEnd::Lagged`]), so a slow
//! consumer never slows ingest nor grows memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::event::{Event, Severity};

/// Events a subscriber may be behind before it is dropped.
pub const TAIL_QUEUE_EVENTS: usize = 4096;
/// Out-of-order batches held back at most; past it (which means a bug: an
/// arrival number was never published) the oldest are released anyway.
const PENDING_BATCHES_MAX: usize = 65_536;

/// The filters of a tail (contract §3 `GET /events/stream`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TailFilter {
    /// Any of (empty: all).
    pub sources: Vec<String>,
    /// Any of (empty: all).
    pub types: Vec<String>,
    /// A minimum level.
    pub min_severity: Option<Severity>,
    /// All of.
    pub tags: Vec<String>,
}

impl TailFilter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.sources.is_empty() || self.sources.contains(&e.source))
            && (self.types.is_empty() || self.types.contains(&e.event_type))
            && self.min_severity.is_none_or(|m| e.severity >= m)
            && self.tags.iter().all(|t| e.tags.iter().any(|x| x == t))
    }
}

/// Why a subscription ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TailEnd {
    /// The subscriber fell [`TAIL_QUEUE_EVENTS`] events behind.
    Lagged,
    /// The database is closing.
    Closed,
}

/// The receiving end of a subscription.
pub struct Subscription {
    rx: mpsc::Receiver<Arc<Event>>,
    state: Arc<SubState>,
    hub: Arc<HubShared>,
    id: u64,
}

impl Subscription {
    /// The next matching event, or why the subscription ended.
    pub async fn next(&mut self) -> Result<Arc<Event>, TailEnd> {
        match self.rx.recv().await {
            Some(e) => Ok(e),
            None => Err(self.end()),
        }
    }

    /// Like [`Subscription::next`] without waiting: `Ok(None)` when nothing
    /// is queued yet.
    pub fn try_next(&mut self) -> Result<Option<Arc<Event>>, TailEnd> {
        match self.rx.try_recv() {
            Ok(e) => Ok(Some(e)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(self.end()),
        }
    }

    fn end(&self) -> TailEnd {
        if self.state.lagged.load(Ordering::Acquire) == 1 {
            TailEnd::Lagged
        } else {
            TailEnd::Closed
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

struct SubState {
    lagged: AtomicUsize,
}

struct Subscriber {
    id: u64,
    filter: TailFilter,
    tx: mpsc::Sender<Arc<Event>>,
    state: Arc<SubState>,
}

struct HubInner {
    /// The arrival number the next published event must carry.
    next_seq: u64,
    /// Batches that finished early, by first arrival number: (count,
    /// events — empty when nobody listened at the time).
    pending: BTreeMap<u64, (u64, Vec<Arc<Event>>)>,
    subscribers: Vec<Subscriber>,
    next_id: u64,
    closed: bool,
}

struct HubShared {
    inner: Mutex<HubInner>,
    count: AtomicUsize,
}

impl HubShared {
    fn remove(&self, id: u64) {
        let mut inner = self.inner.lock();
        inner.subscribers.retain(|s| s.id != id);
        self.count.store(inner.subscribers.len(), Ordering::Release);
    }
}

/// The hub one `Db` owns.
pub struct TailHub {
    shared: Arc<HubShared>,
}

impl TailHub {
    /// A hub whose next event carries arrival number `next_seq`.
    pub fn new(next_seq: u64) -> TailHub {
        TailHub {
            shared: Arc::new(HubShared {
                inner: Mutex::new(HubInner {
                    next_seq,
                    pending: BTreeMap::new(),
                    subscribers: Vec::new(),
                    next_id: 0,
                    closed: false,
                }),
                count: AtomicUsize::new(0),
            }),
        }
    }

    /// Subscribes to events stored from now on.
    pub fn subscribe(&self, filter: TailFilter) -> Subscription {
        let (tx, rx) = mpsc::channel(TAIL_QUEUE_EVENTS);
        let state = Arc::new(SubState {
            lagged: AtomicUsize::new(0),
        });
        let mut inner = self.shared.inner.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        if !inner.closed {
            inner.subscribers.push(Subscriber {
                id,
                filter,
                tx,
                state: state.clone(),
            });
        }
        self.shared
            .count
            .store(inner.subscribers.len(), Ordering::Release);
        Subscription {
            rx,
            state,
            hub: self.shared.clone(),
            id,
        }
    }

    /// Current subscribers.
    pub fn subscribers(&self) -> usize {
        self.shared.count.load(Ordering::Acquire)
    }

    /// Whether anyone listens (cheap: callers skip building events when
    /// not).
    pub fn has_subscribers(&self) -> bool {
        self.subscribers() > 0
    }

    /// Publishes a run of `count` consecutive arrival numbers starting at
    /// `first_seq`. `events` holds them (or is empty when the caller saw no
    /// subscriber; a subscriber that joined meanwhile starts after them).
    pub fn publish(&self, first_seq: u64, count: u64, events: Vec<Arc<Event>>) {
        if count == 0 {
            return;
        }
        let mut inner = self.shared.inner.lock();
        if first_seq < inner.next_seq {
            debug_assert!(false, "arrival {first_seq} published twice");
            return;
        }
        inner.pending.insert(first_seq, (count, events));
        loop {
            let next = inner.next_seq;
            let ready = match inner.pending.first_key_value() {
                Some((&seq, _)) if seq == next => true,
                Some(_) if inner.pending.len() > PENDING_BATCHES_MAX => true,
                _ => false,
            };
            if !ready {
                break;
            }
            let Some((seq, (count, events))) = inner.pending.pop_first() else {
                break;
            };
            inner.next_seq = seq + count;
            deliver(&mut inner.subscribers, &events);
        }
        self.shared
            .count
            .store(inner.subscribers.len(), Ordering::Release);
    }

    /// Ends every subscription (they see [`TailEnd::Closed`]).
    pub fn close(&self) {
        let mut inner = self.shared.inner.lock();
        inner.closed = true;
        inner.subscribers.clear();
        self.shared.count.store(0, Ordering::Release);
    }
}

fn deliver(subscribers: &mut Vec<Subscriber>, events: &[Arc<Event>]) {
    if subscribers.is_empty() || events.is_empty() {
        return;
    }
    subscribers.retain(|sub| {
        for e in events {
            if !sub.filter.matches(e) {
                continue;
            }
            match sub.tx.try_send(e.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.state.lagged.store(1, Ordering::Release);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Timestamp;

    fn ev(n: u64, source: &str) -> Arc<Event> {
        let mut e = Event::new(source, "t");
        e.id = format!("e{n}");
        e.timestamp = Timestamp(n as i64);
        Arc::new(e)
    }

    #[test]
    fn reorders_batches_that_finish_early() {
        let hub = TailHub::new(10);
        let mut sub = hub.subscribe(TailFilter::default());
        hub.publish(12, 2, vec![ev(12, "a"), ev(13, "a")]);
        assert_eq!(sub.try_next().unwrap(), None);
        hub.publish(10, 2, vec![ev(10, "a"), ev(11, "a")]);
        let got: Vec<String> = (0..4)
            .map(|_| sub.try_next().unwrap().unwrap().id.clone())
            .collect();
        assert_eq!(got, ["e10", "e11", "e12", "e13"]);
    }

    #[test]
    fn filters_and_drops_a_lagging_subscriber() {
        let hub = TailHub::new(0);
        let mut only_b = hub.subscribe(TailFilter {
            sources: vec!["b".into()],
            ..TailFilter::default()
        });
        let mut slow = hub.subscribe(TailFilter::default());
        let n = TAIL_QUEUE_EVENTS as u64 + 1;
        let events: Vec<_> = (0..n)
            .map(|i| ev(i, if i == 5 { "b" } else { "a" }))
            .collect();
        hub.publish(0, n, events);
        assert_eq!(only_b.try_next().unwrap().unwrap().id, "e5");
        assert_eq!(only_b.try_next().unwrap(), None);
        for _ in 0..TAIL_QUEUE_EVENTS {
            slow.try_next().unwrap().unwrap();
        }
        assert_eq!(slow.try_next(), Err(TailEnd::Lagged));
        assert_eq!(hub.subscribers(), 1);
        drop(only_b);
        assert_eq!(hub.subscribers(), 0);
    }
}
