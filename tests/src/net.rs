//! A loopback listener that can be closed (connects are refused) and re-opened on the same
//! port, shared by the mock LLM and the fault proxy.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::util::lock;

/// Called for every accepted connection; the returned future runs as its own task.
pub(crate) type Handler =
    Arc<dyn Fn(TcpStream, SocketAddr) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A listener on a fixed loopback address whose accept loop can be stopped and restarted.
pub(crate) struct Acceptor {
    addr: SocketAddr,
    handler: Handler,
    runtime: Handle,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Acceptor {
    /// Binds `addr` (port 0 picks one) and starts accepting. Must run inside a tokio runtime.
    pub(crate) fn bind(addr: SocketAddr, handler: Handler) -> Result<Arc<Self>> {
        let runtime =
            Handle::try_current().context("the harness must run inside a tokio runtime")?;
        let listener = bind_std(addr)?;
        let addr = listener.local_addr()?;
        let acceptor = Arc::new(Self {
            addr,
            handler,
            runtime,
            state: Mutex::new(State::default()),
        });
        acceptor.start(listener)?;
        Ok(acceptor)
    }

    /// The bound address (stable across close/reopen).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and releases the port, so connects are refused once this returns.
    /// With `abort_connections`, live connections are closed too.
    pub(crate) async fn close(&self, abort_connections: bool) {
        let (accept, connections) = {
            let mut state = lock(&self.state);
            let connections: Vec<JoinHandle<()>> = if abort_connections {
                lock(&state.connections).drain(..).collect()
            } else {
                Vec::new()
            };
            (state.accept.take(), connections)
        };
        // An aborted task drops its future (and so closes its sockets) only when the runtime
        // gets to it; wait for that so the caller can rely on the port being closed.
        for task in accept.into_iter().chain(connections) {
            task.abort();
            let _ = task.await;
        }
    }

    /// Closes live connections (the listener is left as it is).
    pub(crate) async fn abort_connections(&self) {
        let connections: Vec<JoinHandle<()>> = {
            let state = lock(&self.state);
            let drained = lock(&state.connections).drain(..).collect();
            drained
        };
        for task in connections {
            task.abort();
            let _ = task.await;
        }
    }

    /// Whether the listener is accepting.
    pub(crate) fn is_open(&self) -> bool {
        lock(&self.state).accept.is_some()
    }

    /// Re-binds the same port and accepts again; a no-op when already open.
    pub(crate) fn reopen(&self) -> Result<()> {
        if lock(&self.state).accept.is_some() {
            return Ok(());
        }
        let listener = bind_std(self.addr)?;
        self.start(listener)
    }

    fn start(&self, listener: StdTcpListener) -> Result<()> {
        let _guard = self.runtime.enter();
        let listener = TcpListener::from_std(listener)?;
        let mut state = lock(&self.state);
        let connections = state.connections.clone();
        let handler = self.handler.clone();
        let runtime = self.runtime.clone();
        state.accept = Some(self.runtime.spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    // Accept errors (e.g. EMFILE) are transient for a test harness.
                    tokio::task::yield_now().await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let task = runtime.spawn(handler(stream, peer));
                let mut live = lock(&connections);
                live.retain(|c| !c.is_finished());
                live.push(task);
            }
        }));
        Ok(())
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        let state = lock(&self.state);
        if let Some(task) = &state.accept {
            task.abort();
        }
        for task in lock(&state.connections).iter() {
            task.abort();
        }
    }
}

/// Pending connections a listener queues (std's default is 128): Envoy may open hundreds of
/// upstream connections at once, and a SYN dropped by a full queue is retried only after a
/// second, far beyond the clusters' connect timeout.
const BACKLOG: u32 = 4096;

fn bind_std(addr: SocketAddr) -> Result<StdTcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    // Re-binding a port with connections in TIME_WAIT must work (close/reopen).
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    let listener = socket.listen(BACKLOG)?.into_std()?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
