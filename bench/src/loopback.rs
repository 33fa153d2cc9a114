//! Loopback mode's seeders: nodes in this process on 127.0.0.1, on a runtime of their own so
//! that what they cost is told apart from what the leecher costs, as when they are processes
//! of their own (netns mode).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use peerix_chunkstore::ChunkStore;
use peerix_swarm::{Catalog, Node, ServeLimits, Server};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use crate::cpu::ThreadGroup;
use crate::{http_server, seed, start_node, SeedFrom, Transport};

/// What the loopback seeders share: their runtime, one chunk store and catalog that hold the
/// NAR (chunked once, disk spared), and the HTTP server of the baseline.
pub(crate) struct Local {
    rt: SeederRuntime,
    store: ChunkStore,
    catalog: Arc<dyn Catalog>,
    http: JoinHandle<()>,
}

impl Local {
    /// The seeders' data, made in `dir` (`size` bytes of content per version, held as `from`
    /// says), and the HTTP server of the NAR; its URL.
    pub(crate) async fn start(dir: &Path, size: u64, from: SeedFrom) -> Result<(Self, String)> {
        let rt = SeederRuntime::new()?;
        let dir = dir.to_owned();
        let (s, url, http) = rt
            .handle()
            .spawn(async move {
                let s = seed(&dir, size, from).await?;
                let (url, http) = http_server(s.nar_file.clone(), "127.0.0.1:0").await?;
                anyhow::Ok((s, url, http))
            })
            .await??;
        let catalog: Arc<dyn Catalog> = Arc::new(s.catalog);
        let local = Self {
            rt,
            store: s.store,
            catalog,
            http,
        };
        Ok((local, url))
    }

    /// `n` seeder nodes serving the NAR over `transport`, their state in `dir`.
    pub(crate) async fn seeders(
        &self,
        dir: &Path,
        n: usize,
        transport: Transport,
    ) -> Result<Seeders> {
        let mut seeders = Seeders {
            nodes: vec![],
            servers: vec![],
            transport,
        };
        for i in 0..n {
            let (dir, store, catalog) = (
                dir.join(format!("seeder-{i}")),
                self.store.clone(),
                self.catalog.clone(),
            );
            let (node, server) = self
                .rt
                .handle()
                .spawn(async move {
                    let node = start_node(dir, &transport.listen("127.0.0.1"), vec![]).await?;
                    let server = Server::new(store, catalog, ServeLimits::default());
                    let serving = tokio::spawn(server.run(node.stream_control())?);
                    anyhow::Ok((node, serving))
                })
                .await??;
            seeders.servers.push(server);
            seeders.nodes.push(node);
        }
        Ok(seeders)
    }

    /// CPU time the seeders and the HTTP server have used so far.
    pub(crate) fn cpu(&self) -> Duration {
        self.rt.threads.cpu()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.http.abort();
    }
}

/// Seeder nodes and their servers, stopped when dropped.
pub(crate) struct Seeders {
    nodes: Vec<Node>,
    servers: Vec<JoinHandle<()>>,
    transport: Transport,
}

impl Seeders {
    /// Where the leecher dials them.
    pub(crate) fn addrs(&self) -> Result<Vec<String>> {
        self.nodes
            .iter()
            .map(|n| self.transport.dialled(n))
            .collect()
    }
}

impl Drop for Seeders {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

/// The seeders' runtime, its threads counted apart. Shut down without waiting when dropped:
/// a runtime cannot be dropped inside another one's task.
struct SeederRuntime {
    rt: Option<Runtime>,
    threads: ThreadGroup,
}

impl SeederRuntime {
    fn new() -> Result<Self> {
        let threads = ThreadGroup::default();
        let rt = threads
            .runtime("bench-seeders")
            .context("starting the seeders' runtime")?;
        Ok(Self {
            rt: Some(rt),
            threads,
        })
    }

    fn handle(&self) -> &Handle {
        self.rt.as_ref().expect("only taken when dropped").handle()
    }
}

impl Drop for SeederRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
