//! Hostile peers against a real daemon and real Nix. A rogue node (a real libp2p node driven
//! by the test) relays a genuine signed narinfo (anyone can: narinfos are public) and lies
//! about the NAR behind it. For every lie: the HTTP body never completes on unverified bytes,
//! Nix imports nothing wrong, the liar is banned, and when an honest peer has the path Nix
//! still gets it.

mod common;

use std::collections::HashMap;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::{http, noise, Daemon, Nix};
use futures::{AsyncWriteExt, StreamExt};
use peerix_chunkstore::{ChunkId, ChunkRef, ChunkStore, Manifest, Options};
use peerix_nix::Sha256Hash;
use peerix_swarm::protocol::{self, Kind, Request};
use peerix_swarm::{Node, NodeConfig, PROTOCOL};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lie {
    /// `[E, E again claimed as 1 byte, …]`: one chunk id with two lengths, so that the chunks
    /// really sent add up to more than NarSize before the last one.
    OneIdTwoLengths,
    /// Real chunks, consistent lengths, but they make another NAR than the NarHash names.
    AnotherNar,
    /// The right manifest; chunk bytes that do not match their ids.
    BadChunkBytes,
    /// A chunk listed one byte longer than it is, the next one byte shorter.
    WrongChunkLength,
    /// A manifest for another NarSize than the narinfo's.
    AnotherNarSize,
    /// Chunk lengths that do not add up to the NarSize.
    LengthsDoNotAddUp,
    /// The right manifest; each chunk as a zstd frame that expands past the length it states
    /// (the chunk's, with more bytes after it).
    ZstdPastItsSize,
    /// The right manifest; each chunk as a delta against a chunk B never offered.
    DeltaAgainstUnheld,
}

/// What the rogue answers.
struct Script {
    narinfo: String,
    nar_hash: Sha256Hash,
    /// The body of the manifest reply, encoded by hand so that it may be invalid.
    manifest_reply: Vec<u8>,
    chunks: HashMap<ChunkId, Bytes>,
    lie: Lie,
}

struct Rogue {
    rt: tokio::runtime::Runtime,
    node: Option<Node>,
    _dir: tempfile::TempDir,
}

impl Rogue {
    fn start(script: Script) -> Rogue {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let node = rt.block_on(async {
            let mut cfg = NodeConfig::new(dir.path().join("p2p"));
            cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
            cfg.mdns = false;
            Node::start(cfg).await.unwrap()
        });
        let mut incoming = node.stream_control().accept(PROTOCOL).unwrap();
        let script = Arc::new(script);
        rt.spawn(async move {
            while let Some((_, mut s)) = incoming.next().await {
                let script = script.clone();
                tokio::spawn(async move {
                    let Ok(req) = protocol::read_request(&mut s).await else {
                        return;
                    };
                    let _ = answer(&script, req, &mut s).await;
                    let _ = s.close().await;
                });
            }
        });
        Rogue {
            rt,
            node: Some(node),
            _dir: dir,
        }
    }

    fn peer_id(&self) -> String {
        self.node.as_ref().unwrap().peer_id().to_string()
    }

    fn addr(&self) -> String {
        self.node.as_ref().unwrap().listen_addrs()[0].to_string()
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            self.rt.block_on(n.shutdown());
        }
    }
}

async fn answer<S: futures::AsyncWrite + Unpin>(
    script: &Script,
    req: Request,
    s: &mut S,
) -> std::io::Result<()> {
    match req {
        Request::Lookup(_) => {
            let info = script.narinfo.parse().expect("a genuine narinfo");
            protocol::write_reply(s, &protocol::Reply::Lookup(vec![info])).await
        }
        Request::Manifest(h) => {
            let body = if h == script.nar_hash {
                script.manifest_reply.clone()
            } else {
                vec![0]
            };
            protocol::write_frame(s, Kind::ManifestReply, &body).await
        }
        Request::Have { chunks, nars } => {
            // It claims everything.
            let r = protocol::HaveReply {
                chunks: vec![true; chunks.len()],
                nars: vec![protocol::NarState::Complete; nars.len()],
            };
            protocol::write_reply(s, &protocol::Reply::Have(r)).await
        }
        Request::Chunks(protocol::ChunksRequest { ids, .. }) => {
            for id in ids {
                let body = encode(script.lie, script.chunks.get(&id).cloned());
                protocol::write_chunk(s, &id, &body).await?;
            }
            s.flush().await
        }
    }
}

/// A chunk's frame body, as the lie has it.
fn encode(lie: Lie, data: Option<Bytes>) -> protocol::ChunkBody {
    let Some(d) = data else {
        return protocol::ChunkBody::Missing;
    };
    let raw_len = d.len() as u32;
    match lie {
        Lie::ZstdPastItsSize => {
            let mut more = d.to_vec();
            more.extend_from_slice(b"and then some");
            protocol::ChunkBody::Zstd {
                raw_len,
                data: zstd::bulk::compress(&more, 3).unwrap().into(),
            }
        }
        Lie::DeltaAgainstUnheld => protocol::ChunkBody::Delta {
            bases: vec![ChunkId([9; 32])],
            raw_len,
            data: zstd::bulk::compress(&d, 3).unwrap().into(),
        },
        _ => protocol::ChunkBody::Raw(d),
    }
}

