//! Key files and `Sig:` strings: parsing never panics, what parses prints back to something
//! that parses to the same value, and a parsed secret key signs what its public key verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix_nix::{PublicKey, SecretKey, Signature};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sig) = s.parse::<Signature>() {
        assert_eq!(sig.to_string(), s);
        assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
    }
    if let Ok(k) = s.parse::<PublicKey>() {
        let again: PublicKey = k.to_string().parse().expect("a rendered public key parses");
        assert_eq!(again, k);
        let sig = Signature {
            name: k.name().to_owned(),
            bytes: [0; 64],
        };
        assert!(!k.verify(b"msg", &sig));
    }
    if let Ok(k) = s.parse::<SecretKey>() {
        let again: SecretKey = k.to_string().parse().expect("a rendered secret key parses");
        assert_eq!(again.public_key(), k.public_key());
        let sig = k.sign(b"fingerprint");
        assert!(k.public_key().verify(b"fingerprint", &sig));
        assert!(!k.public_key().verify(b"another", &sig));
    }
});
