//! Compute kernels. Each fast path has a plain scalar reference twin in the same module,
//! and the tests compare the two on random inputs.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod lowbit;
pub mod matmul;
pub mod membw;
pub mod ops;
pub mod pool;
pub mod qdec;
#[cfg(test)]
mod testutil;

/// A raw pointer that rayon tasks may share when each writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);

impl SharedMut {
    /// Through a method, so closures capture the whole (Send + Sync) wrapper, not the field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: users guarantee that concurrent tasks write disjoint elements.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
