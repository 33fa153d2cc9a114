//! Store paths, store path hashes and NarHashes as they come in HTTP requests, narinfos and
//! the admin socket: parsing never panics and what parses prints back to the same string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_nix::{base32, Sha256Hash, StorePath, StorePathHash};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = StorePath::from_full_path(s) {
        assert_eq!(p.to_full_path(), s);
        assert_eq!(StorePath::from_base_name(p.base_name()).unwrap(), p);
        assert_eq!(p.to_string(), s);
    }
    if let Ok(p) = StorePath::from_base_name(s) {
        assert_eq!(p.base_name(), s);
        assert_eq!(p.hash_str(), &s[..32]);
        assert_eq!(p.hash().to_string(), p.hash_str());
    }
    if let Ok(p) = StorePath::from_path_prefix(s) {
        assert!(s.starts_with(&p.to_full_path()));
    }
    if let Ok(h) = s.parse::<StorePathHash>() {
        assert_eq!(h.to_string(), s);
    }
    if let Ok(h) = s.parse::<Sha256Hash>() {
        // Accepted in several spellings; each renders to the canonical one, which parses back.
        assert_eq!(h.to_nix_string().parse::<Sha256Hash>().unwrap(), h);
        assert_eq!(h.to_sri().parse::<Sha256Hash>().unwrap(), h);
    }
    if let Ok(b) = base32::decode_array::<32>(s) {
        assert_eq!(base32::encode(&b), s);
    }
});
