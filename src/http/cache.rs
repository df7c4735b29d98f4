//! Small in-memory caches of what never changes once written: a dataset's
//! manifest, a label-set version, an embed job's embeddings and their 2-D
//! map. Each keeps a few entries, the least recently used dropped first, so
//! that a request on a large dataset does not reread and reparse them.

use std::sync::{Arc, Mutex};

/// Entries each cache keeps.
const CACHED_ENTRIES: usize = 4;

/// The entries of a cache, most recently used last.
type Entries<K, V> = Vec<(K, Arc<V>)>;

/// The last few values read or computed, by key.
pub struct RecentlyUsed<K, V>(Arc<Mutex<Entries<K, V>>>);

impl<K, V> Default for RecentlyUsed<K, V> {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Vec::new())))
    }
}

impl<K, V> Clone for RecentlyUsed<K, V> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: PartialEq, V> RecentlyUsed<K, V> {
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let position = entries.iter().position(|(k, _)| k == key)?;
        let entry = entries.remove(position);
        let value = entry.1.clone();
        entries.push(entry);
        Some(value)
    }

    pub fn insert(&self, key: K, value: Arc<V>) {
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(k, _)| *k != key);
        if entries.len() >= CACHED_ENTRIES {
            entries.remove(0);
        }
        entries.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recently_used_entries() {
        let cache: RecentlyUsed<u32, &str> = RecentlyUsed::default();
        for key in 0..CACHED_ENTRIES as u32 {
            cache.insert(key, Arc::new("value"));
        }
        // Reading 0 makes 1 the least recently used, so it goes first.
        assert!(cache.get(&0).is_some());
        cache.insert(99, Arc::new("new"));
        assert!(cache.get(&1).is_none());
        assert!(cache.get(&0).is_some() && cache.get(&2).is_some());
        assert_eq!(*cache.get(&99).unwrap(), "new");
        cache.insert(99, Arc::new("replaced"));
        assert_eq!(*cache.get(&99).unwrap(), "replaced");
    }
}
