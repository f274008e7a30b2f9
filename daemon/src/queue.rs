//! A bounded queue between a source thread and a gate thread, with the two ways a full queue can
//! be handled: frames drop the oldest (a gate that falls behind should see the present, not the
//! past) and count it; audio waits for room, so no sound is ever lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub struct BoundedQueue<T> {
    capacity: usize,
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
    dropped: AtomicU64,
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

/// What [`BoundedQueue::pop_timeout`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop<T> {
    Item(T),
    TimedOut,
    /// Closed and drained: nothing more will come.
    Closed,
}

impl<T> BoundedQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            state: Mutex::new(State { items: VecDeque::with_capacity(capacity), closed: false }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds `item`, dropping the oldest one if the queue is full. Returns false, and keeps
    /// nothing, once the queue is closed.
    pub fn push_drop_oldest(&self, item: T) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        if state.items.len() >= self.capacity {
            state.items.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        state.items.push_back(item);
        drop(state);
        self.not_empty.notify_one();
        true
    }

    /// Adds `item`, waiting for room if the queue is full. Returns false, and keeps nothing, once
    /// the queue is closed.
    pub fn push_wait(&self, item: T) -> bool {
        let state = self.lock();
        let mut state = self
            .not_full
            .wait_while(state, |s| s.items.len() >= self.capacity && !s.closed)
            .unwrap_or_else(PoisonError::into_inner);
        if state.closed {
            return false;
        }
        state.items.push_back(item);
        drop(state);
        self.not_empty.notify_one();
        true
    }

    /// Waits up to `timeout` for the oldest item.
    pub fn pop_timeout(&self, timeout: Duration) -> Pop<T> {
        let state = self.lock();
        let (mut state, _) = self
            .not_empty
            .wait_timeout_while(state, timeout, |s| s.items.is_empty() && !s.closed)
            .unwrap_or_else(PoisonError::into_inner);
        match state.items.pop_front() {
            Some(item) => {
                drop(state);
                self.not_full.notify_one();
                Pop::Item(item)
            }
            None if state.closed => Pop::Closed,
            None => Pop::TimedOut,
        }
    }

    /// No more pushes; what is queued can still be popped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Items dropped so far to make room for newer ones.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the deque half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn full_queue_drops_the_oldest_and_counts_it() {
        let queue = BoundedQueue::new(3);
        for i in 0..5 {
            assert!(queue.push_drop_oldest(i));
        }
        assert_eq!(queue.dropped(), 2);
        let drained: Vec<_> = std::iter::from_fn(|| match queue.pop_timeout(Duration::ZERO) {
            Pop::Item(i) => Some(i),
            _ => None,
        })
        .collect();
        assert_eq!(drained, vec![2, 3, 4]);
    }

    #[test]
    fn full_queue_makes_a_waiting_push_wait_for_room() {
        let queue = Arc::new(BoundedQueue::new(1));
        assert!(queue.push_wait(1));
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.push_wait(2))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(queue.len(), 1, "the second push waits");
        assert_eq!(queue.pop_timeout(Duration::ZERO), Pop::Item(1));
        assert!(producer.join().unwrap());
        assert_eq!(queue.pop_timeout(Duration::from_secs(5)), Pop::Item(2));
        assert_eq!(queue.dropped(), 0);
    }

    #[test]
    fn closing_releases_a_waiting_push() {
        let queue = Arc::new(BoundedQueue::new(1));
        queue.push_wait(1);
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.push_wait(2))
        };
        std::thread::sleep(Duration::from_millis(20));
        queue.close();
        assert!(!producer.join().unwrap());
    }

    #[test]
    fn closed_queue_drains_then_reports_closed() {
        let queue = BoundedQueue::new(2);
        queue.push_drop_oldest("a");
        queue.close();
        assert!(!queue.push_drop_oldest("b"));
        assert_eq!(queue.pop_timeout(Duration::ZERO), Pop::Item("a"));
        assert_eq!(queue.pop_timeout(Duration::from_secs(5)), Pop::Closed);
    }

    #[test]
    fn waiting_consumer_wakes_for_a_push_from_another_thread() {
        let queue = Arc::new(BoundedQueue::new(2));
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                queue.push_drop_oldest(7)
            })
        };
        assert_eq!(queue.pop_timeout(Duration::from_secs(5)), Pop::Item(7));
        assert!(producer.join().unwrap());
        assert_eq!(queue.pop_timeout(Duration::from_millis(10)), Pop::TimedOut);
    }
}
