//! `peerix keygen`: a binary-cache signing key pair, as `nix-store --generate-binary-cache-key`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use peerix_nix::SecretKey;

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// Key name, conventionally `HOSTNAME-1`; it prefixes every signature.
    pub name: String,
    /// Where to write the secret key (created with mode 0600; must not exist).
    pub secret_file: PathBuf,
    /// Where to write the public key, for Nix's `trusted-public-keys`.
    pub public_file: PathBuf,
}

pub fn run(args: &KeygenArgs) -> Result<()> {
    let (name, secret_file, public_file) = (&args.name, &args.secret_file, &args.public_file);
    use std::os::unix::fs::OpenOptionsExt;
    let key = SecretKey::generate(name).context("generating the key")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret_file)
        .with_context(|| format!("creating {}", secret_file.display()))?;
    f.write_all(key.to_string().as_bytes())
        .with_context(|| format!("writing {}", secret_file.display()))?;
    std::fs::write(public_file, key.public_key().to_string())
        .with_context(|| format!("writing {}", public_file.display()))?;
    Ok(())
}
