//! [`CacheAligned`]: a global allocator that starts every large block on a cache line.
//!
//! The engine's activations are plain `Vec<f32>`s, and the kernels read and write them in
//! rows of whole vectors: a row of 16 floats (64 bytes, one AVX-512 vector or two AVX2 ones)
//! is one cache line only where the buffer starts on one. The system allocator starts its
//! large blocks 16 bytes past a line (glibc's `mmap`'d chunks), so every such row straddles
//! two lines: two accesses for one load, and a third line touched by each stored tile row.
//!
//! The `vit` binary installs it; a program using the library opts in with
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: vitrs::alloc::CacheAligned = vitrs::alloc::CacheAligned;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of at least this many bytes are aligned to [`LINE`].
pub const LARGE: usize = 4096;

/// A cache line, in bytes.
pub const LINE: usize = 64;

/// The system allocator, with blocks of at least [`LARGE`] bytes aligned to a cache line
/// ([`LINE`]); smaller ones as the system gives them.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheAligned;

/// The layout actually asked of the system for `l`.
fn line_aligned(l: Layout) -> Layout {
    if l.size() >= LARGE && l.align() < LINE {
        // A power of two no smaller than the old alignment, and the size is unchanged: valid.
        Layout::from_size_align(l.size(), LINE).unwrap_or(l)
    } else {
        l
    }
}

// SAFETY: every call is forwarded to `System` with the layout `line_aligned` gives, the same
// for a block's allocation, reallocation and release (it depends on the size and alignment
// the caller passes, which the contract makes the block's); a block moving across `LARGE` is
// reallocated by hand (new block, copy, free the old one).
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(line_aligned(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(line_aligned(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, line_aligned(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = line_aligned(layout);
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = line_aligned(new);
        if old.align() == new.align() {
            return System.realloc(ptr, old, new_size);
        }
        let fresh = System.alloc(new);
        if !fresh.is_null() {
            std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
            System.dealloc(ptr, old);
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of `size` bytes holding a known pattern.
    unsafe fn filled(a: &CacheAligned, size: usize) -> *mut u8 {
        let p = a.alloc(Layout::from_size_align(size, 4).unwrap());
        assert!(!p.is_null());
        for i in 0..size {
            *p.add(i) = (i % 251) as u8;
        }
        p
    }

    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_contents_across_reallocation() {
        let a = CacheAligned;
        unsafe {
            for size in [LARGE - 4, LARGE, 3 * LARGE + 12, 1 << 22] {
                let p = filled(&a, size);
                assert!(
                    size < LARGE || (p as usize).is_multiple_of(LINE),
                    "{size} bytes"
                );
                a.dealloc(p, Layout::from_size_align(size, 4).unwrap());
                // Across the threshold both ways, and within it.
                for new_size in [size * 2, LARGE / 2, size + 4] {
                    let p = filled(&a, size);
                    let l = Layout::from_size_align(size, 4).unwrap();
                    let q = a.realloc(p, l, new_size);
                    assert!(!q.is_null());
                    assert!(
                        new_size < LARGE || (q as usize).is_multiple_of(LINE),
                        "{size} -> {new_size}"
                    );
                    for i in 0..size.min(new_size) {
                        assert_eq!(*q.add(i), (i % 251) as u8, "{size} -> {new_size}: byte {i}");
                    }
                    a.dealloc(q, Layout::from_size_align(new_size, 4).unwrap());
                }
                let l = Layout::from_size_align(size, 4).unwrap();
                let z = a.alloc_zeroed(l);
                assert!((0..size).all(|i| *z.add(i) == 0));
                a.dealloc(z, l);
            }
        }
    }
}
