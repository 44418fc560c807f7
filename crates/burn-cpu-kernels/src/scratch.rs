//! Per-thread scratch buffers, reused between calls: a kernel's temporary matrices (im2col
//! columns, Winograd's transformed blocks, relaid operands) would otherwise be allocated
//! and zeroed at every call, and those above glibc's mmap threshold page-faulted afresh.
//! Each buffer keeps the largest size it was asked for, for the life of its thread (for a
//! ResNet-50 on 224x224 images the largest is the stem's im2col matrix, 147 x 12,544
//! values an image, in the forward's buffer and in the backward's).

use std::cell::RefCell;
use std::thread::LocalKey;

/// `f` given this thread's buffer in `key`, grown to at least `len` elements (not cleared:
/// `f` writes what it reads). A kernel runs inside another's parallel loop when rayon lends
/// this thread to it; the buffer is then in use, and `f` gets a fresh one.
pub(crate) fn with_scratch<T: Copy + Default + 'static, R>(
    key: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|buffer| {
        let mut own = Vec::new();
        let mut lent = buffer.try_borrow_mut();
        let buffer = lent.as_deref_mut().unwrap_or(&mut own);
        if buffer.len() < len {
            buffer.resize(len, T::default());
        }
        f(&mut buffer[..len])
    })
}
