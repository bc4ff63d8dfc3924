//! The exposition's output: text buffered and shipped in chunks of [`CHUNK`] bytes, and stored
//! maps walked a chunk at a time under a fresh read lock each (see [`Sink::each`]).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::ops::Bound;

use super::text::{Format, Writer};
use super::Shared;
use crate::store::State;

/// The buffer is shipped once it holds this much.
pub const CHUNK: usize = 64 * 1024;

/// Buffers exposition text and ships it to `out` in chunks.
pub struct Sink<'o> {
    buf: Vec<u8>,
    format: Format,
    out: &'o mut dyn Write,
}

impl<'o> Sink<'o> {
    pub fn new(format: Format, out: &'o mut dyn Write) -> Sink<'o> {
        Sink {
            buf: Vec::with_capacity(CHUNK + CHUNK / 4),
            format,
            out,
        }
    }

    pub fn writer(&mut self) -> Writer<'_> {
        Writer {
            out: &mut self.buf,
            format: self.format,
        }
    }

    /// Ship the buffer if it is full. Never call it while holding a lock: it may wait on the
    /// network.
    pub fn ship_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= CHUNK {
            self.ship()?;
        }
        Ok(())
    }

    fn ship(&mut self) -> io::Result<()> {
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Write every entry of a map in the state, a chunk at a time: the read lock is taken for
    /// each chunk and released before the chunk is shipped. Entries added or removed between
    /// two chunks may or may not be seen, as with any scrape racing an update.
    pub fn each<K: Ord + Clone, V>(
        &mut self,
        shared: &Shared,
        map: impl for<'s> Fn(&'s State) -> &'s BTreeMap<K, V>,
        mut write: impl FnMut(&mut Writer<'_>, &K, &V),
    ) -> io::Result<()> {
        let mut after: Option<K> = None;
        loop {
            let next = {
                let state = shared.committed.read();
                let map = map(&state);
                let range = match &after {
                    Some(k) => map.range((Bound::Excluded(k), Bound::Unbounded)),
                    None => map.range::<K, _>(..),
                };
                let mut w = self.writer();
                let mut next = None;
                for (k, v) in range {
                    write(&mut w, k, v);
                    if w.out.len() >= CHUNK {
                        next = Some(k.clone());
                        break;
                    }
                }
                next
            };
            self.ship_if_full()?;
            match next {
                Some(k) => after = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// Ship what is left.
    pub fn finish(mut self) -> io::Result<()> {
        self.ship()?;
        self.out.flush()
    }
}
