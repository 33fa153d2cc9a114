//! What a server reads from any peer that opens a stream: frames and requests. Never a panic,
//! never a body larger than its type allows, and a request that decodes is within the
//! protocol's counts and encodes back to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_swarm::protocol::{self, read_frame, Request};

fuzz_target!(|data: &[u8]| {
    let mut r = futures::io::Cursor::new(data);
    // A peer may send several frames on a stream; a server reads one, but decoding a few in a
    // row covers the framing of the rest.
    for _ in 0..8 {
        let Ok(f) = futures::executor::block_on(read_frame(&mut r)) else {
            return;
        };
        assert!(f.body.len() <= f.kind.max_body());
        let Ok(req) = Request::decode(&f) else {
            continue;
        };
        req.check().expect("a decoded request is within bounds");
        assert_eq!(req.encode(), (f.kind, f.body.clone()));
        // The async reader agrees with decoding the frame.
        let mut framed = ((f.body.len() + 1) as u32).to_be_bytes().to_vec();
        framed.push(f.kind as u8);
        framed.extend_from_slice(&f.body);
        let mut c = futures::io::Cursor::new(framed);
        let again = futures::executor::block_on(protocol::read_request(&mut c)).unwrap();
        assert_eq!(again, req);
    }
});
