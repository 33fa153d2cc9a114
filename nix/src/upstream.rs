//! Client for an upstream HTTP binary cache (https://cache.nixos.org by default).
