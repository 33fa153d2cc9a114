//! flake.nix and the NixOS module, checked where no nixpkgs is available: every `.nix` file
//! parses, every flag the module passes to `peerix serve` and `peerix seed` is one that the
//! command's `--help` lists, and the module evaluated with nixpkgs' lib (carried in
//! tests/data/nixpkgs-lib) asserts what it must and runs what it should.

mod common;

use std::path::Path;

use common::Nix;

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

    #[test]
    fn the_module_refuses_key_files_given_as_nix_paths() {
        let nix = common::nix();
        // As a configuration next to its key would say `./peerix.sec`.
        let dir = nix.scratch("config");
        for f in ["peerix.sec", "swarm.key"] {
            std::fs::write(dir.join(f), "not-a-real-key").unwrap();
        }
        let (sec, swarm) = (dir.join("peerix.sec"), dir.join("swarm.key"));
        let (sec, swarm) = (sec.display(), swarm.display());

        let v = eval_module(
            &nix,
            &format!("{{ services.peerix = {{ enable = true; privateKeyFile = {sec}; }}; }}"),
        );
        let failed = failed_assertions(&v);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].contains("services.peerix.privateKeyFile is a Nix path")
                && failed[0].contains("copied into the Nix store")
                && failed[0].contains(
                    r#"services.peerix.privateKeyFile = "/var/lib/peerix-keys/peerix.sec";"#
                ),
            "the message names the option, the danger and the string form: {}",
            failed[0]
        );

        let v = eval_module(
            &nix,
            &format!("{{ services.peerix = {{ enable = true; swarmKeyFile = {swarm}; }}; }}"),
        );
        let failed = failed_assertions(&v);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].contains("services.peerix.swarmKeyFile is a Nix path"),
            "{}",
            failed[0]
        );

        // A string that already points into the store (`"${./peerix.sec}"`) is refused too.
        let v = eval_module(
            &nix,
            "{ services.peerix = { enable = true; \
             privateKeyFile = \"/nix/store/00000000000000000000000000000000-peerix.sec\"; }; }",
        );
        let failed = failed_assertions(&v);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].contains("services.peerix.privateKeyFile is in the Nix store"),
            "{}",
            failed[0]
        );

        // The string form passes, and the key reaches the daemon as a credential from where it is.
        let v = eval_module(
            &nix,
            &format!(
                "{{ services.peerix = {{ enable = true; privateKeyFile = \"{sec}\"; \
                 swarmKeyFile = \"{swarm}\"; }}; }}"
            ),
        );
        assert_eq!(failed_assertions(&v), Vec::<String>::new());
        let serve = v["execStart"]["peerix"].as_str().unwrap();
        assert!(
            serve.contains("--private-key %d/peerix.sec")
                && serve.contains("--swarm-key %d/swarm.key"),
            "{serve}"
        );
        // Without keys nothing is asserted against.
        let v = eval_module(&nix, "{ services.peerix.enable = true; }");
        assert_eq!(failed_assertions(&v), Vec::<String>::new());
    }

    #[test]
    fn the_seed_service_shares_private_paths_only_when_asked() {
        let nix = common::nix();
        let base = r#"enable = true; seed = [ "/run/current-system" ]; trustedKeys = [ "builder-1:AAAA" ];"#;
        let v = eval_module(&nix, &format!("{{ services.peerix = {{ {base} }}; }}"));
        let seed = v["execStart"]["peerix-seed"].as_str().unwrap();
        assert!(seed.contains(" seed "), "{seed}");
        assert!(
            !seed.contains("--share-private-paths"),
            "not asked for, not passed: {seed}"
        );
        assert!(seed.contains("--closure-of /run/current-system"), "{seed}");
        // What the builder signed is seeded without the flag, also when no daemon runs.
        assert!(seed.contains("--trusted-key builder-1:AAAA"), "{seed}");

        let v = eval_module(
            &nix,
            &format!("{{ services.peerix = {{ {base} seedSharePrivatePaths = true; }}; }}"),
        );
        let seed = v["execStart"]["peerix-seed"].as_str().unwrap();
        assert!(seed.contains(" --share-private-paths "), "{seed}");
        let serve = v["execStart"]["peerix"].as_str().unwrap();
        assert!(
            !serve.contains("--share-private-paths"),
            "a seed's flag, not the daemon's: {serve}"
        );

        // No seed, no seed service.
        let v = eval_module(&nix, "{ services.peerix.enable = true; }");
        assert!(v["execStart"].get("peerix-seed").is_none(), "{v}");
    }

    /// ProtectSystem=strict leaves only StateDirectory writable: a state directory elsewhere
    /// must be made, owned by the daemon's user, and writable, or the daemon crash-loops.
    #[test]
    fn a_custom_state_dir_is_made_and_writable() {
        let nix = common::nix();
        let v = eval_module(&nix, "{ services.peerix.enable = true; }");
        let sc = &v["serviceConfig"]["peerix"];
        assert_eq!(sc["StateDirectory"], "peerix", "{sc}");
        assert_eq!(v["tmpfiles"], serde_json::json!([]));
        // Hardened as the README says: its own user, the store read-only, no new privileges,
        // restarted on failure.
        assert_eq!(sc["User"], "peerix");
        assert_eq!(
            sc["ReadOnlyPaths"],
            serde_json::json!(["/nix/store", "/nix/var/nix/db"])
        );
        assert_eq!(sc["NoNewPrivileges"], true);
        assert_eq!(sc["Restart"], "on-failure");
        assert_eq!(sc["CapabilityBoundingSet"], "");

        let v = eval_module(
            &nix,
            r#"{ services.peerix = { enable = true; stateDir = "/srv/peerix"; }; }"#,
        );
        let sc = &v["serviceConfig"]["peerix"];
        assert!(sc.get("StateDirectory").is_none(), "{sc}");
        assert_eq!(sc["ProtectSystem"], "strict");
        assert_eq!(
            sc["ReadWritePaths"],
            serde_json::json!(["/srv/peerix"]),
            "{sc}"
        );
        assert_eq!(
            v["tmpfiles"],
            serde_json::json!(["d /srv/peerix 0700 peerix peerix -"])
        );
        assert!(v["execStart"]["peerix"]
            .as_str()
            .unwrap()
            .contains("--state-dir /srv/peerix"));
    }

    /// Configurations as users of the two earlier peerix modules wrote them: they evaluate, and
    /// what they asked for is what the service runs, what Nix is told and what the firewall opens.
    mod earlier_modules {
        use super::*;

        fn serve_line(v: &serde_json::Value) -> String {
            v["execStart"]["peerix"].as_str().unwrap().to_owned()
        }

        fn warnings(v: &serde_json::Value) -> String {
            v["warnings"].to_string()
        }

        /// The Iroh-based peerix with a tracker of one's own, LAN discovery on top, its defaults
        /// written out (priority 5, timeout 10, scans off) and Nix's narinfo TTL set.
        #[test]
        fn an_iroh_peerix_configuration_with_a_tracker() {
            let nix = common::nix();
            let v = eval_module(
                &nix,
                r#"{ services.peerix = {
                enable = true;
                openFirewall = true;
                trackerUrl = "https://tracker.example.org:12305/peerix";
                filterMode = "nixpkgs";
                filterConcurrency = 4;
                noFilter = false;
                lanDiscovery = true;
                upstreamCache = "https://cache.nixos.org";
                priority = 5;
                timeout = 10.0;
                scanInterval = 0;
                globalCacheTTL = 300;
                privateKeyFile = "/var/lib/peerix-keys/cache-priv-key.pem";
                publicKey = "myhost:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
              }; }"#,
            );
            assert_eq!(failed_assertions(&v), Vec::<String>::new());
            let serve = serve_line(&v);
            for want in [
                " --peer tracker.example.org:12305",
                " --priority 5 ",
                " --timeout 10.000000 ",
                " --scan-interval 0 ",
                " --upstream-concurrency 4 ",
                " --wire-compression auto ",
                " --upstream-cache https://cache.nixos.org ",
                " --private-key %d/peerix.sec",
            ] {
                assert!(serve.contains(want), "{want} missing: {serve}");
            }
            // filterMode "nixpkgs" and noFilter = false are peerix's default; LAN discovery is mDNS.
            assert!(!serve.contains("--share-all"), "{serve}");
            assert!(!serve.contains("--no-mdns"), "{serve}");
            assert!(!serve.contains("--no-deltas"), "{serve}");
            let w = warnings(&v);
            for opt in [
                "trackerUrl",
                "filterMode",
                "filterConcurrency",
                "noFilter",
                "lanDiscovery",
            ] {
                assert!(
                    w.contains(&format!("services.peerix.{opt}'")),
                    "no warning for {opt}: {w}"
                );
            }
            assert!(
                w.contains("renamed to `services.peerix.upstreamConcurrency'"),
                "{w}"
            );
            let ns = &v["nixSettings"];
            assert_eq!(
                ns["extra-substituters"],
                serde_json::json!(["http://127.0.0.1:12304"])
            );
            assert_eq!(
                ns["extra-trusted-public-keys"],
                serde_json::json!(["myhost:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])
            );
            assert_eq!(ns["narinfo-cache-negative-ttl"], 300);
            assert_eq!(ns["narinfo-cache-positive-ttl"], 300);
            assert_eq!(ns["fallback"], true);
            assert_eq!(
                v["firewall"],
                serde_json::json!({ "allowedTCPPorts": [12305], "allowedUDPPorts": [12305, 5353] })
            );
        }

        /// The Iroh-based peerix in LAN mode (no tracker) with the heuristic filter: everything not
        /// system-specific is shared (shareAll; peerix's deny list is that heuristic), no LAN
        /// discovery asked for.
        #[test]
        fn an_iroh_peerix_configuration_without_a_tracker() {
            let nix = common::nix();
            let v = eval_module(
                &nix,
                r#"{ services.peerix = {
                enable = true;
                trackerUrl = null;
                filterMode = "rules";
                lanDiscovery = false;
                openFirewall = false;
              }; }"#,
            );
            assert_eq!(failed_assertions(&v), Vec::<String>::new());
            let serve = serve_line(&v);
            assert!(serve.contains(" --share-all"), "{serve}");
            assert!(serve.contains(" --no-mdns"), "{serve}");
            assert!(!serve.contains("--peer "), "no tracker, no peer: {serve}");
            // Left at peerix's own defaults.
            assert!(serve.contains(" --priority 30 ") && serve.contains(" --scan-interval 600 "));
            assert_eq!(v["firewall"], serde_json::json!({}));
            assert_eq!(v["nixSettings"]["narinfo-cache-negative-ttl"], 60);
            assert!(v["nixSettings"].get("narinfo-cache-positive-ttl").is_none());

            // noFilter = true: every package, unfiltered.
            let v = eval_module(
                &nix,
                r#"{ services.peerix = { enable = true; noFilter = true; }; }"#,
            );
            assert!(serve_line(&v).contains(" --share-all"));
        }

        /// noVerify and allowInsecureHttp have no meaning in peerix: the configuration still
        /// switches (no failed assertion), and the warnings say what to do instead.
        #[test]
        fn iroh_options_peerix_has_no_use_for_say_what_replaces_them() {
            let nix = common::nix();
            let v = eval_module(
                &nix,
                r#"{ services.peerix = { enable = true; noVerify = true; allowInsecureHttp = true; }; }"#,
            );
            assert_eq!(failed_assertions(&v), Vec::<String>::new());
            let w = warnings(&v);
            assert!(
                w.contains("services.peerix.noVerify has no effect") && w.contains("trustedKeys"),
                "{w}"
            );
            assert!(
                w.contains("services.peerix.allowInsecureHttp has no effect")
                    && w.contains("http://"),
                "{w}"
            );
            assert!(serve_line(&v).contains(" serve "));
        }

        /// The first peerix (UDP broadcast, hosts by name, key files beside the configuration).
        #[test]
        fn a_first_peerix_configuration() {
            let nix = common::nix();
            let dir = nix.scratch("secrets");
            std::fs::write(dir.join("peerix-public"), "laptop-1:BBBB=\n").unwrap();
            let public = dir.join("peerix-public");
            let v = eval_module(
                &nix,
                &format!(
                    r#"{{
                  services.peerix = {{
                    enable = true;
                    openFirewall = true;
                    privateKeyFile = "/var/lib/peerix-keys/peerix-private";
                    publicKeyFile = {};
                    user = "peerix";
                    group = "peerix";
                    disableBroadcast = true;
                    extraHosts = [ "asus" "msi" "10.0.0.9:4000" ];
                    bootstrap = [ "/ip4/203.0.113.5/tcp/12305/p2p/12D3KooWHZjUZLmsKDtRDUqYbRGgGoHWhLbFDmG5peDLhfb2CPo7" ];
                    maxUploadRate = "2MiB";
                    relay.maxCircuitBytes = "1MiB";
                    globalCacheTTL = 10;
                  }};
                  users.users.peerix = {{ isSystemUser = true; group = "peerix"; }};
                  users.groups.peerix = {{ }};
                }}"#,
                    public.display()
                ),
            );
            assert_eq!(failed_assertions(&v), Vec::<String>::new());
            assert_eq!(v["warnings"], serde_json::json!([]));
            let serve = serve_line(&v);
            for want in [
                " --peer asus:12305 --peer msi:12305 --peer 10.0.0.9:4000",
                " --bootstrap /ip4/203.0.113.5/tcp/12305/p2p/12D3KooWHZjUZLmsKDtRDUqYbRGgGoHWhLbFDmG5peDLhfb2CPo7",
                " --no-mdns",
                " --max-upload-rate 2MiB",
                " --relay-circuits 16 --relay-circuit-bytes 1MiB --relay-circuit-duration 120",
            ] {
                assert!(serve.contains(want), "{want} missing: {serve}");
            }
            let ns = &v["nixSettings"];
            assert_eq!(
                ns["extra-trusted-public-keys"],
                serde_json::json!(["laptop-1:BBBB="])
            );
            assert_eq!(ns["narinfo-cache-positive-ttl"], 10);
            assert_eq!(ns["narinfo-cache-negative-ttl"], 10);
            // No broadcast, so no mDNS port.
            assert_eq!(
                v["firewall"],
                serde_json::json!({ "allowedTCPPorts": [12305], "allowedUDPPorts": [12305] })
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

/// `nixos/module.nix` evaluated with `config` (a Nix attrset) by tests/data/eval-module.nix:
/// `failedAssertions` (messages) and `execStart` (by service). Read-only: nothing is written to
/// any store, so a Nix path in `config` is never copied.
fn eval_module(nix: &Nix, config: &str) -> serde_json::Value {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eval-module.nix");
    let expr = format!("import {} {{ config = {config}; }}", data.display());
    let out = nix.output(
        "nix-instantiate",
        &[
            "--readonly-mode",
            "--eval",
            "--strict",
            "--json",
            "--expr",
            &expr,
        ],
    );
    assert!(
        out.status.success(),
        "evaluating the module with {config} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn failed_assertions(v: &serde_json::Value) -> Vec<String> {
    v["failedAssertions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}
