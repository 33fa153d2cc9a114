//! Content-defined chunk store (FastCDC chunks addressed by BLAKE3, indexed in sled). Built in its own issue.
