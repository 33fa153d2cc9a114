//! libp2p discovery, the peer protocol and the multi-peer downloader. Built in its own issue.
