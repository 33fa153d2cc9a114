//! nix-base32: Nix's own base-32 encoding (its alphabet omits e, o, u and t, and it reads the
//! bytes from the end), used for store-path hash parts and `sha256:` hashes in narinfo files.

use thiserror::Error;

/// The 32 digits, in value order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid nix-base32 character {0:?}")]
    InvalidChar(char),
    #[error("nix-base32 string has length {got}, expected {expected}")]
    BadLength { got: usize, expected: usize },
    #[error("nix-base32 string encodes more bits than fit in {0} bytes")]
    Overflow(usize),
}

/// Length of the nix-base32 encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n * 8 - 1) / 5 + 1
    }
}

/// Value of a nix-base32 digit.
pub fn digit_value(c: u8) -> Option<u8> {
    // A table would be faster but this is not on a hot path.
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let lo = bytes[i] >> j;
        let hi = if i + 1 < bytes.len() {
            // j can be up to 7, so the shift is at most 8 - 0 = 8 bits on a u16.
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// Decode a nix-base32 string into exactly `n` bytes.
pub fn decode_exact(s: &str, n: usize) -> Result<Vec<u8>, Base32Error> {
    let expected = encoded_len(n);
    if s.len() != expected {
        return Err(Base32Error::BadLength {
            got: s.len(),
            expected,
        });
    }
    let mut out = vec![0u8; n];
    let sb = s.as_bytes();
    for k in 0..expected {
        let c = sb[expected - k - 1];
        let digit = digit_value(c).ok_or_else(|| Base32Error::InvalidChar(char::from(c)))?;
        let b = k * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= ((digit as u16) << j) as u8;
        let carry = ((digit as u16) >> (8 - j)) as u8;
        if i + 1 < n {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Base32Error::Overflow(n));
        }
    }
    Ok(out)
}

/// Decode into a fixed-size array.
pub fn decode_array<const N: usize>(s: &str) -> Result<[u8; N], Base32Error> {
    let v = decode_exact(s, N)?;
    let mut a = [0u8; N];
    a.copy_from_slice(&v);
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vector() {
        // sha256("") as Nix prints it: `nix hash to-base32 sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=`
        let h = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        let s = encode(&h);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode_array::<32>(&s).unwrap(), h);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            decode_exact("e", 1),
            Err(Base32Error::BadLength { .. })
        ));
        assert_eq!(decode_exact("0e", 1), Err(Base32Error::InvalidChar('e')));
        // 2 digits hold 10 bits; the top two must be zero for a single byte.
        assert_eq!(decode_exact("z0", 1), Err(Base32Error::Overflow(1)));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = encode(&bytes);
            prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode_exact(&s, bytes.len()).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,60}", n in 0usize..40) {
            let _ = decode_exact(&s, n);
        }
    }
}
