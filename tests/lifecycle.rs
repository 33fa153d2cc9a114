//! A machine's life with real Nix and two daemons: a disk budget that holds while peers fill
//! the packs, a disk that fills up mid-download, and churn (substitutions, Nix garbage
//! collections, SIGKILLs at random moments) that must leave the store in budget and clean.

mod common;

use std::path::Path;
use std::time::Instant;

use common::pair::{pair_with, sign, Pair};
use common::{http, noise, Nix};

/// Version `version` of a package `name`: a few MiB of which each version changes one part, as
/// a release changes some files of a package and keeps the rest.
fn add_version(nix: &Nix, key: &Path, name: &str, seed: u64, version: u64, mib: usize) -> String {
    let tree = nix.scratch(&format!("{name}-{version}"));
    let mut blob = noise(mib << 20, seed);
    let patch = noise(256 << 10, seed ^ (version + 1).wrapping_mul(0x9e37_79b9));
    let at = (version as usize * (300 << 10)) % (blob.len() - patch.len());
    blob[at..at + patch.len()].copy_from_slice(&patch);
    std::fs::write(tree.join("lib.so"), blob).unwrap();
    std::fs::write(tree.join("version"), version.to_string()).unwrap();
    let path = nix.add(&tree);
    sign(nix, key, &path);
    path
}

fn hash_part(path: &str) -> &str {
    &path.trim_start_matches("/nix/store/")[..32]
}

/// B's narinfo for `path`: its NAR's URL and size.
fn nar_url(p: &Pair, path: &str) -> (String, usize) {
    let (status, body) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(path)));
    assert_eq!(status, 200, "B has no narinfo for {path}");
    let text = String::from_utf8(body).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_owned()
    };
    (
        format!("/{}", field("URL:")),
        field("NarSize:").parse().unwrap(),
    )
}

/// Fetch a NAR through B without Nix importing it: B keeps it in its packs.
fn fetch_nar(p: &Pair, path: &str) {
    let (url, size) = nar_url(p, path);
    let (status, body) = http(&p.b.http, "GET", &url);
    assert_eq!(status, 200);
    assert_eq!(body.len(), size, "B sent a NAR cut short");
}

fn state_of(p: &Pair) -> String {
    p.b_nix.scratch("state-B").to_str().unwrap().to_owned()
}

