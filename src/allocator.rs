//! Handing memory back to the system after a burst.
//!
//! The node's memory per connection is measured after bursts (a reconnect
//! storm, thousands of binds through another node, a push to every uid),
//! and what a burst freed must not stay resident. mimalloc keeps freed
//! memory in two ways that matter here: it purges a free page after a
//! delay, and a block freed by another thread than the one that allocated
//! it (a pub/sub message read on a tokio worker and dropped by the
//! dispatcher, a frame encoded by the dispatcher and dropped by a
//! connection task) waits on its page until the owning thread collects.
//! A thread that goes idle after a burst never does, so its pages stay
//! resident: ~1.3 KiB per connection after 10,000 remote binds
//! (docs/benchmarks.md). So purges come soon (100 ms) and need not cover
//! a whole huge page, and every thread that allocates on the hot paths
//! collects its heap when it goes idle, at most every [`COLLECT_EVERY`]:
//! a collection also purges whatever has waited past the delay.
//!
//! With the `system-alloc` feature (glibc's allocator, for heap
//! profilers) all of this does nothing.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Least time between two collections on one thread: a collection visits
/// every page of the thread's heap (tens of µs), and a busy worker parks
/// thousands of times a second.
pub const COLLECT_EVERY: Duration = Duration::from_millis(100);

thread_local! {
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets the allocator's options; call before anything allocates much.
/// `MIMALLOC_PURGE_DELAY` and `MIMALLOC_ALLOW_THP` in the environment
/// still win.
pub fn tune() {
    #[cfg(not(feature = "system-alloc"))]
    {
        // Indices in mimalloc 3's `mi_option_e` (the crate's bindings
        // predate the names): `mi_option_purge_delay`, `mi_option_allow_thp`.
        const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        const ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
        let set = |env: &str, option, value| {
            if std::env::var_os(env).is_none() {
                // SAFETY: setting an option has no preconditions; mimalloc
                // reads these each time it considers a purge.
                unsafe { libmimalloc_sys::mi_option_set(option, value) };
            }
        };
        // 100 ms, not mimalloc's 1 s (memory a burst freed stayed: ~1 KiB
        // a connection) nor 0 (a page freed and needed again within a
        // burst was faulted in again: ~8 % more CPU per delivery in a
        // broadcast, in page clearing and TLB shootdowns). The idle
        // workers' collections purge what waited past it.
        set("MIMALLOC_PURGE_DELAY", PURGE_DELAY, 100);
        // With transparent huge pages allowed, mimalloc purges only whole
        // 2 MiB ranges: one live object keeps its 2 MiB resident. Measured
        // after 5,000 binds through another node: 1.9-2.3 KiB per
        // connection with them, 1.7 without (docs/benchmarks.md).
        set("MIMALLOC_ALLOW_THP", ALLOW_THP, 0);
    }
}

/// Collects this thread's heap unless it did less than [`COLLECT_EVERY`]
/// ago: for tokio's `on_thread_park` and for threads of our own when they
/// run out of work.
pub fn collect_if_due() {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < COLLECT_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        collect();
    }
}

/// Frees what this thread's heap holds unused: blocks other threads freed
/// and pages left empty.
pub fn collect() {
    #[cfg(not(feature = "system-alloc"))]
    // SAFETY: mi_collect works on the calling thread's own heap and has
    // no preconditions.
    unsafe {
        libmimalloc_sys::mi_collect(false)
    };
}
