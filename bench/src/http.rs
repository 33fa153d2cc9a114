//! The baseline every figure is compared with: the same bytes from a plain HTTP server (a
//! file served by axum) to a plain client (reqwest), over the same link, or over the same N
//! links at once (one range of the file from each server, as a download accelerator splits a
//! file between mirrors).

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use std::time::Instant;

use crate::{Progress, MIB};

/// A plain HTTP server on 127.0.0.1 serving `nar` at `/nar`.
pub async fn http_server(
    nar: std::path::PathBuf,
    bind: &str,
) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let app = axum::Router::new().route_service("/nar", tower_http::services::ServeFile::new(nar));
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let url = format!("http://{}/nar", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, task))
}

/// Download the `size` bytes every one of `urls` serves to a sink, each URL an equal range of
/// them, all at once over connections of their own (one URL: the whole file, no range); the
/// throughput in MiB/s, until the last range is in.
pub(crate) async fn http_fetch(urls: &[String], size: u64, progress: &Progress) -> Result<f64> {
    let n = urls.len() as u64;
    if n == 0 {
        bail!("no HTTP server to download from");
    }
    let started = Instant::now();
    let parts = urls.iter().enumerate().map(|(i, url)| {
        let (from, to) = (size * i as u64 / n, size * (i as u64 + 1) / n);
        async move {
            let client = reqwest::Client::builder().no_proxy().build()?;
            let mut req = client.get(url);
            if n > 1 {
                req = req.header(reqwest::header::RANGE, format!("bytes={from}-{}", to - 1));
            }
            let resp = req.send().await?.error_for_status()?;
            if n > 1 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                bail!("{url} answered a range with {}", resp.status());
            }
            let mut body = resp.bytes_stream();
            let mut got = 0u64;
            while let Some(b) = body.next().await {
                let len = b.with_context(|| format!("reading {url}"))?.len() as u64;
                got += len;
                progress.bar.inc(len);
            }
            if got != to - from {
                bail!(
                    "the HTTP download from {url} got {got} of {} bytes",
                    to - from
                );
            }
            Ok(())
        }
    });
    futures::future::try_join_all(parts).await?;
    Ok(size as f64 / MIB / started.elapsed().as_secs_f64())
}
