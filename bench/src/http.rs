//! The baseline every figure is compared with: the same bytes from a plain HTTP server (a
//! file served by axum) to a plain client (reqwest), over the same link.

use anyhow::{bail, Result};
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

/// Download `url` to a sink; the throughput in MiB/s.
pub(crate) async fn http_fetch(url: &str, size: u64, progress: &Progress) -> Result<f64> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let started = Instant::now();
    let resp = client.get(url).send().await?.error_for_status()?;
    let mut body = resp.bytes_stream();
    let mut total = 0u64;
    while let Some(b) = body.next().await {
        total += b?.len() as u64;
        progress.bar.set_position(total);
    }
    if total != size {
        bail!("the HTTP download got {total} of {size} bytes");
    }
    Ok(size as f64 / MIB / started.elapsed().as_secs_f64())
}
