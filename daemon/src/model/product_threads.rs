//! Threads for our matrix products (`block_matrix.rs`) that stay awake between them.
//!
//! A decode step makes over a hundred products of a few tens of microseconds each, with tract's
//! other operators between them. Handing one to a rayon pool from the decoding thread costs
//! about as much as the product (the caller, outside the pool, sleeps on a lock until the job is
//! done, and is woken by a system call): measured here, a 2048 x 640 product took 24 us on one
//! thread and 39 us on two. These helpers instead spin for a while after each job, watching a
//! counter, so that the next one starts within a fraction of a microsecond, and sleep only when
//! no job has come for a while (`WATCH_BEFORE_SLEEP`): an idle daemon does not burn its CPU.
//! llama.cpp's threads wait for work the same way.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// Checks of the job counter, a few microseconds' worth, before a helper starts yielding its
/// core between checks: tract's own pool threads may want it.
const SPINS_BEFORE_YIELDING: u32 = 1 << 12;
/// How long a helper watches for the next job, since its last, before it sleeps.
const WATCH_BEFORE_SLEEP: Duration = Duration::from_millis(2);

/// A job: the caller's closure, its lifetime erased (see `run`).
type Job = dyn Fn() + Sync;

/// Bits of `Shared::state` that hold the helpers a job asks for; the rest count the jobs.
const HELPER_BITS: u32 = 8;

struct Shared {
    /// The job count, bumped for each job, and the helpers the job asks for, in one word so
    /// that a helper reads both of the same job: helpers watch it.
    state: AtomicUsize,
    /// The current job, valid while `pending` is above zero.
    job: AtomicPtr<&'static Job>,
    /// Helpers still running the current job.
    pending: AtomicUsize,
    /// A helper's job panicked.
    panicked: AtomicBool,
    /// Helpers asleep, under the lock the condition variable wakes them with.
    sleeping: Mutex<usize>,
    wake: Condvar,
}

/// The helpers (started on demand) and the lock that lets one caller at a time use them.
struct Helpers {
    shared: Arc<Shared>,
    started: Mutex<usize>,
}

fn helpers() -> &'static Helpers {
    static HELPERS: OnceLock<Helpers> = OnceLock::new();
    HELPERS.get_or_init(|| Helpers {
        shared: Arc::new(Shared {
            state: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
        }),
        started: Mutex::new(0),
    })
}

/// Runs `work` on the calling thread and on `threads - 1` helpers at once, and returns when all
/// have returned. Where another caller holds the helpers (tests run side by side), or helper
/// threads cannot be started, the calling thread runs `work` alone: every caller's `work`
/// shares its task out, so one thread does the whole of it.
pub fn run(threads: usize, work: &(dyn Fn() + Sync)) {
    let helpers = helpers();
    let wanted = threads.saturating_sub(1).min((1 << HELPER_BITS) - 1);
    let mut started = match helpers.started.try_lock() {
        Ok(started) => started,
        // A panic in an earlier product unwound through `run`; the count is still right.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return work(),
    };
    while *started < wanted {
        let shared = helpers.shared.clone();
        let index = *started;
        // Read here, not by the new thread: it may first look after this call's job is out.
        let seen = shared.state.load(Ordering::Acquire);
        let spawned = std::thread::Builder::new()
            .name(format!("outpost-product-{index}"))
            .spawn(move || help(&shared, index, seen));
        if spawned.is_err() {
            break;
        }
        *started += 1;
    }
    let shared = &helpers.shared;
    let wanted = wanted.min(*started);
    if wanted == 0 {
        return work();
    }
    // SAFETY: the job is only used until `pending` is back to zero, and this function does not
    // return (nor unwind) before that: `WaitForHelpers` waits on drop.
    let job: &'static Job = unsafe { std::mem::transmute::<&(dyn Fn() + Sync), &'static Job>(work) };
    let job = Box::new(job);
    // Left set where the caller's own part panicked as well.
    shared.panicked.store(false, Ordering::Relaxed);
    shared.job.store(Box::into_raw(job), Ordering::Relaxed);
    shared.pending.store(wanted, Ordering::Relaxed);
    let next = (shared.state.load(Ordering::Relaxed) >> HELPER_BITS).wrapping_add(1);
    shared.state.store((next << HELPER_BITS) | wanted, Ordering::SeqCst);
    if *lock(&shared.sleeping) > 0 {
        shared.wake.notify_all();
    }
    let waiting = WaitForHelpers(shared);
    work();
    drop(waiting);
    if shared.panicked.swap(false, Ordering::Relaxed) {
        panic!("a matrix product panicked on a helper thread");
    }
    drop(started);
}

