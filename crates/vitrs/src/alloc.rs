//! [`CacheAligned`]: a global allocator that starts every large block on a cache line, and
//! asks for huge pages for the largest.
//!
//! The engine's activations are plain `Vec<f32>`s, and the kernels read and write them in
//! rows of whole vectors: a row of 16 floats (64 bytes, one AVX-512 vector or two AVX2 ones)
//! is one cache line only where the buffer starts on one. The system allocator starts its
//! large blocks 16 bytes past a line (glibc's `mmap`'d chunks), so every such row straddles
//! two lines: two accesses for one load, and a third line touched by each stored tile row.
//!
//! Blocks of 4 MiB or more (activations, gradients and packings of a training step or a large
//! batch, a model's parameters) are also advised into transparent huge pages as they are handed
//! out, before anything touches them: where Linux leaves huge pages to `madvise`, as most
//! distributions do, they would otherwise be 4 KiB pages, a TLB miss every few rows of a
//! product's operands. On an AVX-512 Xeon (2 threads, 8 interleaved rounds of whole
//! processes): the bench-train step +2.5 % on the tile unit and +4.7 % on the FMA kernel,
//! ViT-B/16 at batch 16 +10 %, ViT-Ti/16 at batch 16 +2.4 %, the fashion-mnist step +0.9 %;
//! peak memory unchanged. (A block grown past 4 MiB by reallocation keeps its pages.)
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
///
/// A large block is the system's block [`PAD`] bytes longer, its start moved up to the next line
/// with the system's pointer kept just before it, rather than an aligned request: `posix_memalign`
/// has no zeroed form, so `vec![0.0; n]` would be allocated and then written with zeros, every
/// page touched at once (ViT-B/16's `vit bench` at batch 1 took 4.1 s and 1.6 GiB instead of
/// 2.8 s and 0.9 GiB) and touched before a packed weight asks for huge pages. This way a zeroed
/// block is the system's `calloc`, whose fresh pages are zero and mapped lazily.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheAligned;

/// Bytes a large block asks beyond its size: room for the system's pointer and the move to a
/// line.
pub const PAD: usize = 2 * LINE;

/// Whether `l` is a large block (moved to a line); an alignment of a line or more is the
/// system's to give.
fn large(l: Layout) -> bool {
    l.size() >= LARGE && l.align() < LINE
}

/// The system's layout for a large block of `size` bytes.
fn system(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(PAD)?, 16).ok()
}

/// The line-aligned start inside the system's block `raw` (null stays null), with `raw` kept in
/// the word before it: at most `8 + 63` bytes in, so `size` bytes from it end inside the block.
///
/// # Safety
/// `raw` is null or a block of `size + PAD` bytes from the system, 8-byte aligned.
unsafe fn place(raw: *mut u8) -> *mut u8 {
    if raw.is_null() {
        return raw;
    }
    let start = (raw as usize + 8).next_multiple_of(LINE);
    let p = raw.add(start - raw as usize);
    (p as *mut usize).sub(1).write(raw as usize);
    p
}

/// The system's block behind a large block's start.
///
/// # Safety
/// `p` came from [`place`].
unsafe fn raw_of(p: *mut u8) -> *mut u8 {
    (p as *mut usize).sub(1).read() as *mut u8
}

/// A new block for `layout` from the system's `get` (`alloc` or `alloc_zeroed`): a small one as
/// it is, a large one [`PAD`] bytes longer with its start moved to a line ([`place`]).
///
/// # Safety
/// As [`GlobalAlloc::alloc`].
unsafe fn new_block(layout: Layout, get: unsafe fn(&System, Layout) -> *mut u8) -> *mut u8 {
    if !large(layout) {
        return get(&System, layout);
    }
    match system(layout.size()) {
        Some(l) => {
            let p = place(get(&System, l));
            if !p.is_null() {
                advise_range(p as usize, layout.size());
            }
            p
        }
        None => std::ptr::null_mut(),
    }
}

