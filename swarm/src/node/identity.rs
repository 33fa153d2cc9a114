//! The node's identity on disk: its ed25519 key in the state directory, created on first
//! start and kept across restarts so the peer id stays the same, and the swarm key (pre-shared
//! key) of a private swarm. Apart from the rest because it is plain file handling, used before
//! any libp2p machinery exists.

use std::io;
use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

use super::NodeError;

const IDENTITY_FILE: &str = "identity.key";

/// Reads a swarm key in the usual `/key/swarm/psk/1.0.0/` text format (as go-ipfs writes it).
pub fn read_swarm_key(path: &Path) -> Result<PreSharedKey, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|source| NodeError::SwarmKeyIo {
        path: path.to_owned(),
        source,
    })?;
    text.trim()
        .parse::<PreSharedKey>()
        .map_err(|e| NodeError::SwarmKeyFormat {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// Loads the node's ed25519 key, creating it (readable by the owner only) on first start.
pub fn load_or_create_identity(state_dir: &Path) -> Result<Keypair, NodeError> {
    std::fs::create_dir_all(state_dir).map_err(|source| NodeError::StateDir {
        path: state_dir.to_owned(),
        source,
    })?;
    let path = state_dir.join(IDENTITY_FILE);
    let io_err = |source| NodeError::IdentityIo {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => {
            let key =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| NodeError::IdentityDecode {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if key.key_type() != libp2p::identity::KeyType::Ed25519 {
                return Err(NodeError::IdentityDecode {
                    path,
                    reason: format!("key type {:?}", key.key_type()),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| NodeError::IdentityDecode {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            write_private(&path, &bytes).map_err(io_err)?;
            tracing::info!(path = %path.display(), peer = %key.public().to_peer_id(), "created a new node identity");
            Ok(key)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Writes through a temporary file so a crash never leaves a truncated key behind, and creates
/// it with mode 0600 so the secret is never readable by others, not even briefly.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("key.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}
