//! A seed's record, kept in the chunk store as a named root under its label.

use anyhow::{anyhow, Result};
use peerix_chunkstore::ChunkStore;
use peerix_nix::StorePathHash;

/// A closure pinned under a label (what the operator named: a store path, or a link to one
/// such as `/run/current-system`): its root and every path pinned for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub label: String,
    /// Base name of the store path the label resolved to.
    pub root: String,
    pub members: Vec<StorePathHash>,
    /// Those of `members` the operator chose to share although they are neither public nor
    /// signed by a trusted key (`peerix seed --share-private-paths`). Empty in seeds recorded
    /// before this was kept.
    pub private: Vec<StorePathHash>,
}

/// Set in a seed record's root length when the private members follow the members (a root
/// name is never this long).
const SEED_WITH_PRIVATE: u16 = 0x8000;

impl Seed {
    pub fn load(cs: &ChunkStore, label: &str) -> Result<Option<Self>> {
        cs.root(label)?.map(|v| Self::decode(label, &v)).transpose()
    }

    /// Every seed.
    pub fn all(cs: &ChunkStore) -> Result<Vec<Self>> {
        cs.roots()?
            .into_iter()
            .map(|(label, v)| Self::decode(&label, &v))
            .collect()
    }

    /// Record this seed, replacing one with the same label.
    pub fn save(&self, cs: &ChunkStore) -> Result<()> {
        Ok(cs.put_root(&self.label, &self.encode())?)
    }

    /// False when there was no such seed.
    pub fn remove(cs: &ChunkStore, label: &str) -> Result<bool> {
        Ok(cs.remove_root(label)?)
    }

    /// `[u16 root length | SEED_WITH_PRIVATE][root][u32 members][members][private]`, hashes of
    /// 20 bytes. Older records have no flag, no count and no private members.
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(
            6 + self.root.len() + 20 * (self.members.len() + self.private.len()),
        );
        let n = u16::try_from(self.root.len())
            .unwrap_or(u16::MAX)
            .min(SEED_WITH_PRIVATE - 1);
        v.extend_from_slice(&(n | SEED_WITH_PRIVATE).to_le_bytes());
        v.extend_from_slice(&self.root.as_bytes()[..usize::from(n)]);
        let m = u32::try_from(self.members.len()).expect("fewer than 2^32 members");
        v.extend_from_slice(&m.to_le_bytes());
        for h in self.members.iter().chain(&self.private) {
            v.extend_from_slice(&h.0);
        }
        v
    }

    fn decode(label: &str, v: &[u8]) -> Result<Self> {
        let bad = || anyhow!("the record of seed {label} is damaged");
        let head = u16::from_le_bytes(v.get(..2).ok_or_else(bad)?.try_into().expect("2"));
        let n = usize::from(head & !SEED_WITH_PRIVATE);
        let root = std::str::from_utf8(v.get(2..2 + n).ok_or_else(bad)?).map_err(|_| bad())?;
        let (count, rest) = if head & SEED_WITH_PRIVATE != 0 {
            let c = v.get(2 + n..6 + n).ok_or_else(bad)?;
            let c = u32::from_le_bytes(c.try_into().expect("4")) as usize;
            (Some(c), &v[6 + n..])
        } else {
            (None, &v[2 + n..])
        };
        let hashes = rest.chunks_exact(20);
        if !hashes.remainder().is_empty() {
            return Err(bad());
        }
        let mut hashes: Vec<StorePathHash> = hashes
            .map(|c| StorePathHash(c.try_into().expect("20")))
            .collect();
        let private = match count {
            Some(c) if c > hashes.len() => return Err(bad()),
            Some(c) => hashes.split_off(c),
            None => vec![],
        };
        Ok(Self {
            label: label.to_owned(),
            root: root.to_owned(),
            members: hashes,
            private,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_records_round_trip_and_old_ones_have_no_private_members() {
        let h = |b| StorePathHash([b; 20]);
        let s = Seed {
            label: "l".into(),
            root: "abc-root".into(),
            members: vec![h(1), h(2)],
            private: vec![h(2)],
        };
        assert_eq!(Seed::decode("l", &s.encode()).unwrap(), s);
        // As recorded before private members were kept: [u16 root length][root][members].
        let mut old = 8u16.to_le_bytes().to_vec();
        old.extend_from_slice(b"abc-root");
        old.extend_from_slice(&[1; 20]);
        old.extend_from_slice(&[2; 20]);
        let d = Seed::decode("l", &old).unwrap();
        assert_eq!(d.members, vec![h(1), h(2)]);
        assert!(d.private.is_empty());
        assert!(Seed::decode("l", &old[..old.len() - 1]).is_err());
        let mut cut = s.encode();
        cut.truncate(cut.len() - 40);
        assert!(Seed::decode("l", &cut).is_err(), "more members than hashes");
    }
}