/// Waits until the helpers are done with the current job, then frees it.
struct WaitForHelpers<'a>(&'a Shared);

impl Drop for WaitForHelpers<'_> {
    fn drop(&mut self) {
        let mut spins = 0;
        while self.0.pending.load(Ordering::Acquire) > 0 {
            // A helper the system has put off may be waiting for this very core.
            match spins < SPINS_BEFORE_YIELDING {
                true => std::hint::spin_loop(),
                false => std::thread::yield_now(),
            }
            spins += 1;
        }
        let job = self.0.job.swap(std::ptr::null_mut(), Ordering::Relaxed);
        // SAFETY: made by `Box::into_raw` in `run`, and no helper holds it any more.
        drop(unsafe { Box::from_raw(job) });
    }
}

/// A helper's loop: wait for a job, run it if it asks for this helper, say it is done.
fn help(shared: &Shared, index: usize, mut seen: usize) {
    loop {
        let mut spins = 0;
        let watching = Instant::now();
        let state = loop {
            let state = shared.state.load(Ordering::Acquire);
            if state != seen {
                break state;
            }
            if spins < SPINS_BEFORE_YIELDING {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            if watching.elapsed() < WATCH_BEFORE_SLEEP {
                std::thread::yield_now();
                continue;
            }
            let mut sleeping = lock(&shared.sleeping);
            *sleeping += 1;
            while shared.state.load(Ordering::SeqCst) == seen {
                sleeping = shared.wake.wait(sleeping).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            *sleeping -= 1;
        };
        seen = state;
        if index >= state & ((1 << HELPER_BITS) - 1) {
            continue;
        }
        // SAFETY: set before the state changed, and kept until `pending` is zero,
        // which this helper's share holds above zero until it has finished.
        let job: &Job = unsafe { *shared.job.load(Ordering::Relaxed) };
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_the_work_once_per_call() {
        for threads in [1, 2, 3, 1, 4] {
            for _ in 0..200 {
                let runs = AtomicUsize::new(0);
                let distinct = Mutex::new(std::collections::HashSet::new());
                run(threads, &|| {
                    runs.fetch_add(1, Ordering::Relaxed);
                    lock(&distinct).insert(std::thread::current().id());
                });
                // Another test holding the helpers makes the caller run alone.
                let runs = runs.into_inner();
                assert!(runs == threads || runs == 1, "{threads} threads ran the work {runs} times");
                assert_eq!(lock(&distinct).len(), runs);
            }
        }
    }

    #[test]
    fn a_product_that_panics_leaves_the_helpers_working() {
        let caught = std::panic::catch_unwind(|| run(2, &|| panic!("a product's bug")));
        assert!(caught.is_err());
        // The helpers are still shared out afterwards (unless another test holds them now: the
        // tries go on for a while, pausing between them, so that it lets go).
        let mut ran_on_two = false;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !ran_on_two && std::time::Instant::now() < deadline {
            let runs = AtomicUsize::new(0);
            run(2, &|| {
                runs.fetch_add(1, Ordering::Relaxed);
            });
            ran_on_two = runs.into_inner() == 2;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(ran_on_two, "after a panic every product ran on one thread");
    }

    #[test]
    fn helpers_that_slept_wake_for_the_next_job() {
        let runs = AtomicUsize::new(0);
        run(2, &|| {
            runs.fetch_add(1, Ordering::Relaxed);
        });
        // Long enough for every spin to run out.
        std::thread::sleep(std::time::Duration::from_millis(300));
        run(2, &|| {
            runs.fetch_add(1, Ordering::Relaxed);
        });
        assert!(runs.into_inner() >= 2);
    }
}
