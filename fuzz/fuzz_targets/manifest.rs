//! A chunk manifest from a peer (or the index on disk): decoding never panics, allocates in
//! proportion to the input, and what decodes is valid and encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_chunkstore::Manifest;
use peerix_nix::Sha256Hash;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::decode(Sha256Hash([7; 32]), data) else {
        return;
    };
    m.validate().expect("a decoded manifest is valid");
    assert_eq!(m.encode(), data);
    let mut end = 0u64;
    for (off, c) in m.offsets() {
        assert_eq!(off, end);
        end += u64::from(c.len);
    }
    assert_eq!(end, m.nar_size);
});
