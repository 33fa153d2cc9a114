//! The read-only store reader against databases written by real Nix.
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::Nix;
use peerix_nix::store::StoreError;
use peerix_nix::{LocalStore, PathInfo, StorePath, StorePathHash};
use serde_json::Value;

fn sp(s: &str) -> StorePath {
    s.parse().unwrap()
}

fn sign(nix: &Nix, sk: &str, paths: &[&str]) {
    let s = nix.store_arg();
    let mut args = vec!["store", "sign", "--store", &s, "--key-file", sk];
    args.extend_from_slice(paths);
    nix.run("nix", &args);
}

fn tree(nix: &Nix, name: &str, content: &str) -> std::path::PathBuf {
    let t = nix.scratch(&format!("trees/{name}"));
    std::fs::write(t.join("file"), content).unwrap();
    std::fs::create_dir_all(t.join("sub")).unwrap();
    std::fs::write(t.join("sub/other"), "other").unwrap();
    t
}

fn str_set(v: Option<&Value>) -> BTreeSet<String> {
    v.map(|a| {
        a.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect()
    })
    .unwrap_or_default()
}

/// Every field Nix reports must equal ours; absent optional fields mean none/false/empty.
fn assert_agrees(ours: &PathInfo, nix: &Value) {
    let what = nix["path"].as_str().unwrap();
    assert_eq!(ours.path.to_string(), what);
    assert_eq!(
        ours.nar_hash.to_sri(),
        nix["narHash"].as_str().unwrap(),
        "{what}"
    );
    assert_eq!(ours.nar_size, nix["narSize"].as_u64().unwrap(), "{what}");
    let refs: BTreeSet<String> = ours.references.iter().map(|r| r.to_string()).collect();
    assert_eq!(refs, str_set(nix.get("references")), "{what}");
    assert_eq!(
        ours.deriver.as_ref().map(|d| d.to_string()),
        nix.get("deriver").map(|d| d.as_str().unwrap().to_owned()),
        "{what}"
    );
    assert_eq!(
        ours.registration_time,
        nix.get("registrationTime")
            .map(|t| t.as_i64().unwrap())
            .unwrap_or(0),
        "{what}"
    );
    assert_eq!(ours.sigs, str_set(nix.get("signatures")), "{what}");
    assert_eq!(
        ours.ca.as_deref(),
        nix.get("ca").map(|c| c.as_str().unwrap()),
        "{what}"
    );
    assert_eq!(
        ours.ultimate,
        nix.get("ultimate")
            .map(|u| u.as_bool().unwrap())
            .unwrap_or(false),
        "{what}"
    );
}

#[test]
fn missing_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalStore::open(dir.path()).err().expect("no database");
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    assert!(
        err.to_string().contains("nix/var/nix/db/db.sqlite"),
        "{err}"
    );
    // A file that is not a database is an error too, not a panic.
    let db = dir.path().join("nix/var/nix/db");
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(
        db.join("db.sqlite"),
        "not sqlite at all, just some text .....",
    )
    .unwrap();
    let err = LocalStore::open(dir.path()).err().expect("not a database");
    assert!(matches!(err, StoreError::Db { .. }), "{err}");
}

mod needs_nix {
    use super::*;

