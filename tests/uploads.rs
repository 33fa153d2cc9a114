//! Uploads to many peers at once, from a real daemon, every peer asking for compressed chunks:
//! first peers that read every chunk, then peers that never read what they asked for. Either
//! way the daemon answers no more requests at once than it has upload slots, and its resident
//! memory stays within 4 MiB per slot above idle (a chunk, its compressed copy, a thread's zstd
//! context, the stream's buffers): memory that grew per request or per chunk fails it (a zstd
//! context leaked per chunk took the daemon past 1.1 GiB here). The test prints the peaks.

mod common;

mod needs_nix {
    use std::io::Write;

    use futures::{AsyncReadExt, StreamExt};
    use peerix_chunkstore::ChunkId;
    use peerix_nix::Sha256Hash;
    use peerix_swarm::protocol::{self, ChunksRequest, Kind, Request, Want};
    use peerix_swarm::{Client, Multiaddr, Node, NodeConfig, PeerId, PROTOCOL};
    use peerix_test_support::rng::Rng;

    use super::common::pair::sign;
    use super::common::{proc_memory, Daemon, Nix};

    /// Upload slots of a daemon with the default limits (`ServeLimits::max_chunk_requests`).
    const SLOTS: usize = 16;

    /// A signed store path of `mib` MiB of text: words drawn at random, so that zstd pays on
    /// every chunk and no two chunks are alike.
    fn add_text(nix: &Nix, key: &std::path::Path, mib: usize) -> String {
        const WORDS: &[&str] = &[
            "lib",
            "mkDerivation",
            "stdenv",
            "fetchurl",
            "buildInputs",
            "meta",
            "license",
            "platforms",
            "version",
            "src",
            "sha256",
            "patches",
            "postInstall",
            "makeFlags",
            "{",
            "}",
            "=",
            ";",
            "\n",
            "  ",
            "inherit",
            "with",
            "pkgs",
            "let",
            "in",
        ];
        let tree = nix.scratch("text");
        let mut f = std::io::BufWriter::new(std::fs::File::create(tree.join("doc")).unwrap());
        let mut rng = Rng(0x5eed);
        let mut n = 0;
        while n < mib << 20 {
            let w = WORDS[rng.next() as usize % WORDS.len()];
            let salt = rng.next() % 1000;
            let s = format!("{w}{salt} ");
            f.write_all(s.as_bytes()).unwrap();
            n += s.len();
        }
        f.flush().unwrap();
        let path = nix.add(&tree);
        sign(nix, key, &path);
        path
    }

    /// A node of our own on loopback, connected to the daemon.
    async fn peer(dir: &std::path::Path, daemon: &Multiaddr) -> Node {
        let mut cfg = NodeConfig::new(dir);
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        cfg.mdns = false;
        let node = Node::start(cfg).await.unwrap();
        node.dial(daemon.clone()).await.unwrap();
        node
    }

    fn compressed() -> Want {
        Want {
            zstd: true,
            compress: true,
            delta: None,
        }
    }

