//! `peerix nar dump` against real Nix: the same bytes as `nix-store --dump`. The NAR module
//! itself is tested against Nix beside it (nix/tests/nar.rs).

mod common;

mod needs_nix {
    use super::*;

    use peerix_test_support::fixtures::{assert_same_nar, awkward_tree};

    #[test]
    fn peerix_nar_dump_cli_equals_nix_store_dump() {
        let nix = common::nix();
        let tree = nix.scratch("cli").join("tree");
        awkward_tree(&tree);
        for p in [tree.clone(), tree.join("nested"), tree.join("exec")] {
            let ours = common::peerix_ok(&["nar", "dump", p.to_str().unwrap()]);
            assert_same_nar(&ours, &nix.dump(&p), "peerix nar dump");
        }
        let out = common::peerix()
            .args(["nar", "dump", "/nonexistent/peerix-test"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/peerix-test"));
    }
}
