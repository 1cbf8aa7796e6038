//! Weights that a decode step streams, gathered into one anonymous mapping backed by
//! transparent huge pages where the kernel allows. With 4 KiB pages every 4 KiB of a
//! streamed matrix costs a page walk (expensive under virtualization) and stops the hardware
//! prefetcher at the page boundary; QDEC's scattered residual runs pay a walk for nearly
//! every run. One mapping per model also lets matrices smaller than a huge page share one.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Parts start on cache lines, as a heap allocation of this size would.
const ALIGN: usize = 64;

/// Named byte ranges copied into one read-only, huge-page-advised mapping.
pub struct HugePageArena {
    buf: Arc<memmap2::Mmap>,
    ranges: HashMap<String, Range<usize>>,
}

impl HugePageArena {
    /// Copies every part into one new mapping; `what` names the source in errors.
    pub fn gather<'a>(
        parts: impl IntoIterator<Item = (String, &'a [u8])>,
        what: &str,
    ) -> Result<Self> {
        Self::gather_with(parts, what, |_, src, dst| dst.copy_from_slice(src))
    }

    /// [`Self::gather`] with `copy(name, src, dst)` writing each part (of its length) into
    /// the mapping: a loader lays the bytes out as its kernels read them on the way.
    pub fn gather_with<'a>(
        parts: impl IntoIterator<Item = (String, &'a [u8])>,
        what: &str,
        copy: impl Fn(&str, &[u8], &mut [u8]),
    ) -> Result<Self> {
        let parts: Vec<(String, &[u8])> = parts.into_iter().collect();
        let mut ranges = HashMap::new();
        let mut total = 0;
        for (name, bytes) in &parts {
            ranges.insert(name.clone(), total..total + bytes.len());
            total = (total + bytes.len()).next_multiple_of(ALIGN);
        }
        let mut buf = memmap2::MmapMut::map_anon(total.max(1))
            .with_context(|| format!("{what}: cannot allocate {total} bytes"))?;
        #[cfg(target_os = "linux")]
        // Only a hint: without transparent huge pages the buffer works all the same.
        let _ = buf.advise(memmap2::Advice::HugePage);
        for (name, bytes) in &parts {
            copy(name, bytes, &mut buf[ranges[name].clone()]);
        }
        let buf = Arc::new(
            buf.make_read_only()
                .with_context(|| format!("{what}: cannot seal the copied weights"))?,
        );
        Ok(Self { buf, ranges })
    }

    /// The bytes of part `name`, sharing the mapping.
    pub fn get(&self, name: &str) -> Option<SharedBytes> {
        let range = self.ranges.get(name)?.clone();
        Some(SharedBytes::Arena {
            buf: self.buf.clone(),
            range,
        })
    }

    /// Bytes the mapping holds (parts and alignment padding).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Bytes owned on the heap or shared from a [`HugePageArena`]; reads alike.
#[derive(Clone)]
pub enum SharedBytes {
    Owned(Vec<u8>),
    Arena {
        buf: Arc<memmap2::Mmap>,
        range: Range<usize>,
    },
}

impl Deref for SharedBytes {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            SharedBytes::Owned(v) => v,
            SharedBytes::Arena { buf, range } => &buf[range.clone()],
        }
    }
}

impl From<Vec<u8>> for SharedBytes {
    fn from(v: Vec<u8>) -> Self {
        SharedBytes::Owned(v)
    }
}

impl PartialEq for SharedBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_read_back_aligned_and_shared() {
        let a: Vec<u8> = (0..100u8).collect();
        let b: Vec<u8> = (0..37u8).map(|v| v.wrapping_mul(7)).collect();
        let arena = HugePageArena::gather(
            [("a".to_string(), &a[..]), ("b".to_string(), &b[..])],
            "test",
        )
        .unwrap();
        let (ga, gb) = (arena.get("a").unwrap(), arena.get("b").unwrap());
        assert_eq!((&*ga, &*gb), (&a[..], &b[..]));
        assert_eq!(gb.as_ptr() as usize % ALIGN, 0);
        assert!(arena.get("c").is_none());
        assert_eq!(arena.len(), 192);
        // Owned and shared bytes compare by content.
        assert_eq!(ga, SharedBytes::from(a));
    }
}