fn pack_bytes_at(state: &str) -> u64 {
    let out = common::peerix_ok(&["status", "--json", "--state-dir", state]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v["store"]["pack_file_bytes"].as_u64().unwrap()
}

/// Waits, scan by scan (each one is followed by GC), until B's packs fit `budget`.
fn wait_within_budget(p: &mut Pair, state: &str, budget: u64) -> u64 {
    let until = Instant::now() + common::WAIT;
    loop {
        let n = pack_bytes_at(state);
        if n <= budget {
            return n;
        }
        assert!(
            Instant::now() < until,
            "B's packs stay at {n} bytes over a budget of {budget}"
        );
        p.b.wait_scan();
    }
}

/// `peerix store fsck --verify` of B's state (with B's Nix store, for chunks read in place).
fn fsck_clean(nix: &Nix, state: &str) {
    let store = nix.store_arg();
    let out = common::peerix()
        .args([
            "store",
            "fsck",
            "--verify",
            "--state-dir",
            state,
            "--store",
            &store,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck of B's store after a SIGKILL: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

mod needs_nix {
    use super::*;

    /// B fetches NARs that Nix never imports, so they stay in its packs: the budget evicts the
    /// least recently used of them, and an evicted one is fetched from A again when asked.
    #[test]
    fn the_disk_budget_holds_while_peers_fill_the_packs() {
        let budget: u64 = 7 << 20;
        let mut paths = vec![];
        let Some(mut p) = pair_with(
            "life-budget",
            &["--max-store-size", "7MiB", "--scan-interval", "1"],
            |nix, key| {
                paths = (0..4)
                    .map(|i| add_version(nix, key, &format!("pkg{i}"), 0x51 + i, 0, 3))
                    .collect();
            },
        ) else {
            return;
        };
        for path in &paths {
            fetch_nar(&p, path);
        }
        let line = p.b.wait_for("an eviction", |l| {
            l.starts_with("peerix: gc: ") && !l.contains(" 0 NARs evicted")
        });
        eprintln!("{line}");
        let state = state_of(&p);
        let n = wait_within_budget(&mut p, &state, budget);
        eprintln!("B's packs: {n} bytes for a budget of {budget}");
        // The first fetched was used least recently: evicted, and fetched again when wanted.
        fetch_nar(&p, &paths[0]);
        wait_within_budget(&mut p, &state, budget);
    }

    /// B serves a path it holds in its Nix store (read in place); the file changes under it
    /// after the response has begun. The rest of the NAR comes from A instead of Nix being cut
    /// off: the body is complete and is exactly the NAR.
    #[test]
    fn a_stored_nar_that_fails_half_way_is_finished_from_a_peer() {
        let mut big = None;
        let Some(mut p) = pair_with("life-fallback", &["--scan-interval", "1"], |nix, key| {
            big = Some(common::pair::add_big(nix, key))
        }) else {
            return;
        };
        let big = big.unwrap();
        let out = p.b_nix.realise(&big, &p.b.url(), &p.b_key.1);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // B reads it in place from now on, and gives its pack copy back.
        p.b.wait_for("GC of the downloaded copy", |l| {
            l.starts_with("peerix: gc: ") && !l.contains(" 0 pack copies released")
        });
        // Past its first MiB, the file on B's disk is no longer what Nix recorded.
        let blob = p.b_nix.real(&big).join("blob");
        let mut perms = std::fs::metadata(&blob).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&blob, perms).unwrap();
        let mut bytes = std::fs::read(&blob).unwrap();
        for b in &mut bytes[(4 << 20)..(4 << 20) + 4096] {
            *b = !*b;
        }
        std::fs::write(&blob, &bytes).unwrap();

        let (url, size) = nar_url(&p, &big);
        let (status, body) = http(&p.b.http, "GET", &url);
        assert_eq!(status, 200);
        assert_eq!(body.len(), size, "the response was cut");
        let want = p.a_nix.nar_hashes(std::slice::from_ref(&big));
        assert_eq!(
            peerix_nix::Sha256Hash::digest(&body).to_sri(),
            want[&big],
            "B's response is not the NAR"
        );
        p.b.wait_for("the fall back to peers", |l| {
            l.contains("stored NAR unreadable; fetching the rest from peers")
        });
    }

    /// Weeks of a laptop's life, shortened: Nix substitutes changing versions of packages
    /// through B, collects them again, B fetches NARs it keeps only in packs, and is killed
    /// with SIGKILL at random moments (mid-download, mid-scan, mid-GC). After every kill B's
    /// store passes fsck with every chunk verified; at the end it is within its budget.
    /// `PEERIX_SOAK_ROUNDS` sets the length (README: the soak command).
    #[test]
    fn churn_with_gc_and_sigkills_keeps_the_store_in_budget_and_clean() {
        let rounds: usize = std::env::var("PEERIX_SOAK_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(24);
        let seed: u64 = std::env::var("PEERIX_SOAK_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("soak: {rounds} rounds, PEERIX_SOAK_SEED={seed}");
        let budget: u64 = 5 << 20;
        let mut versions: Vec<String> = vec![];
        let Some(mut p) = pair_with(
            "life-soak",
            &["--max-store-size", "5MiB", "--scan-interval", "1"],
            |nix, key| {
                for pkg in 0..3u64 {
                    for v in 0..4 {
                        versions.push(add_version(
                            nix,
                            key,
                            &format!("app{pkg}"),
                            0x77 + pkg,
                            v,
                            2,
                        ));
                    }
                }
            },
        ) else {
            return;
        };
        let state = state_of(&p);
        let mut rng = peerix_test_support::rng::Rng(seed);
        let mut rand = move |n: usize| rng.below(n);
        // B signs what it serves with its own key.
        let trusted = p.b_key.1.clone();
        let mut held: Vec<String> = vec![];
        let (mut substituted, mut fetched, mut collected, mut kills) = (0, 0, 0, 0);
        for round in 0..rounds {
            let path = versions[rand(versions.len())].clone();
            match rand(4) {
                0 | 1 => {
                    let out = p.b_nix.realise(&path, &p.b.url(), &trusted);
                    assert!(
                        out.status.success(),
                        "round {round}: Nix could not substitute {path}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let one = std::slice::from_ref(&path);
                    assert_eq!(p.b_nix.nar_hashes(one), p.a_nix.nar_hashes(one));
                    if !held.contains(&path) {
                        held.push(path);
                    }
                    substituted += 1;
                }
                2 => {
                    fetch_nar(&p, &path);
                    fetched += 1;
                }
                _ if !held.is_empty() => {
                    let gone = held.swap_remove(rand(held.len()));
                    let s = p.b_nix.store_arg();
                    p.b_nix
                        .run("nix-store", &["--store", &s, "--delete", &gone]);
                    collected += 1;
                }
                _ => {}
            }
            if round % 6 == 5 {
                // SIGKILL at a random point of a download that is under way: once the
                // response has reached a random byte of the NAR (or ended).
                let (url, size) = nar_url(&p, &versions[rand(versions.len())]);
                let at = rand(size + 1);
                let addr = p.b.http.clone();
                let (reached, point) = std::sync::mpsc::channel();
                let fetch = std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut s = std::net::TcpStream::connect(&addr).unwrap();
                    let _ = write!(s, "GET {url} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                    let (mut got, mut buf) = (0, vec![0u8; 16 << 10]);
                    while got < at {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n,
                        }
                    }
                    let _ = reached.send(());
                    // Whatever the kill leaves of the rest is fine.
                    let _ = s.read_to_end(&mut vec![]);
                });
                point
                    .recv_timeout(common::WAIT)
                    .expect("the response began");
                let _ = p.b.child.kill();
                let _ = p.b.child.wait();
                let _ = fetch.join();
                fsck_clean(&p.b_nix, &state);
                p.kill_and_restart_b();
                kills += 1;
            }
        }
        let n = wait_within_budget(&mut p, &state, budget);
        eprintln!(
            "soak: {rounds} rounds: {substituted} substitutions, {fetched} NAR fetches, \
             {collected} Nix deletions, {kills} SIGKILLs each followed by a clean fsck; packs \
             {n} bytes for a budget of {budget}"
        );
        let pauses: Vec<&String> =
            p.b.seen
                .iter()
                .filter(|l| l.starts_with("peerix: gc: "))
                .collect();
        if let Some(l) = pauses.last() {
            eprintln!("last GC: {l}");
        }
    }
}

mod needs_root {
    use super::*;

    use common::pair::add_big;

    /// A tmpfs of `mib` MiB mounted on `dir` for the test's life.
    struct Tmpfs(std::path::PathBuf);

    impl Tmpfs {
        fn mount(dir: &Path, mib: u64) -> Tmpfs {
            std::fs::create_dir_all(dir).unwrap();
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "peerix-test"])
                .arg(dir)
                .status()
                .unwrap();
            assert!(st.success(), "mount a tmpfs on {}", dir.display());
            Tmpfs(dir.to_owned())
        }

        fn free(&self) -> u64 {
            let out = std::process::Command::new("df")
                .args(["--output=avail", "-B1"])
                .arg(&self.0)
                .output()
                .unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// B's state directory is a small filesystem of its own that fills up in the middle of a
    /// download: the download fails and says why, B keeps serving, the store passes fsck, and
    /// once space is freed the same path substitutes.
    #[test]
    fn a_full_disk_fails_a_download_cleanly_and_the_next_one_works() {
        // Held for the whole test: the temporary directory goes when it is dropped, after the
        // tmpfs (declared later, dropped first) is unmounted.
        let scratch_env = common::nix();
        let scratch = scratch_env.scratch("full-disk");
        let state = scratch.join("state");
        let fs = Tmpfs::mount(&state, 24);
        let state_s = state.to_str().unwrap().to_owned();
        let mut big = None;
        let Some(mut p) = pair_with("life-full", &["--state-dir", &state_s], |nix, key| {
            big = Some(add_big(nix, key))
        }) else {
            return;
        };
        let big = big.unwrap();
        // Leave 2 MiB: less than the 6 MiB NAR.
        let filler = state.join("filler");
        let leave = 2 << 20;
        std::fs::write(&filler, vec![0u8; (fs.free() - leave) as usize]).unwrap();

        let out = p.b_nix.realise(&big, &p.b.url(), &p.b_key.1);
        assert!(!out.status.success(), "a 6 MiB path fit in 2 MiB");
        let line = p.b.wait_for("the reason of the failure", |l| {
            l.contains("No space left on device")
        });
        eprintln!("B said: {line}");
        // Still serving: its cache info, and a path it can fetch without room for packs.
        let (status, _) = http(&p.b.http, "GET", "/nix-cache-info");
        assert_eq!(status, 200);
        let (status, _) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(&p.top)));
        assert_eq!(status, 200);

        std::fs::remove_file(&filler).unwrap();
        let out = p.b_nix.realise(&big, &p.b.url(), &p.b_key.1);
        assert!(
            out.status.success(),
            "after space was freed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let one = std::slice::from_ref(&big);
        assert_eq!(p.b_nix.nar_hashes(one), p.a_nix.nar_hashes(one));
        let _ = p.b.child.kill();
        let _ = p.b.child.wait();
        fsck_clean(&p.b_nix, &state_s);
    }
}
