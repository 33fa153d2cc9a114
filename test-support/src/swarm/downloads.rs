//! Set-ups for tests of the downloader: a leecher and its seeders, and what each holds.

use peerix_chunkstore::Manifest;
use peerix_swarm::DownloadConfig;

use super::Node;

/// Seeders (not serving yet) and a leecher connected to each of them.
pub async fn cluster(seeders: usize) -> (Node, Vec<Node>) {
    let leecher = Node::new().await;
    let mut ss = vec![];
    for _ in 0..seeders {
        let s = Node::new().await;
        leecher.connect(&s).await;
        ss.push(s);
    }
    (leecher, ss)
}

/// Runs of 256 KiB: many runs out of a NAR of a few MiB.
pub fn small_runs() -> DownloadConfig {
    DownloadConfig {
        run_bytes: 256 * 1024,
        ..DownloadConfig::default()
    }
}

/// Seeders that hold the NAR in part, as downloads in progress do: seeder `k` gets chunk `i`
/// (at NAR offset `off`) when `holds(k, i, off)`.
pub fn hold_in_part(
    seeders: &[Node],
    m: &Manifest,
    data: &[u8],
    holds: impl Fn(usize, usize, u64) -> bool,
) {
    for s in seeders {
        s.store.begin_download(m).unwrap();
    }
    for (i, (off, c)) in m.offsets().enumerate() {
        let bytes = &data[off as usize..off as usize + c.len as usize];
        for (k, s) in seeders.iter().enumerate() {
            if holds(k, i, off) {
                s.store.put_chunk(&c.id, bytes).unwrap();
            }
        }
    }
}
