//! `.narinfo` text from a peer or the upstream cache: parse never panics, and whatever parses
//! renders to text that parses back to the same narinfo (and renders identically again).
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_nix::{NarInfo, PublicKey};

const KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

fuzz_target!(|data: &[u8]| {
    let Ok(info) = NarInfo::parse_bytes(data) else {
        return;
    };
    assert!(info.nar_size > 0);
    assert!(info.references.len() <= NarInfo::MAX_LIST);
    assert!(info.sigs.len() <= NarInfo::MAX_LIST);
    let text = info.render();
    let again = NarInfo::parse(&text).expect("a rendered narinfo parses");
    assert_eq!(again, info);
    assert_eq!(again.render(), text);
    let _ = info.fingerprint();
    // Verification is the expensive part; a few signatures are enough to exercise it.
    if info.sigs.len() <= 4 {
        let key: PublicKey = KEY.parse().expect("key");
        let _ = info.verified_by(std::slice::from_ref(&key));
    }
});
