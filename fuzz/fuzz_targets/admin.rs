//! A request line on the admin socket: reading it stays within its bound, and parsing never
//! panics; what parses serializes back to JSON that parses to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix::admin::{read_line, Request};

fuzz_target!(|data: &[u8]| {
    let limit = 4096;
    let line = match futures::executor::block_on(read_line(data, limit)) {
        Ok(Some(l)) => l,
        _ => return,
    };
    assert!(line.len() as u64 <= limit && line.ends_with('\n'));
    let Ok(req) = serde_json::from_str::<Request>(&line) else {
        return;
    };
    let json = serde_json::to_string(&req).expect("serialize");
    let again: Request = serde_json::from_str(&json).expect("a serialized request parses");
    assert_eq!(serde_json::to_string(&again).unwrap(), json);
});
