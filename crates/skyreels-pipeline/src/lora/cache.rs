//! The parsed LoRA files kept in memory, by the SHA-256 of their bytes: least recently used
//! first out once their tensors take more than the capacity.

use super::parse::Parsed;
use std::sync::Arc;

/// A file's content hash.
pub(super) type Digest = [u8; 32];

/// Default capacity: 1 GiB of adapter tensors.
pub const DEFAULT_LORA_CACHE_BYTES: usize = 1 << 30;

/// What the cache holds and how it was used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraCacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    /// Bytes of the tensors held.
    pub bytes: usize,
    pub capacity: usize,
}

pub(super) struct LoraCache {
    /// Most recently used last.
    entries: Vec<(Digest, Arc<Parsed>)>,
    capacity: usize,
    hits: u64,
    misses: u64,
}

impl LoraCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
            hits: 0,
            misses: 0,
        }
    }

    /// The entry for `digest` (now the most recent), counting a hit or a miss.
    pub(super) fn get(&mut self, digest: &Digest) -> Option<Arc<Parsed>> {
        match self.entries.iter().position(|(d, _)| d == digest) {
            Some(i) => {
                self.hits += 1;
                let entry = self.entries.remove(i);
                let parsed = entry.1.clone();
                self.entries.push(entry);
                Some(parsed)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Keeps `parsed` as the most recent entry (not when it alone exceeds the capacity), then
    /// drops the least recent ones until the rest fits.
    pub(super) fn insert(&mut self, digest: Digest, parsed: Arc<Parsed>) {
        if parsed.bytes > self.capacity {
            return;
        }
        self.entries.retain(|(d, _)| *d != digest);
        self.entries.push((digest, parsed));
        self.shrink();
    }

    pub(super) fn set_capacity(&mut self, bytes: usize) {
        self.capacity = bytes;
        self.shrink();
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, p)| p.bytes).sum()
    }

    fn shrink(&mut self) {
        while self.bytes() > self.capacity {
            self.entries.remove(0);
        }
    }

    pub(super) fn stats(&self) -> LoraCacheStats {
        LoraCacheStats {
            hits: self.hits,
            misses: self.misses,
            entries: self.entries.len(),
            bytes: self.bytes(),
            capacity: self.capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: usize) -> Arc<Parsed> {
        Arc::new(Parsed {
            format: "diffusers",
            modules: vec![],
            stray_keys: 0,
            bytes,
        })
    }

    #[test]
    fn least_recently_used_goes_first_when_over_capacity() {
        let mut c = LoraCache::new(100);
        c.insert([1; 32], parsed(40));
        c.insert([2; 32], parsed(40));
        assert!(c.get(&[1; 32]).is_some()); // 1 is now the most recent
        c.insert([3; 32], parsed(40)); // 120 > 100: 2 goes
        assert!(c.get(&[2; 32]).is_none());
        assert!(c.get(&[1; 32]).is_some() && c.get(&[3; 32]).is_some());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries, s.bytes), (3, 1, 2, 80));
        // an entry larger than the whole cache is not kept; a smaller capacity evicts
        c.insert([4; 32], parsed(101));
        assert!(c.get(&[4; 32]).is_none());
        c.set_capacity(50);
        assert_eq!((c.stats().entries, c.stats().bytes), (1, 40));
        assert!(c.get(&[3; 32]).is_some());
    }
}
