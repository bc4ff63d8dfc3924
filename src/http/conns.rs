//! The connection table: who holds a slot, whether it is serving a request, and when it last
//! did anything. When every slot is taken, a new connection evicts the connection that has been
//! idle (no request in progress) the longest: a client that sends nothing, or trickles its
//! headers, loses its slot to a scraper instead of making it wait in the kernel's queue.
//! A connection younger than [`MIN_AGE`] is never evicted: a newcomer gets that long to send
//! its request, and clients that reconnect at once cannot churn the table faster than
//! `max_connections` per [`MIN_AGE`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// How long a new connection is safe from eviction.
pub const MIN_AGE: std::time::Duration = std::time::Duration::from_millis(250);

/// One connection's state, shared by its task, its service and the table.
#[derive(Debug)]
pub struct Conn {
    /// Requests being served (headers parsed, response body not yet sent).
    in_flight: AtomicU32,
    /// Milliseconds since the table's epoch of the last byte read or response finished.
    last_active: AtomicU64,
    /// Milliseconds since the table's epoch when the connection was admitted.
    admitted_at: u64,
    /// Notified to evict the connection.
    pub evict: Notify,
    epoch: Instant,
}

impl Conn {
    fn touch(&self) {
        self.last_active
            .store(ms_since(self.epoch), Ordering::Relaxed);
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
        self.table.freed.notify_one();
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
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection: at once if one is free, else by evicting the connection
    /// idle the longest, else (every connection is serving a request or is new) when one ends
    /// or ages.
    pub async fn admit(self: &Arc<Self>) -> Slot {
        let min_age = u64::try_from(MIN_AGE.as_millis()).unwrap_or(u64::MAX);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let now = ms_since(self.epoch);
                let mut conns = self.lock();
                if conns.len() >= self.max {
                    let victim = conns
                        .iter()
                        .filter(|(_, c)| {
                            c.in_flight.load(Ordering::Relaxed) == 0
                                && now.saturating_sub(c.admitted_at) >= min_age
                        })
                        .min_by_key(|(_, c)| c.last_active.load(Ordering::Relaxed))
                        .map(|(id, _)| *id);
                    if let Some(id) = victim {
                        if let Some(c) = conns.remove(&id) {
                            c.evict.notify_one();
                        }
                    }
                }
                if conns.len() < self.max {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let conn = Arc::new(Conn {
                        in_flight: AtomicU32::new(0),
                        last_active: AtomicU64::new(0),
                        admitted_at: now,
                        evict: Notify::new(),
                        epoch: self.epoch,
                    });
                    conn.touch();
                    conns.insert(id, conn.clone());
                    return Slot {
                        table: self.clone(),
                        id,
                        conn,
                    };
                }
            }
            tokio::select! {
                () = freed => {},
                () = tokio::time::sleep(MIN_AGE / 5) => {},
            }
        }
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
    async fn a_full_table_evicts_the_connection_idle_longest_never_a_busy_one() {
        let table = Table::new(2);
        let a = table.admit().await;
        tick().await;
        let b = table.admit().await;
        tick().await;
        let busy_a = a.conn.busy();
        // `a` is serving a request: `b`, though younger, is the one to go.
        let c = table.admit().await;
        assert!(evicted(&b).await);
        // A connection younger than MIN_AGE is not evicted: a newcomer waits.
        let t = table.clone();
        let early = tokio::spawn(async move { t.admit().await });
        tokio::time::sleep(MIN_AGE / 2).await;
        assert!(!early.is_finished());
        early.abort();
        tick().await;
        drop(busy_a);
        tick().await;
        // `a` just finished a response, so `c` has been idle longer.
        let d = table.admit().await;
        assert!(evicted(&c).await);
        assert!(!evicted(&a).await);
        // Both remaining busy: a newcomer waits for one to leave.
        let busy = (a.conn.busy(), d.conn.busy());
        let t = table.clone();
        let waiting = tokio::spawn(async move { t.admit().await });
        tick().await;
        assert!(!waiting.is_finished());
        drop(busy);
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("admitted once a slot frees")
            .unwrap();
    }
}
