//! flake.nix and the NixOS module, checked where no nixpkgs is available: every `.nix` file
//! parses, and every flag the module passes to `peerix serve` and `peerix seed` is one that the
//! command's `--help` lists.

mod common;

use std::path::Path;

fn nix_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

mod needs_nix {
    use super::*;

    #[test]
    fn every_nix_file_parses() {
        let nix = common::nix();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files = vec![];
        nix_files(root, &mut files);
        for must in ["flake.nix", "nixos/module.nix", "nixos/package.nix"] {
            assert!(files.contains(&root.join(must)), "{must} is missing");
        }
        for f in files {
            let out = nix.output("nix-instantiate", &["--parse", f.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{} does not parse: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The `"--flag"` string literals between two markers of the module's source.
fn flags_between(src: &str, start: &str, end: &str) -> Vec<String> {
    let a = src.find(start).expect("start marker");
    let b = a + src[a..].find(end).expect("end marker");
    let mut flags = vec![];
    for piece in src[a..b].split('"').skip(1).step_by(2) {
        if piece.starts_with("--")
            && piece[2..]
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            flags.push(piece.to_owned());
        }
    }
    flags
}

/// Every flag is one that `peerix COMMAND --help` lists.
fn assert_listed(command: &str, flags: &[String]) {
    let help = String::from_utf8(common::peerix_ok(&[command, "--help"])).unwrap();
    for f in flags {
        let listed = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
            .any(|w| w == f);
        assert!(
            listed,
            "the module passes {f}, which `peerix {command} --help` does not list"
        );
    }
}

#[test]
fn module_options_map_to_flags_that_exist() {
    let module =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos/module.nix"))
            .unwrap();
    let flags = flags_between(&module, "args =", "seedArgs =");
    assert!(flags.len() >= 15, "too few flags found: {flags:?}");
    assert_listed("serve", &flags);
    // The seed service's command line, against `peerix seed --help`.
    let flags = flags_between(&module, "seedArgs =", "ownPublicKeys =");
    assert!(flags.len() >= 6, "too few seed flags found: {flags:?}");
    assert_listed("seed", &flags);
    // Every option of the earlier peerix modules is still there.
    for opt in [
        "enable",
        "package",
        "openFirewall",
        "user",
        "group",
        "privateKeyFile",
        "publicKeyFile",
        "publicKey",
        "extraHosts",
        "disableBroadcast",
        "priority",
        "timeout",
        "upstreamCache",
        "scanInterval",
    ] {
        assert!(
            module.contains(&format!("\n    {opt} = mk")),
            "option services.peerix.{opt} is missing"
        );
    }
}