// SAFETY: small blocks go to `System` as they are. A large block (the same test on the layout
// at allocation, reallocation and release, which the contract makes the block's) is a system
// block of `size + PAD` bytes, 16-byte aligned, the caller's start moved up to a line inside it
// and the system's pointer kept in the word before that start; it is released and resized
// through that pointer. A block crossing `LARGE` is reallocated by hand (new block, copy, free
// the old one).
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        new_block(layout, <System as GlobalAlloc>::alloc)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // The word before the start is written, inside the padding: the block the caller sees
        // stays zero.
        new_block(layout, <System as GlobalAlloc>::alloc_zeroed)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !large(layout) {
            return System.dealloc(ptr, layout);
        }
        if let Some(l) = system(layout.size()) {
            System.dealloc(raw_of(ptr), l);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (large(layout), large(new)) {
            (false, false) => System.realloc(ptr, layout, new_size),
            (true, true) => {
                let (Some(old_sys), Some(_)) = (system(layout.size()), system(new_size)) else {
                    return std::ptr::null_mut();
                };
                let raw = raw_of(ptr);
                let offset = ptr as usize - raw as usize;
                let fresh = System.realloc(raw, old_sys, new_size + PAD);
                if fresh.is_null() {
                    return fresh;
                }
                // The system may have moved the block to another offset from a line: move the
                // contents to where the new start is.
                let start = (fresh as usize + 8).next_multiple_of(LINE) - fresh as usize;
                if start != offset {
                    let len = layout.size().min(new_size);
                    std::ptr::copy(fresh.add(offset), fresh.add(start), len);
                }
                place(fresh)
            }
            _ => {
                let fresh = self.alloc(new);
                if !fresh.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                fresh
            }
        }
    }
}

/// Asks Linux to back the whole 2 MiB pages inside `buf` with transparent huge pages, for
/// buffers of at least [`HUGE_MIN`] bytes: a model's parameters and packed weights, which
/// batch-1 inference streams from memory once per forward (ViT-B/16: 340 MB, 84 000 pages of
/// 4 KiB), and which loading a checkpoint writes once, page fault by page fault (the global
/// allocator [`CacheAligned`] advises every block of that size as it hands it out). Most
/// distributions leave transparent huge pages to `madvise` (`/sys/kernel/mm/
/// transparent_hugepage/enabled`), so without the advice every page is 4 KiB. On a Zen 4 EPYC,
/// ViT-B/16 at batch 1 (2 threads, 12 interleaved rounds): +2.5 % median; on an AVX-512
/// Xeon, `vit predict` of one image with a ViT-B/16 file 0.444 → 0.339 s and `vit info` 0.165
/// → 0.101 s (whole processes, 12 interleaved rounds: the 84 000 faults of the parameters'
/// pages were a quarter of the load). Called before the buffer is first written (a fresh
/// `vec!` of zeros is mapped lazily), so the pages are huge when they fault in. Only advice:
/// where it is refused (the setting `never`, no Linux) nothing changes.
pub(crate) fn advise_huge_pages<T>(buf: &[T]) {
    advise_range(buf.as_ptr() as usize, std::mem::size_of_val(buf));
}

/// [`advise_huge_pages`] for the `bytes` bytes from address `p`, inside one allocation (also
/// one not yet written: nothing is read).
fn advise_range(p: usize, bytes: usize) {
    if bytes < HUGE_MIN {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, end) = (p.div_ceil(HUGE) * HUGE, (p + bytes) / HUGE * HUGE);
        if end > start {
            // SAFETY: `start..end` lies inside the caller's allocation; MADV_HUGEPAGE changes
            // how its pages are backed, never their contents. An error (an old kernel) is
            // ignored.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = p;
}

/// Buffers smaller than this keep the allocator's pages (see [`advise_huge_pages`]).
pub(crate) const HUGE_MIN: usize = 4 << 20;

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
            // The last two advised into huge pages (`HUGE_MIN`).
            for size in [LARGE - 4, LARGE, 3 * LARGE + 12, HUGE_MIN, (5 << 20) + 12] {
                let p = filled(&a, size);
                assert!(
                    size < LARGE || (p as usize).is_multiple_of(LINE),
                    "{size} bytes"
                );
                a.dealloc(p, Layout::from_size_align(size, 4).unwrap());
                // Across the threshold both ways, and within it.
                for new_size in [size * 2, LARGE / 2, size + 4, size + 3 * LARGE, size - 4] {
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
                // Zeroed, also where a block just written and freed could be reused.
                let l = Layout::from_size_align(size, 4).unwrap();
                a.dealloc(filled(&a, size), l);
                let z = a.alloc_zeroed(l);
                assert!(
                    size < LARGE || (z as usize).is_multiple_of(LINE),
                    "zeroed {size}"
                );
                assert!((0..size).all(|i| *z.add(i) == 0), "zeroed {size}");
                a.dealloc(z, l);
            }
        }
    }
}
