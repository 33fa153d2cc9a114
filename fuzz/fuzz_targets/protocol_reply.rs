//! What a requester reads back from a peer: frames and every reply type (lookup replies with
//! their narinfos, manifest replies, have replies, chunks, refusals). Never a panic; what
//! decodes is within bounds and encodes back to a frame that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_chunkstore::MAX_CHUNK;
use peerix_nix::{NarInfo, Sha256Hash};
use peerix_swarm::compress;
use peerix_swarm::protocol::{self, read_frame, Frame, Kind, MAX_LOOKUP};

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
    if let Ok(infos) = protocol::decode_lookup_reply(f) {
        assert!(infos.len() <= MAX_LOOKUP);
        let rendered: Vec<String> = infos.iter().map(NarInfo::render).collect();
        let (body, n) = protocol::encode_lookup_reply(&rendered);
        assert_eq!(n, infos.len());
        let again = protocol::decode_lookup_reply(&Frame {
            kind: Kind::LookupReply,
            body,
        })
        .expect("an encoded lookup reply decodes");
        assert_eq!(again, infos);
    }
    // The requester checks the manifest is for the NAR it asked about: take the hash the
    // reply names, so that check passes and the manifest itself is decoded.
    let asked = Sha256Hash(
        f.body
            .get(1..33)
            .and_then(|h| h.try_into().ok())
            .unwrap_or([0; 32]),
    );
    if let Ok(m) = protocol::decode_manifest_reply(f, &asked) {
        let body = protocol::encode_manifest_reply(m.as_ref()).expect("it fitted before");
        assert_eq!(body, f.body);
        if let Some(m) = m {
            m.validate().expect("a decoded manifest is valid");
        }
    }
    if let Ok(h) = protocol::decode_have_reply(f, n_chunks, n_nars) {
        assert_eq!((h.chunks.len(), h.nars.len()), (n_chunks, n_nars));
        let again = protocol::decode_have_reply(
            &Frame {
                kind: Kind::HaveReply,
                body: protocol::encode_have_reply(&h),
            },
            n_chunks,
            n_nars,
        )
        .expect("an encoded have reply decodes");
        assert_eq!(again, h);
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
    let _ = protocol::refusal(f);
}
