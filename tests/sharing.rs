//! The default sharing rule end to end, with a static binary cache on loopback standing in for
//! the upstream cache: a path whose NarHash equals upstream's is shared and trusted (upstream's
//! signatures handed on to Nix); a path upstream lacks, or holds with another NarHash, is
//! neither shared by the node that has it nor accepted by the node that asks for it.

mod common;

use common::{http, Daemon, Nix};

fn hash_part(path: &str) -> &str {
    &path.trim_start_matches("/nix/store/")[..32]
}

/// The derivations of these tests. `public` (with its dependency `public-dep`) builds the same
/// bytes everywhere; `differs` writes a random UUID, so every store that builds it gets the
/// same store path with another NarHash; `private` is only ever built by the peer.
fn expr(salt: &str, which: &str) -> String {
    format!(
        r#"let
  mk = name: script: builtins.derivation {{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" script ]; salt = "{salt}";
  }};
  public-dep = mk "public-dep" "echo dependency > $out";
  public = mk "public" "/bin/mkdir $out; echo ${{public-dep}} > $out/dep";
  differs = mk "differs" "/bin/cat /proc/sys/kernel/random/uuid > $out";
  private = mk "private" "echo private > $out";
in {which}"#
    )
}

/// What both tests start from.
struct Setup {
    // Holds the upstream cache directory.
    _up_nix: Nix,
    a_nix: Nix,
    b_nix: Nix,
    upstream: common::HttpServer,
    up_dir: std::path::PathBuf,
    up_key: String,
    public: String,
    public_dep: String,
    differs: String,
    private: String,
}

/// The upstream cache: `public`'s closure and `differs` as built in a store of its own, signed
/// by an upstream key, written by `nix copy --to file://…` and served over HTTP. A's store:
/// the same `public` closure (built locally, so without upstream's signature), its own build of
/// `differs`, and `private`.
fn setup(salt: &str) -> Setup {
    let up_nix = common::nix();
    let a_nix = common::nix();
    let b_nix = common::nix();
    let up_built = up_nix.build(&expr(salt, "[ public public-dep differs ]"));
    let a_built = a_nix.build(&expr(salt, "[ public public-dep differs private ]"));
    assert_eq!(
        up_built[..],
        a_built[..3],
        "the same derivations, the same store paths"
    );
    let [public, public_dep, differs, private] = <[String; 4]>::try_from(a_built).unwrap();

    let up_hashes = up_nix.nar_hashes(&up_built);
    let a_hashes = a_nix.nar_hashes(&[public.clone(), public_dep.clone(), differs.clone()]);
    assert_eq!(up_hashes[&public], a_hashes[&public]);
    assert_eq!(up_hashes[&public_dep], a_hashes[&public_dep]);
    assert_ne!(
        up_hashes[&differs], a_hashes[&differs],
        "the random builder gave both stores the same bytes"
    );

    let (up_sk, up_key) = up_nix.keys("upstream-1");
    let dir = up_nix.scratch("upstream-cache");
    let to = format!(
        "file://{}?compression=xz&secret-key={}",
        dir.display(),
        up_sk.display()
    );
    let store = up_nix.store_arg();
    let mut args = vec!["copy", "--store", &store, "--to", &to];
    args.extend(up_built.iter().map(String::as_str));
    up_nix.run("nix", &args);
    for p in &up_built {
        assert!(dir.join(format!("{}.narinfo", hash_part(p))).exists());
    }
    let upstream = common::serve_dir(&dir);
    b_nix.init_store();
    Setup {
        _up_nix: up_nix,
        a_nix,
        b_nix,
        upstream,
        up_dir: dir,
        up_key,
        public,
        public_dep,
        differs,
        private,
    }
}

/// Start A (no key of its own, so only the upstream rule can share anything) and B (no key,
/// no trusted keys: only upstream can vouch for what A offers), both checking `upstream`.
fn start(s: &Setup, a_extra: &[&str]) -> (Daemon, Daemon) {
    let up = s.upstream.url.as_str();
    let mut a_args = vec!["--upstream-cache", up];
    a_args.extend_from_slice(a_extra);
    let a = Daemon::start("A", &s.a_nix, &a_args);
    let b_args = ["--upstream-cache", up, "--timeout", "1", "--peer", &a.p2p];
    let mut b = Daemon::start("B", &s.b_nix, &b_args);
    b.wait_peer(&a);
    (a, b)
}