/// The manifest reply body for `m` as given, valid or not (as `Reply::encode` lays it
/// out: flag, NarHash, then the manifest's own encoding).
fn manifest_reply(m: &Manifest) -> Vec<u8> {
    let mut b = vec![1];
    b.extend_from_slice(&m.nar_hash.0);
    b.extend_from_slice(&m.encode());
    b
}

/// The chunks of a NAR, cut as a daemon with default settings cuts them.
fn chunk(nar: &[u8]) -> (Manifest, HashMap<ChunkId, Bytes>) {
    let dir = tempfile::tempdir().unwrap();
    let cs = ChunkStore::open(dir.path(), Options::default()).unwrap();
    let m = cs.ingest_nar(nar, None, None, &mut |_| {}).unwrap();
    let chunks = m
        .chunks
        .iter()
        .map(|c| (c.id, Bytes::from(cs.read_chunk(&c.id).unwrap())))
        .collect();
    (m, chunks)
}

fn script(lie: Lie, narinfo: String, nar: &[u8]) -> Script {
    let (real, real_chunks) = chunk(nar);
    assert!(real.chunks.len() >= 4, "the test NAR is too small");
    let h = real.nar_hash;
    let size = real.nar_size;
    let with = |chunks: Vec<ChunkRef>, nar_size: u64| Manifest {
        nar_hash: h,
        nar_size,
        chunks,
    };
    let (m, chunks) = match lie {
        Lie::OneIdTwoLengths => {
            let e = *real.chunks.iter().max_by_key(|c| c.len).unwrap();
            let mut rest: Vec<ChunkRef> = real
                .chunks
                .iter()
                .copied()
                .filter(|c| c.id != e.id)
                .collect();
            // One byte less at the end, so the lengths still add up to NarSize.
            let last = rest.pop().unwrap();
            let short = real_chunks[&last.id].slice(..last.len as usize - 1);
            let z = ChunkRef {
                id: ChunkId::of(&short),
                len: last.len - 1,
            };
            let mut chunks = real_chunks.clone();
            chunks.insert(z.id, short);
            let mut list = vec![e, ChunkRef { id: e.id, len: 1 }];
            list.extend(rest);
            list.push(z);
            (with(list, size), chunks)
        }
        Lie::AnotherNar => {
            let mut other = nar.to_vec();
            let mid = other.len() / 2;
            other[mid] ^= 0xff;
            let (m, chunks) = chunk(&other);
            (with(m.chunks, size), chunks)
        }
        Lie::BadChunkBytes => {
            let chunks = real_chunks
                .iter()
                .map(|(id, b)| {
                    let mut v = b.to_vec();
                    v[0] ^= 1;
                    (*id, Bytes::from(v))
                })
                .collect();
            (real.clone(), chunks)
        }
        Lie::WrongChunkLength => {
            let mut list = real.chunks.clone();
            list[0].len += 1;
            list[1].len -= 1;
            (with(list, size), real_chunks)
        }
        Lie::AnotherNarSize => {
            let mut list = real.chunks.clone();
            list.last_mut().unwrap().len += 1;
            (with(list, size + 1), real_chunks)
        }
        Lie::LengthsDoNotAddUp => {
            let mut list = real.chunks.clone();
            list[0].len += 1;
            (with(list, size), real_chunks)
        }
        Lie::ZstdPastItsSize | Lie::DeltaAgainstUnheld => (real.clone(), real_chunks),
    };
    Script {
        narinfo,
        nar_hash: h,
        manifest_reply: manifest_reply(&m),
        chunks,
        lie,
    }
}

fn sign(nix: &Nix, key: &Path, path: &str) {
    let s = nix.store_arg();
    let k = key.to_str().unwrap();
    nix.run(
        "nix",
        &["store", "sign", "--store", &s, "--key-file", k, path],
    );
}

