//! The CPU allocator settings, in a test process of their own: they change
//! glibc's settings for the whole process, and the check reads glibc's
//! process-wide counters, so no other test may allocate beside it.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use pretext::ml::allocator::{keep_freed_tensor_memory, AllocatorTuning};

/// Bytes glibc holds in `mmap`ed blocks, outside its heaps.
fn mmapped_bytes() -> usize {
    // SAFETY: mallinfo2 only reads glibc's counters.
    unsafe { libc::mallinfo2() }.hblkhd
}

#[test]
fn a_48_mib_tensor_buffer_comes_from_the_heap_not_its_own_mapping() {
    match keep_freed_tensor_memory() {
        AllocatorTuning::Applied => {}
        // The environment chose the settings itself; glibc follows those.
        AllocatorTuning::LeftToEnvironment => return,
        AllocatorTuning::Unavailable => panic!("glibc refused the malloc settings"),
    }
    let before = mmapped_bytes();
    let block = vec![1u8; 48 << 20];
    let during = mmapped_bytes();
    assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 48 << 20);
    drop(block);
    // glibc's defaults serve any block above 32 MiB from its own mapping.
    assert!(
        during < before + (48 << 20),
        "a 48 MiB block was mmapped: {before} -> {during} bytes"
    );
}
