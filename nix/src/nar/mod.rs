//! The NAR (Nix ARchive) format: writing, its layout, and reading untrusted NARs.
