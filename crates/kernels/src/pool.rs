//! A persistent thread pool for the decode kernels, whose workers spin between jobs.
//!
//! One decoded token runs a few hundred matrix-vector products of 10–500 µs each. Handing
//! each to rayon costs a futex wake-up of a sleeping worker per product, tens of µs in a
//! VM: on two cores, splitting a product in two was measured *slower* than one thread. Here
//! the workers stay awake between products (spinning, then yielding the core for a few
//! milliseconds, then sleeping), every job is split statically into one part per thread, and
//! the caller computes part 0 itself, as llama.cpp's graph threads do.

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps the core before sleeping: longer than the gaps between
/// one token's products, short enough not to burn a core once decoding stops.
const STAY_AWAKE: Duration = Duration::from_millis(5);
/// Busy-wait rounds before an idle worker starts yielding the core to other threads.
const SPIN_ROUNDS: u32 = 1 << 14;

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; workers run the job when it changes.
    epoch: AtomicU64,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    /// Set while a job runs; read by workers only between the epoch bump and `pending`'s
    /// reaching 0, during which the caller keeps the job alive and does not change it.
    job: UnsafeCell<Option<Job>>,
    panicked: AtomicBool,
    /// Set when the pool is dropped: workers return instead of waiting for a job.
    shutdown: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the caller holding `SpinPool::caller` while no worker
// reads it (see the field's comment); everything else is atomic or locked.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct SpinPool {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    threads: usize,
    /// One job at a time (tests run in parallel and may share the global pool).
    caller: Mutex<()>,
}

impl SpinPool {
    /// A pool of `threads` including the caller (`threads − 1` workers are spawned).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..threads)
            .map(|index| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("recoup-kernel-{index}"))
                    .spawn(move || worker(&shared, index))
                    .expect("spawning a kernel thread")
            })
            .collect();
        Self {
            shared,
            workers,
            threads,
            caller: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(i)` for every `i < threads()`, part 0 on the calling thread, and returns
    /// when all parts have finished. A panic in any part is raised here.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            return job(0);
        }
        let _one_at_a_time = self.caller.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: no worker reads `job` now (the previous job's `pending` reached 0), and
        // this function does not return before every worker is done with it, so erasing
        // the borrow's lifetime is sound.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job));
        }
        s.pending.store(self.threads - 1, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _lock = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        while s.pending.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        // Cleared whichever part panicked, so a worker's panic does not fail the next job.
        let worker_panicked = s.panicked.swap(false, SeqCst);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if worker_panicked {
            panic!("a kernel thread panicked");
        }
    }
}

impl Drop for SpinPool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.shutdown.store(true, SeqCst);
        drop(s.sleep.lock().unwrap_or_else(|e| e.into_inner()));
        s.wake.notify_all();
        for w in self.workers.drain(..) {
            // A worker's panics were caught per job; joining only waits for it to return.
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared, index: usize) {
    let mut seen = 0;
    loop {
        let idle_since = Instant::now();
        let mut rounds = 0u32;
        loop {
            if s.shutdown.load(SeqCst) {
                return;
            }
            let epoch = s.epoch.load(SeqCst);
            if epoch != seen {
                seen = epoch;
                break;
            }
            rounds = rounds.saturating_add(1);
            if rounds < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else if idle_since.elapsed() < STAY_AWAKE {
                std::thread::yield_now();
            } else {
                let mut lock = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen && !s.shutdown.load(SeqCst) {
                    lock = s.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
            }
        }
        // SAFETY: the epoch changed, so `job` holds the live job (see `Shared::job`).
        let job = unsafe { (*s.job.get()).expect("a job with the new epoch") };
        // SAFETY: the caller keeps the job alive until `pending` reaches 0.
        if catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(index) })).is_err() {
            s.panicked.store(true, SeqCst);
        }
        s.pending.fetch_sub(1, SeqCst);
    }
}

/// The process-wide pool, as many threads as rayon's global pool (`--threads`).
pub fn global() -> &'static SpinPool {
    static POOL: OnceLock<SpinPool> = OnceLock::new();
    POOL.get_or_init(|| SpinPool::new(rayon::current_num_threads()))
}

/// Rows `[start, end)` of part `part` when `rows` are split into `parts` nearly equal
/// ranges whose boundaries fall on multiples of `align`.
pub fn part_range(rows: usize, parts: usize, part: usize, align: usize) -> (usize, usize) {
    let units = rows.div_ceil(align);
    let bound = |p: usize| (units * p / parts * align).min(rows);
    (bound(part), bound(part + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_and_ranges_tile_the_rows() {
        let pool = SpinPool::new(3);
        for _ in 0..100 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
        }
        for (rows, parts, align) in [(4864, 2, 8), (7, 3, 4), (1, 4, 1), (576, 2, 16)] {
            let mut next = 0;
            for p in 0..parts {
                let (a, b) = part_range(rows, parts, p, align);
                assert_eq!(a, next);
                assert!(b >= a && (b == rows || b % align == 0));
                next = b;
            }
            assert_eq!(next, rows);
        }
    }

    #[test]
    fn a_panicking_part_is_raised_to_the_caller_and_the_pool_survives() {
        let pool = SpinPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i| assert!(i == 0, "part {i} fails"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 2);
        // Every part panicking: the caller's panic is raised, and the next job runs clean.
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(&|i| panic!("part {i} fails"))));
        assert!(r.is_err());
        pool.run(&|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 4);
    }

    #[test]
    fn dropping_the_pool_stops_its_workers_awake_or_asleep() {
        // Dropped while the workers spin, and after they have gone to sleep; `drop` joins
        // them, so a worker that missed the shutdown would hang this test.
        drop(SpinPool::new(3));
        let pool = SpinPool::new(3);
        pool.run(&|_| {});
        std::thread::sleep(STAY_AWAKE * 3);
        drop(pool);
    }
}