    #[test]
    fn agrees_with_nix_path_info_for_every_path() {
        let nix = common::nix();
        let built = nix.build_closure("local-store-agrees");
        let added = nix.add(&tree(&nix, "a", "content a"));
        let added2 = nix.add(&tree(&nix, "b", "content b"));
        let k1 = nix.keys("test-key-1").0.to_str().unwrap().to_owned();
        let k2 = nix.keys("test-key-2").0.to_str().unwrap().to_owned();
        sign(&nix, &k1, &[&built[0], &built[2], &added]);
        sign(&nix, &k2, &[&built[2]]);

        let s = nix.store_arg();
        let all: Value = serde_json::from_str(&nix.run(
            "nix",
            &["path-info", "--store", &s, "--all", "--json", "--sigs"],
        ))
        .unwrap();
        let all = all.as_array().unwrap();

        let store = LocalStore::open(&nix.store()).unwrap();
        let ours = store.valid_paths().unwrap();
        let theirs: Vec<StorePath> = all
            .iter()
            .map(|v| sp(v["path"].as_str().unwrap()))
            .collect();
        assert_eq!(
            ours.iter().collect::<BTreeSet<_>>(),
            theirs.iter().collect::<BTreeSet<_>>()
        );
        assert!(ours.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
        for p in [&built[0], &built[1], &built[2], &added, &added2] {
            assert!(ours.contains(&sp(p)), "{p} listed");
        }

        let mut seen = (false, false, false, false);
        for v in all {
            let path = sp(v["path"].as_str().unwrap());
            let info = store.query_path_info(&path).unwrap().expect("valid");
            assert_agrees(&info, v);
            let by_hash = store
                .query_path_info_by_hash(&path.hash())
                .unwrap()
                .unwrap();
            assert_eq!(by_hash, info);
            assert!(store.is_valid(&path).unwrap());
            // Make sure the interesting cases really occurred rather than all being empty.
            seen.0 |= info.sigs.len() == 2;
            seen.1 |= info.ca.is_some();
            seen.2 |= info.deriver.is_some() && info.ultimate;
            seen.3 |= info.references.contains(&info.path);
        }
        assert_eq!(
            seen,
            (true, true, true, true),
            "sigs2, ca, deriver+ultimate, self-ref"
        );
        assert!(store.real_path(&sp(&added)).join("sub/other").is_file());
    }

    #[test]
    fn closure_matches_nix_store_q_r() {
        let nix = common::nix();
        let built = nix.build_closure("local-store-closure");
        let other = nix.add(&tree(&nix, "c", "c"));
        let s = nix.store_arg();
        let store = LocalStore::open(&nix.store()).unwrap();
        for roots in [
            vec![built[0].as_str()],
            vec![built[1].as_str()],
            vec![built[2].as_str()],
            vec![built[1].as_str(), other.as_str()],
        ] {
            let mut args = vec!["--store", &s, "-qR"];
            args.extend_from_slice(&roots);
            let theirs: BTreeSet<StorePath> = nix.run("nix-store", &args).lines().map(sp).collect();
            let roots: Vec<StorePath> = roots.iter().map(|r| sp(r)).collect();
            assert_eq!(store.closure(&roots).unwrap(), theirs, "{roots:?}");
        }
        assert_eq!(store.closure(&[]).unwrap(), BTreeSet::new());
    }

    #[test]
    fn unknown_paths_are_absent() {
        let nix = common::nix();
        let added = nix.add(&tree(&nix, "d", "d"));
        let store = LocalStore::open(&nix.store()).unwrap();
        let unknown = sp("/nix/store/00000000000000000000000000000000-unknown");
        assert!(store.query_path_info(&unknown).unwrap().is_none());
        assert!(!store.is_valid(&unknown).unwrap());
        assert!(store
            .query_path_info_by_hash(&unknown.hash())
            .unwrap()
            .is_none());
        // Same hash as a valid path but another name: not that path.
        let renamed = StorePath::from_base_name(&format!("{}-other", sp(&added).hash())).unwrap();
        assert!(store.query_path_info(&renamed).unwrap().is_none());
        let h: StorePathHash = "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz".parse().unwrap();
        assert!(store.query_path_info_by_hash(&h).unwrap().is_none());
        match store.closure(&[sp(&added), unknown.clone()]) {
            Err(StoreError::NotValid { path }) => assert_eq!(path, unknown),
            other => panic!("closure of an unknown path: {other:?}"),
        }
    }

    /// Nix must be able to write while we hold the connection open and are in the middle of a
    /// read: we take no lock that blocks it.
    #[test]
    fn nix_writes_while_we_read() {
        let nix = common::nix();
        let first = nix.add(&tree(&nix, "e", "e"));
        nix.add(&tree(&nix, "f", "f"));
        let store = LocalStore::open(&nix.store()).unwrap();
        assert!(store.is_valid(&sp(&first)).unwrap());

        let mut added = None;
        let mut listed = Vec::new();
        store
            .for_each_valid_path(|p| {
                if added.is_none() {
                    // Our read transaction is open and its statement mid-way right now.
                    added = Some(nix.add(&tree(&nix, "g", "written during our read")));
                }
                listed.push(p);
            })
            .unwrap();
        let added = sp(&added.expect("nix-store --add ran"));
        // The read kept its snapshot; a new read sees Nix's write.
        assert!(!listed.contains(&added));
        assert!(store.is_valid(&added).unwrap());
        let info = store.query_path_info(&added).unwrap().unwrap();
        assert_agrees(&info, &nix.path_info_json(&[&added.to_string()])[0]);
        assert!(Path::new(&store.real_path(&added)).join("file").is_file());
    }
}
