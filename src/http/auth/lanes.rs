//! The single bcrypt slot, shared fairly: checks wait in lanes (one per configured user, one
//! shared by every unknown name), each holding at most [`LANE`] waiting checks, and the slot
//! passes from lane to lane in turn. A flood fills its own lane and is refused there (429),
//! while a check in any other lane waits for at most one check per lane.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

/// Checks waiting in one lane (the one running is not counted); one more is refused.
pub const LANE: usize = 4;

pub struct Lanes {
    state: Mutex<State>,
}

struct State {
    /// Whether a [`Turn`] is out.
    running: bool,
    /// Waiters, oldest first; a waiter that went away stays until it is skipped or pruned.
    lanes: Vec<VecDeque<oneshot::Sender<Turn>>>,
    /// The lane served first when the slot is next passed on.
    next: usize,
}

/// The bcrypt slot. Dropping it hands it to the next waiter, lane after lane.
pub struct Turn(Option<Arc<Lanes>>);

impl Lanes {
    pub fn new(lanes: usize) -> Arc<Lanes> {
        Arc::new(Lanes {
            state: Mutex::new(State {
                running: false,
                lanes: (0..lanes.max(1)).map(|_| VecDeque::new()).collect(),
                next: 0,
            }),
        })
    }

    /// The slot, at once if it is free, else after waiting in `lane`; `None` when that lane is
    /// full. Dropping the future gives up the place (and the slot, if it was just handed over).
    pub async fn turn(self: &Arc<Self>, lane: usize) -> Option<Turn> {
        let waiting = {
            let mut st = self.lock();
            if !st.running {
                st.running = true;
                return Some(Turn(Some(self.clone())));
            }
            let last = st.lanes.len() - 1;
            let queue = &mut st.lanes[lane.min(last)];
            queue.retain(|w| !w.is_closed());
            if queue.len() >= LANE {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            queue.push_back(tx);
            rx
        };
        waiting.await.ok()
    }

    /// Checks waiting in `lane` (their clients may have gone away).
    #[cfg(test)]
    pub fn waiting(&self, lane: usize) -> usize {
        self.lock().lanes[lane].len()
    }

    fn pass_on(self: Arc<Self>) {
        let mut st = self.lock();
        while let Some(next) = st.next_waiter() {
            match next.send(Turn(Some(self.clone()))) {
                Ok(()) => return,
                // Its client went away: the turn is not dropped here (that would lock again).
                Err(mut refused) => refused.0 = None,
            }
        }
        st.running = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The oldest live waiter of the first lane with one, from `next` round the lanes.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<Turn>> {
        let n = self.lanes.len();
        for i in 0..n {
            let lane = (self.next + i) % n;
            while let Some(w) = self.lanes[lane].pop_front() {
                if !w.is_closed() {
                    self.next = (lane + 1) % n;
                    return Some(w);
                }
            }
        }
        None
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(lanes) = self.0.take() {
            lanes.pass_on();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spawn a check in `lane` that records its name when it gets the slot, and wait until it is
    /// queued.
    async fn queue(
        lanes: &Arc<Lanes>,
        lane: usize,
        name: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<()> {
        let before = lanes.waiting(lane);
        let (l, o) = (lanes.clone(), order.clone());
        let h = tokio::spawn(async move {
            let _turn = l.turn(lane).await.expect("a place in the lane");
            o.lock().unwrap().push(name);
        });
        while lanes.waiting(lane) == before {
            tokio::task::yield_now().await;
        }
        h
    }

    #[tokio::test]
    async fn a_full_lane_refuses_only_itself_and_the_slot_goes_round_the_lanes() {
        let lanes = Lanes::new(3);
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = lanes.turn(0).await.unwrap();
        let mut checks = Vec::new();
        for name in ["a1", "a2", "a3", "a4"] {
            checks.push(queue(&lanes, 0, name, &order).await);
        }
        assert!(lanes.turn(0).await.is_none(), "lane 0 is full");
        checks.push(queue(&lanes, 1, "b1", &order).await);
        checks.push(queue(&lanes, 2, "unknown1", &order).await);
        checks.push(queue(&lanes, 1, "b2", &order).await);
        drop(held);
        for c in checks {
            c.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["a1", "b1", "unknown1", "a2", "b2", "a3", "a4"]
        );
        // The slot is free again: taken at once.
        assert!(lanes.turn(0).await.is_some());
    }

    #[tokio::test]
    async fn a_waiter_that_went_away_neither_holds_its_place_nor_the_slot() {
        let lanes = Lanes::new(2);
        let held = lanes.turn(0).await.unwrap();
        let gone: Vec<_> = (0..LANE)
            .map(|_| {
                let l = lanes.clone();
                tokio::spawn(async move { l.turn(0).await.is_some() })
            })
            .collect();
        while lanes.waiting(0) < LANE {
            tokio::task::yield_now().await;
        }
        for g in gone {
            g.abort();
            let _ = g.await;
        }
        // Their places are free again, and the slot passes over them.
        let next = {
            let l = lanes.clone();
            tokio::spawn(async move { l.turn(0).await.is_some() })
        };
        while lanes.waiting(0) != 1 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert!(next.await.unwrap());
        assert!(lanes.turn(1).await.is_some());
    }
}
