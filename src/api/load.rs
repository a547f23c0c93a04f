//! Holding ground under load: at most so many connections per listener
//! (more wait in the kernel's accept queue), a deadline per request, and
//! at most so many queries at once (more wait a moment, then are refused
//! with 503 / `RESOURCE_EXHAUSTED` rather than queueing without bound).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a query waits for a slot before it is refused.
pub const QUERY_WAIT: Duration = Duration::from_secs(1);

/// The load limits of a daemon (`[limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// Open connections per listener.
    pub max_connections: usize,
    /// Longest a request may take, body included (unary gRPC calls;
    /// streams and the WebSocket tail are not cut).
    pub request_timeout: Duration,
    /// Queries, stats and aggregations running at once, both listeners.
    pub max_concurrent_queries: usize,
}

impl Default for LoadLimits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        LoadLimits {
            max_connections: 1024,
            request_timeout: Duration::from_secs(60),
            max_concurrent_queries: (2 * cores).max(4),
        }
    }
}

/// The query slots shared by both listeners.
#[derive(Debug)]
pub struct QueryGate {
    slots: Arc<Semaphore>,
    max: usize,
}

/// Refused: every query slot stayed taken for [`QUERY_WAIT`].
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "too many queries at once (max_concurrent_queries = {max}): none finished within a second; retry shortly"
)]
pub struct Busy {
    pub max: usize,
}

impl QueryGate {
    pub fn new(max: usize) -> QueryGate {
        QueryGate {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, held until the permit is dropped; waits up to `QUERY_WAIT`.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Busy> {
        match tokio::time::timeout(QUERY_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Busy { max: self.max }),
        }
    }
}

/// A connection that holds one of its listener's permits while open.
pub struct Counted<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Counted<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Waits for a permit (never closed: waits forever if it were).
async fn permit(permits: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    match permits.clone().acquire_owned().await {
        Ok(p) => p,
        Err(_) => std::future::pending().await,
    }
}

/// An axum listener that accepts only while fewer than `max` of its
/// connections are open.
pub struct LimitedListener<L> {
    inner: L,
    permits: Arc<Semaphore>,
}

impl<L> LimitedListener<L> {
    pub fn new(inner: L, max: usize) -> LimitedListener<L> {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(max)),
        }
    }
}

impl<L> axum::serve::Listener for LimitedListener<L>
where
    L: axum::serve::Listener,
{
    type Io = Counted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = permit(&self.permits).await;
        let (io, addr) = self.inner.accept().await;
        (
            Counted {
                io,
                _permit: permit,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The gRPC listener's connections, at most `max` open at once.
pub fn limited_incoming<S, T>(
    incoming: S,
    max: usize,
) -> impl futures_util::Stream<Item = Result<Counted<T>, std::io::Error>>
where
    S: futures_util::Stream<Item = Result<T, std::io::Error>> + Unpin,
{
    let permits = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((incoming, permits), |(mut incoming, permits)| async move {
        use futures_util::StreamExt;
        let permit = permit(&permits).await;
        let next = incoming.next().await?;
        Some((
            next.map(|io| Counted {
                io,
                _permit: permit,
            }),
            (incoming, permits),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_gate_refuses_after_a_second_and_frees_on_drop() {
        let gate = QueryGate::new(2);
        let a = gate.enter().await.unwrap();
        let _b = gate.enter().await.unwrap();
        let started = tokio::time::Instant::now();
        let err = gate.enter().await.unwrap_err();
        assert_eq!(started.elapsed(), QUERY_WAIT);
        assert!(err.to_string().contains("max_concurrent_queries = 2"));
        drop(a);
        assert!(gate.enter().await.is_ok());
    }
}
