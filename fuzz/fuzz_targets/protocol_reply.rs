//! What a requester reads back from a peer: frames and every reply type (lookup replies with
//! their narinfos, manifest replies, have replies, chunks, refusals). Never a panic; what
//! decodes is within bounds and encodes back to a frame that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_chunkstore::{ChunkId, MAX_CHUNK};
use peerix_nix::{NarInfo, Sha256Hash};
use peerix_swarm::compress;
use peerix_swarm::protocol::{self, read_frame, Frame, Kind, Reply, Request, MAX_LOOKUP};

fuzz_target!(|data: &[u8]| {
    // The first two bytes are what the requester asked: how many chunks and NARs in a Have.
    let (n_chunks, n_nars, rest) = match data {
        [a, b, rest @ ..] => (usize::from(*a) * 4, usize::from(*b) % 32, rest),
        _ => return,
    };
    let mut r = futures::io::Cursor::new(rest);
    for _ in 0..8 {
        let Ok(f) = futures::executor::block_on(read_frame(&mut r)) else {
            return;
        };
        assert!(f.body.len() <= f.kind.max_body());
        check_reply(&f, n_chunks, n_nars);
    }
});

fn check_reply(f: &Frame, n_chunks: usize, n_nars: usize) {
    // What the requester asked: the paths the reply names (so that the check that it names
    // only those passes and the narinfos themselves are decoded), the NAR the manifest reply
    // names, and a Have of the counts the input's first bytes give.
    let mut paths = vec![];
    if f.kind == Kind::LookupReply {
        let mut rest = f.body.get(2..).unwrap_or_default();
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = (u32::from_be_bytes(*len) as usize).min(tail.len());
            if let Ok(info) = NarInfo::parse_bytes(&tail[..len]) {
                paths.push(info.store_path.hash());
            }
            rest = &tail[len..];
        }
    }
    let asked = Sha256Hash(
        f.body
            .get(1..33)
            .and_then(|h| h.try_into().ok())
            .unwrap_or([0; 32]),
    );
    let requests = [
        Request::Lookup(paths),
        Request::Manifest(asked),
        Request::Have {
            chunks: vec![ChunkId([0; 32]); n_chunks],
            nars: vec![asked; n_nars],
        },
    ];
    for req in &requests {
        let Ok(reply) = Reply::decode(f, req) else {
            continue;
        };
        match &reply {
            Reply::Lookup(infos) => assert!(infos.len() <= MAX_LOOKUP),
            Reply::Manifest(Some(m)) => m.validate().expect("a decoded manifest is valid"),
            Reply::Have(h) => assert_eq!((h.chunks.len(), h.nars.len()), (n_chunks, n_nars)),
            Reply::Manifest(None) | Reply::Refused(_) => {}
        }
        let (kind, body) = reply.encode();
        let again = Reply::decode(&Frame { kind, body }, req).expect("an encoded reply decodes");
        assert_eq!(again, reply);
    }
    if let Ok((id, body)) = protocol::decode_chunk(f.clone()) {
        assert_eq!(body.encoded_len() + 32, f.body.len());
        let raw_len = body.raw_len();
        assert!(raw_len.unwrap_or(0) <= MAX_CHUNK);
        // Decompression is bounded by the stated length, whatever the bytes; a delta is tried
        // against the frame's own bytes as its base.
        let prefix = f.body.clone();
        if let Ok(Some(r)) = compress::decode(id, body, Some(&prefix)) {
            assert_eq!(Some(r.chunk.data().len()), raw_len);
        }
    }
}
