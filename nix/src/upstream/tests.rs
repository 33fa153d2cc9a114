use super::*;

#[test]
fn nar_urls() {
    assert!(safe_nar_url("nar/1abc.nar.xz"));
    for bad in [
        "",
        "/etc/passwd",
        "nar/../../x",
        "http://evil/x",
        "nar//x",
        "nar/x?y",
        "nar/./x",
        "nar/x y",
        "nar\\x",
    ] {
        assert!(!safe_nar_url(bad), "{bad}");
    }
}

#[test]
fn compressions() {
    assert_eq!(Compression::from_narinfo(None), Some(Compression::Bzip2));
    assert_eq!(
        Compression::from_narinfo(Some("none")),
        Some(Compression::None)
    );
    assert_eq!(
        Compression::from_narinfo(Some("zstd")),
        Some(Compression::Zstd)
    );
    assert_eq!(Compression::from_narinfo(Some("br")), None);
}

#[test]
fn base_urls() {
    let c = || UpstreamConfig::default();
    assert!(UpstreamCache::new("https://cache.nixos.org/", c()).is_ok());
    assert_eq!(
        UpstreamCache::nixos(c()).unwrap().base_url(),
        "https://cache.nixos.org"
    );
    for bad in ["file:///tmp/x", "cache.nixos.org", "", "http://"] {
        assert!(
            matches!(
                UpstreamCache::new(bad, c()),
                Err(UpstreamError::BadBaseUrl { .. })
            ),
            "{bad}"
        );
    }
}
