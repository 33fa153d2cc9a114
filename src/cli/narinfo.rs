//! `peerix narinfo`: the narinfo peerix would serve for a path in the local store.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use peerix_nix::{LocalStore, NarInfo, SecretKey, StorePath};

#[derive(clap::Args, Debug)]
pub struct NarinfoArgs {
    /// A store path (`/nix/store/<hash>-<name>`, or a path inside one).
    pub store_path: String,
    /// Root of the local Nix store: `/`, or a chroot store's root as in `nix --store ROOT`.
    #[arg(long, default_value = "/")]
    pub store: PathBuf,
    /// Sign the narinfo with this Nix secret key file.
    #[arg(long, value_name = "SECRET_FILE")]
    pub sign: Option<PathBuf>,
}

pub fn run(args: &NarinfoArgs) -> Result<()> {
    let (store_path, root, sign) = (&args.store_path, &args.store, args.sign.as_deref());
    let path = StorePath::from_path_prefix(store_path)
        .with_context(|| format!("{store_path} is not a store path"))?;
    let key = sign
        .map(|f| -> Result<SecretKey> {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading secret key {}", f.display()))?;
            text.parse()
                .with_context(|| format!("secret key {}", f.display()))
        })
        .transpose()?;
    let store = LocalStore::open(root)
        .with_context(|| format!("opening the Nix store at {}", root.display()))?;
    let Some(info) = store
        .query_path_info(&path)
        .with_context(|| format!("querying {path}"))?
    else {
        bail!("{path} is not valid in the store at {}", root.display());
    };
    let mut ni = NarInfo::for_uncompressed(&info);
    if let Some(key) = &key {
        ni.sign(key);
    }
    print!("{}", ni.render());
    Ok(())
}
