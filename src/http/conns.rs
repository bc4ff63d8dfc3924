//! The connection table: who holds a slot, whether it is serving a request, and when it last
//! did anything.
//!
//! Every connection is accepted at once (the kernel's queue stays empty, so a scraper never
//! waits in it behind idle clients) and waits for a slot outside the table. When every slot is
//! taken, a newcomer whose whole request (or TLS hello) has already arrived evicts the
//! connection idle the longest (no request in progress, no byte lately, older than
//! [`MIN_AGE`]), one whose last answer refused it (401, 429) first: a client that sends
//! nothing, trickles its headers or floods wrong passwords loses its slot to a scraper, and a
//! scraper between two requests on a kept-alive connection is shed last. A newcomer that has sent nothing complete waits for a free slot, and is closed after
//! the header timeout; so idle clients, however many and however fast they reconnect, only
//! ever wait behind each other.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// How long a new connection is safe from eviction (it sends its request well within that).
pub const MIN_AGE: std::time::Duration = std::time::Duration::from_millis(100);

/// One connection's state, shared by its task, its service and the table.
#[derive(Debug)]
pub struct Conn {
    /// Requests being served (headers parsed, response body not yet sent).
    in_flight: AtomicU32,
    /// Milliseconds since the table's epoch of the last byte read or response finished.
    last_active: AtomicU64,
    /// Milliseconds since the table's epoch when the connection was admitted.
    admitted_at: u64,
    /// Whether its last answer refused the client (401, 429): shed before the others.
    refused: AtomicBool,
    /// Notified to evict the connection.
    pub evict: Notify,
    epoch: Instant,
}

impl Conn {
    fn touch(&self) {
        self.last_active
            .store(ms_since(self.epoch), Ordering::Relaxed);
    }

    /// Note how the last request was answered: a client refused for its credentials (a
    /// password flood) loses its slot before a client that was served.
    pub fn answered(&self, refused: bool) {
        self.refused.store(refused, Ordering::Relaxed);
    }

    /// Mark a request in progress until the guard is dropped (with the response body).
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }
}

fn ms_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A request in progress on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Conn>);

impl Busy {
    /// See [`Conn::answered`].
    pub fn answered(&self, refused: bool) {
        self.0.answered(refused);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct Table {
    max: usize,
    epoch: Instant,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Notified when a connection leaves the table.
    freed: Notify,
    /// Connections accepted and waiting for a slot.
    waiting: AtomicUsize,
}

/// A slot in the table, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    table: Arc<Table>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
        self.table.freed.notify_waiters();
    }
}

impl Table {
    pub fn new(max: usize) -> Arc<Table> {
        Arc::new(Table {
            max: max.max(1),
            epoch: Instant::now(),
            conns: Mutex::default(),
            next_id: AtomicU64::new(0),
            freed: Notify::new(),
            waiting: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections waiting for a slot (or `None` when there are too many already).
    pub fn wait(self: &Arc<Self>) -> Option<Waiting> {
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max * WAITING_PER_SLOT).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(self.clone()))
    }

    /// Notified when a slot may have become free.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// A slot, if one is free or, for a newcomer whose request has arrived (`ready`), if an
    /// idle connection can be evicted for it.
    pub fn try_admit(self: &Arc<Self>, ready: bool) -> Option<Slot> {
        let now = ms_since(self.epoch);
        let min_age = u64::try_from(MIN_AGE.as_millis()).unwrap_or(u64::MAX);
        let mut conns = self.lock();
        if conns.len() >= self.max && ready {
            let victim = conns
                .iter()
                .filter(|(_, c)| {
                    c.in_flight.load(Ordering::Relaxed) == 0
                        && now.saturating_sub(c.admitted_at) >= min_age
                })
                .min_by_key(|(_, c)| {
                    (
                        !c.refused.load(Ordering::Relaxed),
                        c.last_active.load(Ordering::Relaxed),
                    )
                })
                .map(|(id, _)| *id);
            if let Some(c) = victim.and_then(|id| conns.remove(&id)) {
                c.evict.notify_one();
            }
        }
        if conns.len() >= self.max {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicU32::new(0),
            last_active: AtomicU64::new(now),
            admitted_at: now,
            refused: AtomicBool::new(false),
            evict: Notify::new(),
            epoch: self.epoch,
        });
        conns.insert(id, conn.clone());
        Some(Slot {
            table: self.clone(),
            id,
            conn,
        })
    }
}

/// Connections waiting for a slot, at most this many per slot; more are closed at once unless
/// their request has arrived.
const WAITING_PER_SLOT: usize = 2;

/// A place among the connections waiting for a slot.
#[derive(Debug)]
pub struct Waiting(Arc<Table>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that notes when bytes arrive, so a trickling client counts as active while an
/// idle one ages.
pub struct Tracked<I> {
    pub io: I,
    pub conn: Arc<Conn>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn tick() {
        tokio::time::sleep(MIN_AGE + std::time::Duration::from_millis(5)).await;
    }

    async fn evicted(slot: &Slot) -> bool {
        tokio::time::timeout(
            std::time::Duration::from_millis(200),
            slot.conn.evict.notified(),
        )
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn a_full_table_evicts_the_longest_idle_for_a_ready_newcomer_only() {
        let table = Table::new(2);
        let a = table.try_admit(false).unwrap();
        tick().await;
        let b = table.try_admit(false).unwrap();
        tick().await;
        // Full: a newcomer that has sent nothing complete waits.
        assert!(table.try_admit(false).is_none());
        let busy_a = a.conn.busy();
        // One whose request has arrived evicts the longest idle; `a` is serving, so `b` goes.
        let c = table.try_admit(true).unwrap();
        assert!(evicted(&b).await);
        // `c` is younger than MIN_AGE, `a` is busy: nothing to evict.
        assert!(table.try_admit(true).is_none());
        tick().await;
        drop(busy_a);
        tick().await;
        // `a` just finished a response, so `c` has been idle longer.
        let _d = table.try_admit(true).unwrap();
        assert!(evicted(&c).await);
        assert!(!evicted(&a).await);
        // A slot given back is free for anyone.
        drop(a);
        assert!(table.try_admit(false).is_some());
    }

    #[tokio::test]
    async fn a_refused_client_is_shed_before_one_that_was_served() {
        let table = Table::new(2);
        let served = table.try_admit(false).unwrap();
        tick().await;
        let flooder = table.try_admit(false).unwrap();
        served.conn.busy().answered(false);
        tick().await;
        flooder.conn.busy().answered(true);
        tick().await;
        // `served` has been idle longer, but `flooder` was last refused: it goes first.
        let _newcomer = table.try_admit(true).unwrap();
        assert!(evicted(&flooder).await);
        assert!(!evicted(&served).await);
    }

    #[test]
    fn waiting_connections_are_bounded() {
        let table = Table::new(1);
        let w: Vec<_> = (0..WAITING_PER_SLOT)
            .map(|_| table.wait().unwrap())
            .collect();
        assert!(table.wait().is_none());
        drop(w);
        assert!(table.wait().is_some());
    }
}
