//! A counting global allocator, for tests that prove a path allocates nothing per I/O: a test
//! binary installs [`CountingAlloc`] as its `#[global_allocator]`, runs the path a few times and
//! many times, and compares [`allocations`] across the two windows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts allocations (alloc, alloc_zeroed, realloc) of the whole process; everything else is
/// the system allocator's.
#[derive(Debug)]
pub struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

/// Allocations so far in this process (0 unless [`CountingAlloc`] is the global allocator).
pub fn allocations() -> u64 {
    ALLOCS.load(Ordering::SeqCst)
}

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged;
// counting is a relaxed atomic add with no other effect.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds alloc's contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds alloc_zeroed's contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds realloc's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; the caller upholds dealloc's contract.
        unsafe { System.dealloc(ptr, layout) }
    }
}
