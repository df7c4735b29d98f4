//! How LibTorch's CPU tensors get their memory. LibTorch allocates them with
//! the C library's `malloc`. With glibc's defaults, every block above 32 MiB
//! (a convnet's activations on a batch of tiles reach 48 MiB) is a fresh
//! `mmap`, unmapped when freed, and the heaps give freed memory back to the
//! kernel past 64 MiB: each training step then faults its activations in
//! again, tens of thousands of page faults a second.
//! [`keep_freed_tensor_memory`] tells glibc to keep that memory for reuse.

/// Free memory at the top of a heap that glibc keeps rather than returns.
pub const TRIM_THRESHOLD_BYTES: i32 = 1 << 30;

/// Extra memory glibc asks for whenever a heap grows. Without it, heaps grow
/// a block at a time and keep faulting pages in for the first minute of
/// training; address space reserved this way costs nothing until touched.
pub const TOP_PAD_BYTES: i32 = 256 << 20;

/// glibc's own variables for the same settings; when one is set, the
/// process's environment wins and nothing is changed.
const GLIBC_VARIABLES: [&str; 4] = [
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
];

/// What [`keep_freed_tensor_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    /// The settings above are in force.
    Applied,
    /// One of glibc's `MALLOC_*` variables for these settings was set.
    LeftToEnvironment,
    /// Not glibc, or glibc refused a value.
    Unavailable,
}

/// Keeps freed tensor memory in the process for the next step: blocks come
/// from glibc's heaps instead of their own mappings (a thread's heap holds
/// up to 64 MiB; larger blocks are still mapped on their own), a heap keeps
/// up to 1 GiB of free memory, and heaps grow 256 MiB at a time. The
/// resident size then stays near its peak between steps, as with the
/// jemalloc or tcmalloc that PyTorch's performance guide recommends. Call
/// once at start, before training.
pub fn keep_freed_tensor_memory() -> AllocatorTuning {
    if GLIBC_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        return AllocatorTuning::LeftToEnvironment;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> AllocatorTuning {
    // SAFETY: mallopt only changes glibc's allocation parameters; it is safe
    // to call at any time, from any thread.
    let applied = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
            && libc::mallopt(libc::M_TOP_PAD, TOP_PAD_BYTES) == 1
    };
    if applied {
        AllocatorTuning::Applied
    } else {
        AllocatorTuning::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> AllocatorTuning {
    AllocatorTuning::Unavailable
}
