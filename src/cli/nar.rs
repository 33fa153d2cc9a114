//! `peerix nar …`: NAR (Nix ARchive) tools.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

#[derive(clap::Subcommand, Debug)]
pub enum NarCommand {
    /// Write the NAR of PATH to stdout, byte-for-byte as `nix-store --dump PATH`.
    Dump { path: PathBuf },
}

pub fn run(cmd: &NarCommand) -> Result<()> {
    match cmd {
        NarCommand::Dump { path } => dump(path),
    }
}

fn dump(path: &Path) -> Result<()> {
    let stdout = std::io::stdout();
    // A large buffer: the NAR is written in big slices of file contents.
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    peerix_nix::nar::dump_path(path, &mut out)
        .with_context(|| format!("dumping {}", path.display()))?;
    out.flush().context("writing to stdout")?;
    Ok(())
}