/// A's answers to a lookup over the peer protocol, from a probe node of our own.
fn lookup_at(a: &Daemon, scratch: std::path::PathBuf, paths: &[&str]) -> Vec<String> {
    let a_peer: peerix_swarm::PeerId = a.peer_id.parse().unwrap();
    let a_addr: peerix_swarm::Multiaddr = a.p2p.parse().unwrap();
    let hashes: Vec<peerix_nix::StorePathHash> = paths
        .iter()
        .map(|p| hash_part(p).parse().unwrap())
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut cfg = peerix_swarm::NodeConfig::new(scratch);
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        cfg.mdns = false;
        let node = peerix_swarm::Node::start(cfg).await.unwrap();
        node.dial(a_addr).await.unwrap();
        let client = peerix_swarm::Client::new(node.stream_control());
        let found = client.lookup(a_peer, &hashes).await.unwrap();
        node.shutdown().await;
        let mut v: Vec<String> = found.iter().map(|n| n.store_path.to_string()).collect();
        v.sort();
        v
    })
}

/// What Nix in B's store says the path's signatures are.
fn sigs(nix: &Nix, path: &str) -> Vec<String> {
    let j = nix.path_info_json(&[path]);
    j[0]["signatures"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

mod needs_nix {
    use super::*;

    #[test]
    fn paths_with_upstreams_nar_hash_are_shared_and_carry_upstreams_signatures() {
        let s = setup("sharing-a");
        let (mut a, b) = start(&s, &[]);
        // A's store also holds the .drv files; of all of it only the public closure is upstream's.
        assert_eq!(a.wait_scan(), 2, "A shares exactly the public closure");

        // Over the peer protocol A answers for the public closure only.
        let mut want = vec![s.public.clone(), s.public_dep.clone()];
        want.sort();
        let got = lookup_at(
            &a,
            s.b_nix.scratch("probe-1"),
            &[&s.public, &s.public_dep, &s.differs, &s.private],
        );
        assert_eq!(
            got, want,
            "A answered lookups for what upstream does not vouch for"
        );

        // B's Nix trusts the upstream key and nothing else, and gets the public closure via B
        // (the upstream cache is not among its substituters).
        let out = s.b_nix.realise(&s.public, &b.url(), &s.up_key);
        assert!(
            out.status.success(),
            "Nix could not substitute the public path via B: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let both = [s.public.clone(), s.public_dep.clone()];
        assert_eq!(s.b_nix.nar_hashes(&both), s.a_nix.nar_hashes(&both));
        // The signature Nix recorded is upstream's own (from the narinfo in the upstream cache),
        // handed on unchanged.
        let up_narinfo =
            std::fs::read_to_string(s.up_dir.join(format!("{}.narinfo", hash_part(&s.public))))
                .unwrap();
        let up_sigs: Vec<String> = up_narinfo
            .lines()
            .filter_map(|l| l.strip_prefix("Sig: "))
            .map(str::to_owned)
            .collect();
        assert!(
            up_sigs.iter().any(|g| g.starts_with("upstream-1:")),
            "{up_sigs:?}"
        );
        let b_sigs = sigs(&s.b_nix, &s.public);
        let handed_on: Vec<&String> = b_sigs
            .iter()
            .filter(|g| g.starts_with("upstream-1:"))
            .collect();
        assert!(
            !handed_on.is_empty() && handed_on.iter().all(|g| up_sigs.contains(g)),
            "B's Nix holds {b_sigs:?}, upstream signed {up_sigs:?}"
        );

        // Neither the path upstream lacks nor the one upstream holds with another NarHash.
        for p in [&s.private, &s.differs] {
            let (status, body) = http(&b.http, "GET", &format!("/{}.narinfo", hash_part(p)));
            assert_eq!(
                status,
                404,
                "B served {p}: {}",
                String::from_utf8_lossy(&body)
            );
            let out = s.b_nix.realise(p, &b.url(), &s.up_key);
            assert!(!out.status.success(), "Nix got {p} via B");
        }
    }

    /// A shares everything it holds (`--share-all`), but B accepts from an untrusted peer only
    /// what upstream vouches for: the public closure, not the path upstream lacks, and not the
    /// path whose NarHash is not upstream's.
    #[test]
    fn a_peer_sharing_everything_gets_only_upstreams_paths_accepted() {
        let s = setup("sharing-b");
        let (mut a, b) = start(&s, &["--share-all"]);
        assert!(a.wait_scan() >= 4);
        let mut want = vec![s.differs.clone(), s.private.clone(), s.public.clone()];
        want.sort();
        let got = lookup_at(
            &a,
            s.b_nix.scratch("probe-2"),
            &[&s.public, &s.differs, &s.private],
        );
        assert_eq!(got, want, "A shares all it holds");

        let (status, body) = http(
            &b.http,
            "GET",
            &format!("/{}.narinfo", hash_part(&s.public)),
        );
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("Sig: upstream-1:"), "{text}");
        for p in [&s.private, &s.differs] {
            let (status, body) = http(&b.http, "GET", &format!("/{}.narinfo", hash_part(p)));
            assert_eq!(
                status,
                404,
                "B accepted {p}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let out = s.b_nix.realise(&s.differs, &b.url(), &s.up_key);
        assert!(!out.status.success(), "Nix got A's build of the path via B");
    }
}