    #[test]
    fn many_peers_asking_for_compressed_chunks_are_held_to_the_slots() {
        let nix = super::common::nix();
        let key = nix.keys("slow-readers-1");
        let path = add_text(&nix, &key.0, 48);
        let nar_hash: Sha256Hash = nix.nar_hashes(std::slice::from_ref(&path))[&path]
            .parse()
            .unwrap();
        let mut a = Daemon::start("A", &nix, &["--private-key", key.0.to_str().unwrap()]);
        a.wait_scan();
        let pid = a.child.id();
        let a_peer: PeerId = a.peer_id.parse().unwrap();
        let a_addr: Multiaddr = a.p2p.parse().unwrap();
        let idle = proc_memory(pid, "VmRSS");

        let rt = tokio::runtime::Runtime::new().unwrap();
        let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
        let (readers_peak, slow_rss, served) = rt.block_on(async {
            let mut nodes = vec![];
            for d in &dirs {
                nodes.push(peer(d.path(), &a_addr).await);
            }
            let m = Client::new(nodes[0].stream_control())
                .manifest(a_peer, nar_hash)
                .await
                .unwrap()
                .expect("A shares the path");
            let ids: Vec<ChunkId> = m.chunks.iter().map(|c| c.id).collect();
            assert!(ids.len() >= 4 * SLOTS, "{} chunks only", ids.len());

            // Eight peers, each with four requests at a time, read the whole NAR compressed:
            // twice as many answers asked for as there are slots (those refused Busy are
            // left out).
            let reads = nodes.iter().flat_map(|n| {
                let m = &m;
                (0..4).map(move |w| {
                    let client = Client::new(n.stream_control());
                    async move {
                        let mut got = 0usize;
                        let mut saved = 0u64;
                        for part in m.chunks.chunks(8).skip(w).step_by(4) {
                            let s =
                                client.fetch_chunks_as(a_peer, part.to_vec(), compressed(), None);
                            futures::pin_mut!(s);
                            while let Some(Ok(c)) = s.next().await {
                                got += 1;
                                let len = c.chunk.data().len() as u64;
                                saved += len.saturating_sub(u64::from(c.wire_len));
                            }
                        }
                        (got, saved)
                    }
                })
            });
            let results = futures::future::join_all(reads).await;
            let got: usize = results.iter().map(|r| r.0).sum();
            let saved: u64 = results.iter().map(|r| r.1).sum();
            assert!(got > 0, "no chunk came back");
            assert!(saved > 0, "no chunk came compressed");
            let readers_peak = proc_memory(pid, "VmHWM");

            // Then every peer opens eight streams asking for 64 chunks each, and reads no more
            // than the first frame's header: the daemon writes into a stream nobody reads.
            let mut held = vec![];
            let mut served = 0;
            let mut busy = 0;
            for n in &nodes {
                for k in 0..8 {
                    let mut s = n
                        .stream_control()
                        .open_stream(a_peer, PROTOCOL)
                        .await
                        .unwrap();
                    let part = ids.iter().cycle().skip(k * 64).take(64).copied().collect();
                    let req = Request::Chunks(ChunksRequest {
                        ids: part,
                        want: compressed(),
                    });
                    protocol::write_request(&mut s, &req).await.unwrap();
                    held.push(s);
                }
            }
            // Each stream is answered with a chunk (a slot) or Busy (after the queue timeout).
            for s in &mut held {
                let mut head = [0u8; 5];
                s.read_exact(&mut head).await.unwrap();
                if head[4] == Kind::Refused as u8 {
                    busy += 1;
                } else {
                    served += 1;
                }
            }
            assert!(served <= SLOTS, "{served} answers at once, {SLOTS} slots");
            assert!(busy >= held.len() - SLOTS, "{busy} busy of {}", held.len());
            // The answers hold their slots (nobody reads them): each has read and compressed
            // its first chunk, whose header came, and is stuck writing it.
            let slow_rss = proc_memory(pid, "VmRSS");
            drop(held);
            for n in nodes {
                n.shutdown().await;
            }
            (readers_peak, slow_rss, served)
        });
        let mib = |b: u64| b >> 20;
        eprintln!(
            "A's resident memory: {} MiB idle, peak {} MiB while eight peers read compressed \
             chunks, {} MiB with {served} answers nobody reads",
            mib(idle),
            mib(readers_peak),
            mib(slow_rss)
        );
        // Per slot: a chunk (at most 1 MiB), its compressed copy, a zstd context (about
        // 1.3 MiB at level 3) and the stream's buffers; 4 MiB each is generous.
        let bound = idle + (SLOTS as u64) * (4 << 20);
        assert!(
            readers_peak <= bound && slow_rss <= bound,
            "A grew past {} MiB (idle {} MiB + 4 MiB per slot)",
            mib(bound),
            mib(idle)
        );
    }
}
