use super::*;

#[test]
fn globs() {
    assert!(glob_match("nixos-system-*", "nixos-system-host-24.05"));
    assert!(glob_match("*secret*", "my-secrets"));
    assert!(glob_match("etc", "etc"));
    assert!(!glob_match("etc", "etcd-3.5"));
    assert!(glob_match("*.key", "host.key"));
    assert!(glob_match("a?c", "abc"));
    assert!(!glob_match("a?c", "ac"));
    assert!(glob_match("*", ""));
    assert!(!glob_match("*-etc", "hello-2.12"));
}

/// Every built-in deny entry, with store names (after the hash) it is there to catch, as
/// NixOS, home-manager and users' configurations name them.
const CAUGHT: &[(&str, &[&str])] = &[
    (
        "nixos-system-*",
        &["nixos-system-laptop-24.05.20240601.abcdef0"],
    ),
    ("etc", &["etc"]),
    (
        "etc-*",
        &["etc-wpa_supplicant-nixos.conf", "etc-msmtprc", "etc-fstab"],
    ),
    ("*-etc", &["home-manager-etc"]),
    ("user-environment", &["user-environment"]),
    ("*-user-environment", &["home-manager-user-environment"]),
    ("home-manager-generation", &["home-manager-generation"]),
    ("home-manager-files", &["home-manager-files"]),
    ("activate", &["activate"]),
    (
        "*-activation-script*",
        &["nixos-activation-script", "home-manager-activation-script"],
    ),
    ("users-groups.json", &["users-groups.json"]),
    (
        "unit-script-*",
        &[
            "unit-script-wireguard-wg0-start",
            "unit-script-wg-quick-wg0-start",
        ],
    ),
    (
        "unit-*.service",
        &["unit-peerix.service", "unit-wireguard-wg0.service"],
    ),
    ("unit-*.mount", &["unit-mnt-share.mount"]),
    ("unit-*.netdev", &["unit-40-wg0.netdev"]),
    ("unit-*.network", &["unit-40-wg0.network"]),
    ("nix.conf", &["nix.conf"]),
    ("netrc", &["netrc"]),
    ("*.netrc", &["nix.netrc"]),
    (
        "wpa_supplicant*.conf",
        &["wpa_supplicant.conf", "wpa_supplicant-wlan0.conf"],
    ),
    ("hostapd*.conf", &["hostapd.conf", "hostapd-wlan1.conf"]),
    ("*.nmconnection", &["home-wifi.nmconnection"]),
    ("*.sec", &["peerix.sec", "cache-priv.sec"]),
    ("*.key", &["swarm.key", "host.key"]),
    ("*-key", &["signing-key", "wireguard-private-key"]),
    ("*_key", &["ssh_host_ed25519_key", "ssh_host_rsa_key"]),
    ("*-keys", &["authorized-keys", "binary-cache-keys"]),
    ("*.pem", &["cache-priv-key.pem", "acme-account.pem"]),
    ("*.p12", &["client.p12"]),
    ("*.pfx", &["client.pfx"]),
    ("*.keytab", &["krb5.keytab"]),
    ("*.psk", &["home.psk"]),
    ("id_rsa", &["id_rsa"]),
    ("id_ecdsa", &["id_ecdsa"]),
    ("id_ed25519", &["id_ed25519"]),
    ("id_dsa", &["id_dsa"]),
    ("*.ovpn", &["office.ovpn"]),
    ("*.env", &["grafana.env", "restic.env"]),
    ("*secret*", &["secrets.yaml", "client-secret"]),
    ("*password*", &["wifi-password", "passwords.txt"]),
    ("*passwd*", &["htpasswd", "passwd"]),
    ("*shadow*", &["shadow"]),
    ("*token*", &["github-token"]),
    ("*credentials*", &["aws-credentials"]),
];

#[test]
fn every_deny_entry_catches_what_it_is_for() {
    let cfg = ShareConfig::default();
    let entries: Vec<&str> = CAUGHT.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        entries, DEFAULT_DENY,
        "every built-in deny entry needs its examples here, in order"
    );
    for (pattern, names) in CAUGHT {
        assert!(!names.is_empty(), "{pattern}: no example");
        for name in *names {
            assert!(glob_match(pattern, name), "{pattern} does not match {name}");
            assert!(cfg.deny.iter().any(|p| glob_match(p, name)));
        }
    }
}

#[test]
fn packages_are_not_denied() {
    // Public packages a system closure holds, some named like the entries above.
    let cfg = ShareConfig::default();
    for name in [
        "hello-2.12.1",
        "wpa_supplicant-2.11",
        "hostapd-2.11",
        "nix-2.24.10",
        "openssh-9.8p1",
        "unit-1.32.1",
        "systemd-256.8",
        "etcd-3.5.16",
        "gnupg-2.4.5",
        "networkmanager-1.48.10",
        "wireguard-tools-1.0.20210914",
        "python3-3.12.7-env",
        "system-units",
        "linux-6.6.63",
        "glibc-2.40-36",
        "glibc-2.40-36-bin",
        "keyutils-1.6.3-lib",
        "libsecp256k1-0.5.1",
    ] {
        assert!(
            !cfg.deny.iter().any(|p| glob_match(p, name)),
            "{name} is denied by {:?}",
            cfg.deny.iter().find(|p| glob_match(p, name))
        );
    }
}
