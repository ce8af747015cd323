//! Gives the heap memory the allocator holds free back to the operating
//! system, after work that allocated a lot and freed it (opening a large
//! sled store, `jitbot run`'s start-up checks).
//!
//! glibc returns freed memory to the system only from the top of its heap
//! (and from whole mappings); chunks freed below live ones stay in the
//! process's RSS for good. `malloc_trim(0)` releases every free page, at
//! any place in the heap, with `madvise`. This is the only `unsafe` code
//! in jitbot: a foreign call, so it lives in its own crate and `jitbot`
//! and `jitbot-core` keep `forbid(unsafe_code)`.

/// Returns the free pages of the heap to the operating system. On a
/// platform without glibc it does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes no pointer and touches only the
    // allocator's own free lists, under the allocator's locks; it is safe
    // to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
