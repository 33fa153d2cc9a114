//! Progress of `peerix seed` for people: a bar on a terminal, plain lines on a pipe.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::common::{dedup_pct, paths_n};
use crate::seed::{human, name_list, SeedEvent};

/// Progress for people: a bar on a terminal, plain lines on a pipe.
pub(super) struct Printer {
    tty: bool,
    bar: Option<ProgressBar>,
    paths: (usize, usize),
    bytes: (u64, u64),
}

impl Printer {
    pub(super) fn new() -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            bar: None,
            paths: (0, 0),
            bytes: (0, 0),
        }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{s}");
            }
        }
    }

    pub(super) fn event(&mut self, e: SeedEvent) {
        match e {
            SeedEvent::Plan {
                label,
                root,
                paths,
                bytes,
                private,
                shared_private,
                denied,
            } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                let shown = if label == root {
                    label
                } else {
                    format!("{label} ({root})")
                };
                self.line(&format!(
                    "peerix: seeding {shown}: {}, {}",
                    paths_n(paths),
                    human(bytes)
                ));
                if !private.is_empty() && shared_private {
                    self.line(&format!(
                        "peerix: {} shared only because of --share-private-paths (neither in the upstream cache \
                         nor signed by this machine's key or a trusted key); every peer that asks gets them:\n    {}",
                        paths_n(private.len()),
                        name_list(&private)
                    ));
                }
                if !private.is_empty() && !shared_private {
                    self.line(&format!(
                        "peerix: {} not shared: neither in the upstream cache nor signed by this machine's key \
                         or a trusted key; pass --share-private-paths to share them:\n    {}",
                        paths_n(private.len()),
                        name_list(&private)
                    ));
                }
                if !denied.is_empty() {
                    self.line(&format!(
                        "peerix: {} not seeded: deny patterns match, so they stay private:\n    {}",
                        paths_n(denied.len()),
                        name_list(&denied)
                    ));
                }
                self.paths = (0, paths);
                self.bytes = (0, 0);
                if self.tty {
                    let b = ProgressBar::new(bytes);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.enable_steady_tick(Duration::from_millis(200));
                    self.bar = Some(b);
                }
            }
            SeedEvent::Begin { name, nar_size } => {
                if let Some(b) = &self.bar {
                    b.set_message(format!(
                        "paths {}/{}, {:.0}% already held; {name} ({})",
                        self.paths.0,
                        self.paths.1,
                        dedup_pct(self.bytes.0, self.bytes.1),
                        human(nar_size)
                    ));
                }
            }
            SeedEvent::Path {
                name,
                nar_size,
                copied,
            } => {
                self.paths.0 += 1;
                self.bytes.0 += nar_size;
                self.bytes.1 += copied;
                let dedup = dedup_pct(self.bytes.0, self.bytes.1);
                match &self.bar {
                    Some(b) => {
                        b.inc(nar_size);
                        b.set_message(format!(
                            "paths {}/{}, {dedup:.0}% already held",
                            self.paths.0, self.paths.1
                        ));
                    }
                    None => self.line(&format!(
                        "peerix: pinned {}/{} {name} {} ({} new)",
                        self.paths.0,
                        self.paths.1,
                        human(nar_size),
                        human(copied)
                    )),
                }
            }
            SeedEvent::Replaced { label, released } => self.line(&format!(
                "peerix: {label} replaces its earlier seed; {} of that one are no longer pinned",
                paths_n(released)
            )),
        }
    }

    pub(super) fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
