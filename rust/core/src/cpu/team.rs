//! A low-latency team for the kernels: the calling thread plus persistent helper threads that
//! spin for a while after each job before they sleep.
//!
//! Why not the rayon pool (which the quantizer uses): a pool dispatch blocks the caller on a
//! latch, so every call pays a sleep and a wake-up of the caller (and of the workers when they
//! have gone to sleep between calls): 10-30 us per call on the 2-core VM, as much as a whole
//! mat-vec of SmolLM2's layers (576 x 1536 int8: ~35 us on one core). Here the caller starts
//! on the tasks at once, helpers that are spinning join within a fraction of a microsecond
//! (sleeping ones when they wake; by then the caller may have done everything), and the
//! caller waits only for the tasks that helpers have already started, spinning.
//!
//! Protocol (one job at a time; a second caller that finds the team busy is told so and uses
//! the pool instead): the caller publishes the job, opens it (`state` = OPEN), bumps `seq` and
//! unparks sleeping helpers; a helper that sees a new `seq` joins by incrementing the joined
//! count in `state` while OPEN is set (and fewer than the job's helper limit have joined), takes
//! tasks from the job's counter, then increments `finished`. The caller takes tasks too, then
//! closes the job (clears OPEN, reading how many joined) and spins until that many have
//! finished; only then does the job (on the caller's stack) go away. A helper that did not join
//! never touches the job.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper spins for the next job before it sleeps. Long enough to stay awake
/// across the gaps between the mat-vecs of a model's forward pass (tens of microseconds of
/// Python and numpy), short enough that an idle team costs nothing measurable.
const SPIN: Duration = Duration::from_micros(300);
/// `state`: bit 0 = open, the rest = helpers joined.
const OPEN: usize = 1;

struct Job {
    /// The caller's task function; really borrowed for the job's lifetime (see `run`).
    task: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
}

struct Shared {
    seq: AtomicUsize,
    job: AtomicPtr<Job>,
    state: AtomicUsize,
    /// Helpers allowed to join the open job (set before it opens; helpers read it without
    /// touching the job itself).
    limit: AtomicUsize,
    finished: AtomicUsize,
    /// A task panicked on a helper (the kernels do not panic; this keeps a bug from hanging
    /// the caller).
    panicked: AtomicBool,
}

struct Helper {
    thread: Thread,
    sleeping: AtomicBool,
}

struct Team {
    shared: &'static Shared,
    helpers: Mutex<Vec<&'static Helper>>,
    /// Held by the one caller whose job the team runs.
    busy: Mutex<()>,
}

static TEAM: OnceLock<Team> = OnceLock::new();

fn team() -> &'static Team {
    TEAM.get_or_init(|| Team {
        shared: Box::leak(Box::new(Shared {
            seq: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            state: AtomicUsize::new(0),
            limit: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        })),
        helpers: Mutex::new(Vec::new()),
        busy: Mutex::new(()),
    })
}