/// One hostile case: the rogue is B's only peer when B's Nix asks for the narinfo, so its
/// lie is the one B acts upon. With `honest`, A (which holds the path) connects before the NAR
/// is fetched.
fn case(lie: Lie, honest: bool) {
    let a_nix = common::nix();
    let b_nix = common::nix();
    let tree = a_nix.scratch("tree");
    std::fs::write(tree.join("blob"), noise(3 << 20, 0x5eed ^ lie as u64)).unwrap();
    let path = a_nix.add(&tree);
    let (a_sec, a_pub) = a_nix.keys("peer-a-1");
    sign(&a_nix, &a_sec, &path);
    let s = a_nix.store_arg();
    let nar = a_nix
        .cmd("nix")
        .args(["store", "dump-path", "--store", &s, &path])
        .output()
        .unwrap();
    assert!(nar.status.success());
    let nar = nar.stdout;
    let narinfo = String::from_utf8(common::peerix_ok(&[
        "narinfo",
        "--store",
        &a_nix.store_arg(),
        &path,
    ]))
    .unwrap();
    assert!(narinfo.contains("Sig: peer-a-1:"), "{narinfo}");
    let rogue = Rogue::start(script(lie, narinfo.clone(), &nar));

    b_nix.init_store();
    let mut b = Daemon::start(
        "B",
        &b_nix,
        &["--trusted-key", &a_pub, "--peer", &rogue.addr()],
    );
    b.wait_for("the rogue's connection", |l| {
        l == format!("peerix: peer connected {}", rogue.peer_id())
    });
    let hash = &path.trim_start_matches("/nix/store/")[..32];
    let (status, body) = http(&b.http, "GET", &format!("/{hash}.narinfo"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let url = String::from_utf8(body)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_owned();

    let _a = honest.then(|| {
        let mut a = Daemon::start(
            "A",
            &a_nix,
            &["--private-key", a_sec.to_str().unwrap(), "--peer", &b.p2p],
        );
        a.wait_scan();
        b.wait_for("A's connection", |l| {
            l == format!("peerix: peer connected {}", a.peer_id)
        });
        a
    });

    let (status, len, got) = common::get_until_cut(&b.http, &format!("/{url}"));
    let complete = status == 200 && len == Some(got.len());
    if complete {
        assert!(
            got == nar,
            "{lie:?}: a complete response with bytes that are not the NAR"
        );
    } else {
        assert!(
            matches!(status, 200 | 404 | 502),
            "{lie:?}: status {status}"
        );
        if let Some(len) = len.filter(|_| status == 200) {
            assert!(got.len() < len, "{lie:?}: {} of {len} bytes", got.len());
        }
        assert!(got.len() as u64 <= nar.len() as u64);
    }
    b.wait_for("the liar's ban", |l| {
        l.starts_with(&format!("peerix: banned peer {}", rogue.peer_id()))
    });

    let out = b_nix.realise(&path, &b.url(), &a_pub);
    let s = b_nix.store_arg();
    let valid = b_nix
        .output("nix-store", &["--store", &s, "--check-validity", &path])
        .status
        .success();
    if honest {
        assert!(
            out.status.success(),
            "{lie:?}: Nix did not get the path from the honest peer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            b_nix.nar_hashes(std::slice::from_ref(&path)),
            a_nix.nar_hashes(std::slice::from_ref(&path))
        );
    } else {
        assert!(
            !out.status.success(),
            "{lie:?}: Nix imported the path from a liar"
        );
        assert!(!valid, "{lie:?}: a path from a liar is valid in B's store");
    }
}

mod needs_nix {
    use super::*;

    #[test]
    fn one_chunk_id_with_two_lengths() {
        case(Lie::OneIdTwoLengths, false);
    }

    #[test]
    fn one_chunk_id_with_two_lengths_honest_peer_present() {
        case(Lie::OneIdTwoLengths, true);
    }

    #[test]
    fn a_manifest_of_another_nar() {
        case(Lie::AnotherNar, false);
    }

    #[test]
    fn a_manifest_of_another_nar_honest_peer_present() {
        case(Lie::AnotherNar, true);
    }

    #[test]
    fn chunk_bytes_that_do_not_match_their_ids() {
        case(Lie::BadChunkBytes, false);
    }

    #[test]
    fn chunk_bytes_that_do_not_match_their_ids_honest_peer_present() {
        case(Lie::BadChunkBytes, true);
    }

    #[test]
    fn a_chunk_listed_with_a_wrong_length() {
        case(Lie::WrongChunkLength, false);
    }

    #[test]
    fn a_chunk_listed_with_a_wrong_length_honest_peer_present() {
        case(Lie::WrongChunkLength, true);
    }

    #[test]
    fn a_manifest_of_another_nar_size() {
        case(Lie::AnotherNarSize, false);
    }

    #[test]
    fn chunk_lengths_that_do_not_add_up() {
        case(Lie::LengthsDoNotAddUp, false);
    }

    #[test]
    fn a_compressed_chunk_that_expands_past_its_stated_size() {
        case(Lie::ZstdPastItsSize, false);
    }

    #[test]
    fn a_compressed_chunk_that_expands_past_its_stated_size_honest_peer_present() {
        case(Lie::ZstdPastItsSize, true);
    }

    #[test]
    fn a_delta_against_a_chunk_never_offered() {
        case(Lie::DeltaAgainstUnheld, false);
    }

    #[test]
    fn a_delta_against_a_chunk_never_offered_honest_peer_present() {
        case(Lie::DeltaAgainstUnheld, true);
    }
}
