//! Raw HTTP for tests: requests nothing normalises, a static file server, and a proxy that
//! tells when a number of bytes has gone through.

use std::io::{Read, Write};
use std::path::Path;

/// A raw HTTP/1.1 request (nothing normalises the path); status and body.
pub fn http(addr: &str, method: &str, path: &str) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![];
    s.read_to_end(&mut buf).unwrap();
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, buf[head_end + 4..].to_vec())
}

/// One GET read until EOF or until the server cuts the connection: the status, the
/// Content-Length the head announced, and the body bytes that arrived. For telling a complete
/// response from a cut one.
pub fn get_until_cut(addr: &str, path: &str) -> (u16, Option<usize>, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = vec![];
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap());
    (status, len, got[end + 4..].to_vec())
}

/// One HTTP/1.1 connection kept open for request after request, as Nix's curl keeps one to a
/// substituter.
pub struct KeepAlive {
    stream: std::io::BufReader<std::net::TcpStream>,
    host: String,
}

impl KeepAlive {
    pub fn connect(addr: &str) -> Self {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        // As curl does, and so Nix: what is measured is the server's.
        s.set_nodelay(true).unwrap();
        Self {
            stream: std::io::BufReader::new(s),
            host: addr.to_owned(),
        }
    }

    /// A GET on this connection: the status and the body (as long as its Content-Length).
    pub fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        use std::io::BufRead;
        let host = &self.host;
        write!(
            self.stream.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"
        )
        .unwrap();
        let mut status = None;
        let mut len = None;
        loop {
            let mut line = String::new();
            self.stream.read_line(&mut line).unwrap();
            let line = line.trim_end().to_lowercase();
            if line.is_empty() {
                break;
            }
            if status.is_none() {
                status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            } else if let Some(v) = line.strip_prefix("content-length: ") {
                len = v.trim().parse().ok();
            }
        }
        let mut body = vec![0u8; len.expect("a Content-Length")];
        self.stream.read_exact(&mut body).unwrap();
        (status.expect("a status"), body)
    }
}

/// A static HTTP server on 127.0.0.1 (port from the OS) serving a directory, as a binary cache
/// written by `nix copy --to file://…` is served. Stops when dropped.
pub struct HttpServer {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn serve_dir(dir: &Path) -> HttpServer {
    let dir = dir.to_owned();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let app =
                axum::Router::new().fallback_service(tower_http::services::ServeDir::new(dir));
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
        });
    });
    let addr = addr_rx.recv().expect("server address");
    HttpServer {
        url: format!("http://{addr}"),
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP proxy on loopback in front of `target` that tells when `threshold` bytes have gone
/// from the target to its clients: a test acts at a point of a transfer, not after a time.
pub struct CountingProxy {
    pub addr: String,
    pub reached: std::sync::mpsc::Receiver<()>,
}

pub fn counting_proxy(target: &str, threshold: u64) -> CountingProxy {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, reached) = std::sync::mpsc::channel();
    let count = Arc::new(AtomicU64::new(0));
    let target = target.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (mut c_r, mut s_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_r, &mut s_w);
                let _ = s_w.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_r, mut c_w) = (server, client);
            let (count, tx) = (count.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match s_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if c_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let before = count.fetch_add(n as u64, Ordering::SeqCst);
                    if before < threshold && before + n as u64 >= threshold {
                        let _ = tx.send(());
                    }
                }
                let _ = c_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    CountingProxy { addr, reached }
}
