//! The benchmark's report as a table and as an SVG chart.

use super::{Report, Row, MIB};

pub fn table(r: &Report) -> String {
    let mut s = format!(
        "NAR {:.1} MiB, {:?} mode{}{}, seeders read it from {}, ideal per peer {:.1} MiB/s\n",
        r.nar_size as f64 / MIB,
        r.mode,
        match r.transport {
            super::Transport::Tcp => "",
            super::Transport::Quic => ", over QUIC",
            super::Transport::Both => ", seeders on TCP and QUIC, dialled over QUIC",
        },
        if r.rtt_ms > 0 {
            format!(" ({} ms round trip)", r.rtt_ms)
        } else {
            String::new()
        },
        match r.seed_from {
            super::SeedFrom::Store => "their Nix store, in place",
            super::SeedFrom::Packs => "their chunk store's packs",
        },
        r.ideal_per_peer_mib_per_s
    );
    s += &format!(
        "{:>3} {:>10} {:>9} {:>10} {:>8} {:>12} {:>10} {:>8} {:>10} {:>9} {:>9} {:>7} {:>10} {:>11} {:>9}\n",
        "N",
        "MiB/s",
        "/ideal",
        "HTTP MiB/s",
        "/HTTP",
        "HTTP N/ideal",
        "1st byte",
        "tail",
        "wire MiB",
        "CPU s/GiB",
        "HTTP CPU",
        "/HTTP",
        "faults/GiB",
        "HTTP faults",
        "disk wait"
    );
    for row in &r.rows {
        s += &format!(
            "{:>3} {:>10.1} {:>9.3} {:>10.1} {:>8.2} {:>12} {:>8.1}ms {:>6.0}ms {:>10.1} {:>9.2} {:>9.2} {:>7.2} {:>10.0} {:>11.0} {:>7.0}ms\n",
            row.seeders,
            row.mib_per_s,
            row.ratio_to_ideal,
            row.http_mib_per_s,
            row.ratio_to_http,
            // Plain HTTP over the same N links, against the same ideal (netns mode).
            row.http_links_mib_per_s.map_or("-".into(), |v| format!(
                "{:.3}",
                v / (row.seeders as f64 * r.ideal_per_peer_mib_per_s)
            )),
            row.first_byte_ms,
            row.tail_ms,
            row.wire_bytes as f64 / MIB,
            row.cpu_s_per_gib,
            row.http_cpu_s_per_gib,
            row.cpu_s_per_gib / row.http_cpu_s_per_gib.max(f64::MIN_POSITIVE),
            row.faults_per_gib,
            row.http_faults_per_gib,
            row.disk_wait_ms
        );
    }
    if r.rows.iter().any(|row| row.seeders_cpu_s_per_gib.is_some()) {
        s += "seeders' CPU per GiB (all N together), and the HTTP server's:\n";
        for row in &r.rows {
            s += &format!(
                "{:>3} seeders {:>6.2} s/GiB, HTTP server {:>6.2} s/GiB\n",
                row.seeders,
                row.seeders_cpu_s_per_gib.unwrap_or(f64::NAN),
                row.http_server_cpu_s_per_gib.unwrap_or(f64::NAN)
            );
        }
    }
    let rss = match r.mode {
        super::Mode::Loopback => "this process, every node",
        super::Mode::Netns => "the leecher",
    };
    s += &format!(
        "CPU per GiB moved (the leecher and the HTTP client alone); SHA-256 of the same bytes {:.2} s/GiB; peak RSS ({rss}) {:.0} MiB\n",
        r.sha256_cpu_s_per_gib, r.peak_rss_mib
    );
    let d = &r.dedup;
    s += &format!(
        "dedup: version 2 ({:.1} MiB) fetched {:.2} MiB from peers ({:.2}%, {:.2} MiB on the wire), {:.1} MiB local\n",
        d.v2_size as f64 / MIB,
        d.fetched_bytes as f64 / MIB,
        d.fetched_ratio * 100.0,
        d.wire_bytes as f64 / MIB,
        d.local_bytes as f64 / MIB
    );
    s
}

/// Aggregate throughput against N, measured and ideal (N × the per-peer figure).
pub fn svg(r: &Report) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let max_n = r.rows.iter().map(|r| r.seeders).max().unwrap_or(1) as f64;
    let max_y = r
        .rows
        .iter()
        .flat_map(|row| {
            [
                row.mib_per_s,
                row.seeders as f64 * r.ideal_per_peer_mib_per_s,
            ]
        })
        .fold(1.0, f64::max)
        * 1.1;
    let x = |n: f64| m + (n / max_n) * (w - 2.0 * m);
    let y = |v: f64| h - m - (v / max_y) * (h - 2.0 * m);
    let line = |f: &dyn Fn(&Row) -> f64| {
        r.rows
            .iter()
            .map(|row| format!("{:.1},{:.1}", x(row.seeders as f64), y(f(row))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">peerix bench: \
         aggregate throughput, {:.0} MiB NAR, {:?}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seeders (N)</text>\n\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">MiB/s</text>\n",
        w / 2.0,
        r.nar_size as f64 / MIB,
        r.mode,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 15.0,
        h / 2.0,
        h / 2.0,
    );
    for row in &r.rows {
        let n = row.seeders as f64;
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            x(n),
            h - m + 16.0,
            row.seeders
        );
    }
    for i in 0..=4 {
        let v = max_y * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            m - 6.0,
            y(v) + 4.0
        );
    }
    s += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"gray\" stroke-dasharray=\"6 4\"/>\n",
        line(&|row| row.seeders as f64 * r.ideal_per_peer_mib_per_s)
    );
    s += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\"/>\n",
        line(&|row| row.mib_per_s)
    );
    for row in &r.rows {
        s += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"steelblue\"/>\n",
            x(row.seeders as f64),
            y(row.mib_per_s)
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" fill=\"steelblue\">measured</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"gray\">ideal: N × {:.1} MiB/s</text>\n</svg>\n",
        m + 10.0,
        m + 4.0,
        m + 10.0,
        m + 20.0,
        r.ideal_per_peer_mib_per_s
    );
    s
}
