//! The `--config` TOML file: parsing and resolving never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix::config::{FileConfig, ServeArgs, ServeConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = toml::from_str::<FileConfig>(s) else {
        return;
    };
    if let Ok(c) = ServeConfig::merge(ServeArgs::default(), file) {
        assert!(!c.timeout.is_zero());
        // `None`: no periodic rescans (`scan-interval = 0`); otherwise a real interval.
        assert!(c.scan_interval.is_none_or(|i| !i.is_zero()));
        // `None`: no budget (`max-store-size = "0"`); otherwise at least a byte.
        assert!(c.max_store_size.is_none_or(|b| b > 0));
        assert!(!c.p2p_listen.is_empty());
    }
});
