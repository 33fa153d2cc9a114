//! Named roots: records the application keeps beside what it pins, under names it chooses, as
//! bytes it encodes. The store gives them no meaning and never reads them; the daemon's seeds
//! (closures pinned under a label) are kept this way.

use super::ChunkStore;
use crate::{Error, Result};

impl ChunkStore {
    /// Record `value` under `name` (replacing what was there), durably.
    pub fn put_root(&self, name: &str, value: &[u8]) -> Result<()> {
        self.inner.roots.insert(name.as_bytes(), value)?;
        self.inner.db.flush()?;
        Ok(())
    }

    pub fn root(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.inner.roots.get(name.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Every named root, by name.
    pub fn roots(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.inner
            .roots
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let name = String::from_utf8(k.to_vec())
                    .map_err(|_| Error::BadRecord { what: "root name" })?;
                Ok((name, v.to_vec()))
            })
            .collect()
    }

    /// False when there was no such root.
    pub fn remove_root(&self, name: &str) -> Result<bool> {
        let had = self.inner.roots.remove(name.as_bytes())?.is_some();
        self.inner.db.flush()?;
        Ok(had)
    }
}