fn helper_loop(shared: &'static Shared, me: &'static Helper) {
    let mut seen = shared.seq.load(Ordering::Acquire);
    loop {
        // Wait for a new job: spin, then sleep.
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let s = shared.seq.load(Ordering::Acquire);
            if s != seen {
                seen = s;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                if since.elapsed() > SPIN {
                    me.sleeping.store(true, Ordering::SeqCst);
                    if shared.seq.load(Ordering::SeqCst) == seen {
                        std::thread::park();
                    }
                    me.sleeping.store(false, Ordering::SeqCst);
                    since = Instant::now();
                    continue;
                }
                // Let other threads that want this core run (e.g. numpy's BLAS workers
                // between our calls): it returns at once when none does.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        // Join if the job is still open and has room.
        let mut st = shared.state.load(Ordering::Acquire);
        let joined = loop {
            if st & OPEN == 0 {
                break false;
            }
            if st >> 1 >= shared.limit.load(Ordering::Acquire) {
                break false;
            }
            match shared.state.compare_exchange_weak(st, st + 2, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break true,
                Err(now) => st = now,
            }
        };
        if !joined {
            continue;
        }
        // SAFETY: joined while open: the job stays alive until `finished` counts this helper.
        let job = unsafe { &*shared.job.load(Ordering::Acquire) };
        let ok = catch_unwind(AssertUnwindSafe(|| take_tasks(job))).is_ok();
        if !ok {
            shared.panicked.store(true, Ordering::Release);
        }
        shared.finished.fetch_add(1, Ordering::Release);
    }
}

fn take_tasks(job: &Job) {
    loop {
        let t = job.next.fetch_add(1, Ordering::Relaxed);
        if t >= job.n {
            break;
        }
        // SAFETY: `task` points to the caller's closure, alive for the whole job (see `run`).
        unsafe { (*job.task)(t) };
    }
}

/// Closes the job and waits for the helpers that joined it, also when the caller's own tasks
/// unwind (the job must outlive every helper that uses it).
struct CloseGuard(&'static Shared);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let joined = self.0.state.swap(0, Ordering::AcqRel) >> 1;
        let mut spins = 0u32;
        while self.0.finished.load(Ordering::Acquire) < joined {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) {
                // A helper that joined may have lost its core: let it run.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        self.0.job.store(std::ptr::null_mut(), Ordering::Release);
    }
}

/// Runs `task(t)` for every `t` in `0..n` on the calling thread and up to `threads - 1`
/// helpers. Returns `false` without running anything if the team is busy with another
/// caller's job (the caller then uses the pool).
pub(crate) fn run(n: usize, threads: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    let t = team();
    let _busy = match t.busy.try_lock() {
        Ok(g) => g,
        // (a task that panicked poisons it; the team itself is still consistent)
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return false,
    };
    let want = threads.saturating_sub(1).min(n.saturating_sub(1));
    let helpers: Vec<&'static Helper> = {
        let mut hs = t.helpers.lock().unwrap_or_else(|e| e.into_inner());
        while hs.len() < want {
            let shared = t.shared;
            let slot: &'static OnceLock<&'static Helper> = Box::leak(Box::new(OnceLock::new()));
            let spawned = std::thread::Builder::new()
                .name(format!("predprey-k{}", hs.len()))
                .spawn(move || {
                    let me: &'static Helper = Box::leak(Box::new(Helper { thread: std::thread::current(), sleeping: AtomicBool::new(false) }));
                    let _ = slot.set(me);
                    helper_loop(shared, me);
                });
            if spawned.is_err() {
                break;
            }
            let me = loop {
                if let Some(h) = slot.get() {
                    break *h;
                }
                std::thread::yield_now();
            };
            hs.push(me);
        }
        hs.clone()
    };
    let s = t.shared;
    let limit = want.min(helpers.len());
    // SAFETY (of this lifetime extension and every later dereference): the job is closed and
    // every helper that joined has finished before `run` returns or unwinds (`CloseGuard`),
    // and helpers that did not join never dereference it; so `task` outlives every use.
    let task: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task as *const (dyn Fn(usize) + Sync + '_)) };
    let job = Job { task, n, next: AtomicUsize::new(0) };
    s.job.store(&job as *const Job as *mut Job, Ordering::Release);
    s.finished.store(0, Ordering::Relaxed);
    s.limit.store(limit, Ordering::Release);
    s.state.store(OPEN, Ordering::Release);
    let guard = CloseGuard(s);
    s.seq.fetch_add(1, Ordering::SeqCst);
    for h in helpers.iter().take(limit) {
        if h.sleeping.load(Ordering::SeqCst) {
            h.thread.unpark();
        }
    }
    take_tasks(&job);
    drop(guard);
    if s.panicked.swap(false, Ordering::AcqRel) {
        panic!("a kernel task panicked on a helper thread");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::run;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every task runs exactly once, for many job sizes and thread counts, with several callers
    /// at once (those that find the team busy run the tasks themselves, as the kernels fall
    /// back to the pool).
    #[test]
    fn every_task_runs_exactly_once() {
        let callers: Vec<_> = (0..3)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut busy = 0;
                    for round in 0..400 {
                        let n = 1 + (round * 7 + c * 13) % 40;
                        let threads = 1 + (round + c) % 4;
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        let task = |t: usize| {
                            hits[t].fetch_add(1, Ordering::Relaxed);
                        };
                        if !run(n, threads, &task) {
                            busy += 1;
                            (0..n).for_each(task);
                        }
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}, threads = {threads}");
                        if round % 50 == 0 {
                            // let the helpers go to sleep now and then, so wake-ups are tested
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    }
                    busy
                })
            })
            .collect();
        let busy: usize = callers.into_iter().map(|h| h.join().unwrap()).sum();
        // (not asserted: other tests of the crate use the team at the same time)
        println!("{busy} of 1200 calls found the team busy");
    }

    /// A panicking task makes `run` panic (it neither hangs nor returns), and the team works after.
    #[test]
    fn a_panicking_task_panics_the_caller() {
        for bad in [0usize, 5, 63] {
            let r = std::panic::catch_unwind(|| {
                let slow = |t: usize| {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    assert!(t != bad, "task {t} fails on purpose");
                };
                while !run(64, 2, &slow) {}
            });
            assert!(r.is_err(), "task {bad} panicked, run did not");
        }
        let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
        let task = |t: usize| {
            hits[t].fetch_add(1, Ordering::Relaxed);
        };
        while !run(64, 2, &task) {}
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
